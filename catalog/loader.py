"""Load and validate a catalog file, turning every failure into one line that cites
the file, the line (where known) and the path in the document.

The YAML is composed into a node tree first: nodes keep their line numbers, which
pydantic's error locations are then mapped back onto.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml
from pydantic import ValidationError

from xmllm.errors import XmllmError
from xmllm.safe_yaml import YamlError, compose, construct, format_loc, read_text

from .schema import Catalog

Loc = Sequence[str | int]

DEFAULT_PATH = Path(__file__).parent / "taxonomy.yaml"


class CatalogError(XmllmError, ValueError):
    """An invalid or unreadable catalog; ``str()`` is one line: ``file:line: path: message``."""

    def __init__(self, file: str, message: str, line: int | None = None, path: str = "") -> None:
        self.file, self.line, self.path = file, line, path
        self.message = " ".join(message.split())  # guarantee one line
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {path}: {self.message}" if path else f"{where}: {self.message}")


def line_of(root: yaml.Node | None, loc: Loc) -> int | None:
    """The 1-based line of the deepest node that ``loc`` reaches (a key's own line for mappings)."""
    if root is None:
        return None
    node, line = root, root.start_mark.line + 1
    for part in loc:
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == part:
                    nxt, line = value, key.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            nxt = node.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        node = nxt
    return line


def _describe(err: dict) -> str:
    """A short message for one pydantic error."""
    kind, value, last = err["type"], err.get("input"), (err["loc"][-1] if err["loc"] else None)
    if kind == "extra_forbidden":
        return f"unknown key {last!r}"
    if kind == "missing":
        return "missing required key"
    if kind == "value_error":
        return str(err["ctx"]["error"])
    if last == "arxiv" and kind == "string_type":
        return f"arXiv id must be a quoted string like '2412.02104' (got {type(value).__name__} {value!r})"
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{err['msg'][0].lower()}{err['msg'][1:]} (got {type(value).__name__} {shown})"


def _tree_errors(cat: Catalog) -> Iterator[tuple[Loc, str]]:
    """Checks across nodes: ids nest under their parent's id and are unique in the file."""
    seen: dict[str, str] = {}

    def visit(loc: Loc, node_id: str, parent: str | None) -> Iterator[tuple[Loc, str]]:
        head, _, tail = node_id.rpartition(".")
        if parent is None and head:
            yield (*loc, "id"), f"perspective id {node_id!r} must be a single segment (no dots)"
        elif parent is not None and head != parent:
            yield (*loc, "id"), f"id {node_id!r} must be '{parent}.<name>' to sit under {parent!r}"
        if node_id in seen:
            yield (*loc, "id"), f"duplicate id {node_id!r} (first at {seen[node_id]})"
        seen.setdefault(node_id, format_loc(loc))

    for i, p in enumerate(cat.perspectives):
        ploc = ("perspectives", i)
        yield from visit(ploc, p.id, None)
        if not p.children and not p.leaves:
            yield ploc, "a perspective needs 'leaves', 'children' or both"
        for j, leaf in enumerate(p.leaves):
            yield from visit((*ploc, "leaves", j), leaf.id, p.id)
        for j, g in enumerate(p.children):
            gloc = (*ploc, "children", j)
            yield from visit(gloc, g.id, p.id)
            for k, leaf in enumerate(g.leaves):
                yield from visit((*gloc, "leaves", k), leaf.id, g.id)


def display_name(path: Path) -> str:
    """The path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read, parse and validate a catalog file (default: the packaged taxonomy)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    name = display_name(path) if path == DEFAULT_PATH else str(path)
    try:  # bounded size and alias expansion, duplicate keys refused, plain data only
        root, loader = compose(read_text(path, name), name)
        data = construct(root, loader, name)
    except YamlError as exc:
        raise CatalogError(name, exc.message, exc.line, exc.loc) from None

    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise CatalogError(name, f"expected a mapping with keys survey, terms, perspectives; got {got}", line_of(root, ()))
    try:
        cat = Catalog.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise CatalogError(name, _describe(first) + more, line_of(root, first["loc"]), format_loc(first["loc"])) from None
    for loc, message in _tree_errors(cat):
        raise CatalogError(name, message, line_of(root, loc), format_loc(loc))
    return cat
