"""Every YAML file xmllm reads (the catalog, audit configs, MkDocs configs) goes through here.

PyYAML's ``safe_load`` constructs no Python objects, but it still expands aliases without bound
("billion laughs": nine nested aliases make 10^9 nodes from a 1 KB file), reads a file of any
size, and keeps the last of two equal keys without a word. Here the node tree is composed first
(aliases are shared nodes, so composing is cheap), then walked with a budget of expanded nodes,
checked for duplicate keys, and only then constructed.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import XmllmError

MAX_BYTES = 4 << 20
"""Largest YAML file read (4 MiB): the packaged catalog is 17 KB, an audit config about 1 KB."""
MAX_NODES = 200_000
"""Most nodes a document may hold once its aliases are expanded."""


class YamlError(XmllmError, ValueError):
    """A YAML file that cannot be read safely; ``str()`` is one line: ``file:line: path: message``."""

    def __init__(self, name: str, message: str, line: int | None = None, loc: str = "") -> None:
        self.name, self.line, self.loc, self.message = name, line, loc, " ".join(message.split())
        where = f"{name}:{line}" if line else name
        super().__init__(f"{where}: {loc}: {self.message}" if loc else f"{where}: {self.message}")


def read_text(path: Path, name: str | None = None, max_bytes: int = MAX_BYTES) -> str:
    """The file's UTF-8 text; a one-line error for a missing, oversized or undecodable file."""
    name = name or str(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise YamlError(name, f"file is {size:,} bytes, over the {max_bytes:,}-byte limit for YAML files")
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise YamlError(name, "file not found") from None
    except IsADirectoryError:
        raise YamlError(name, "is a folder, not a file") from None
    except OSError as exc:
        raise YamlError(name, f"cannot read file: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise YamlError(name, f"file is over the {max_bytes:,}-byte limit for YAML files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise YamlError(name, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})", line) from None


def compose(text: str, name: str, max_nodes: int = MAX_NODES) -> tuple[yaml.Node | None, yaml.SafeLoader]:
    """The document's node tree (None when empty) and the loader to construct it with.

    Refuses a tree that expands to more than ``max_nodes`` nodes and mapping keys given twice.
    Call :func:`construct` on the result, which disposes of the loader."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _check_size(root, name, max_nodes)
            for loc, line in duplicate_keys(root):
                raise YamlError(name, f"duplicate key {loc[-1]!r}", line, format_loc(loc))
    except yaml.MarkedYAMLError as exc:
        loader.dispose()
        mark = exc.problem_mark or exc.context_mark
        raise YamlError(name, f"YAML syntax error: {exc.problem or exc.context}", mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        loader.dispose()
        raise YamlError(name, f"YAML error: {exc}") from None
    except YamlError:
        loader.dispose()
        raise
    return root, loader


def construct(root: yaml.Node | None, loader: yaml.SafeLoader, name: str) -> Any:
    """Python data of a tree from :func:`compose` (plain scalars, lists and dicts only)."""
    try:
        return loader.construct_document(root) if root is not None else None
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise YamlError(name, f"{exc.problem} (YAML here is read safely: no Python tags)",
                        mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise YamlError(name, f"YAML error: {exc}") from None
    finally:
        loader.dispose()


def load_yaml(path: Path, what: str | None = None, max_bytes: int = MAX_BYTES, max_nodes: int = MAX_NODES) -> Any:
    """Read, bound-check and construct one YAML file; errors name ``what`` (default: the path)."""
    name = f"{what} {path}" if what else str(path)
    root, loader = compose(read_text(Path(path), name, max_bytes), name, max_nodes)
    return construct(root, loader, name)


def _check_size(root: yaml.Node, name: str, max_nodes: int) -> None:
    """Count nodes as construction would meet them (an alias counts its whole subtree again)."""
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        count += 1
        if count > max_nodes:
            raise YamlError(name, f"the document expands to more than {max_nodes:,} nodes "
                                  "(aliases that repeat large parts, or a file too large to read)",
                            node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.append(key)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def format_loc(loc: tuple[str | int, ...]) -> str:
    """``('perspectives', 1, 'leaves', 0)`` -> ``perspectives[1].leaves[0]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def duplicate_keys(root: yaml.Node) -> Iterator[tuple[tuple[str | int, ...], int]]:
    """Mapping keys given twice, with their path and line; PyYAML would keep the last silently.

    Walks each node once (a shared, aliased node is not visited again), so it is linear in the
    composed tree, not in its expansion."""
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[str | int, ...]]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            children = []
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in keys:
                        yield (*loc, key.value), key.start_mark.line + 1
                    keys.add(key.value)
                    children.append((value, (*loc, key.value)))
            stack.extend(reversed(children))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed([(item, (*loc, i)) for i, item in enumerate(node.value)]))
