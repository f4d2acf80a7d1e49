"""What every explainer returns: named arrays with named axes, scores and the target they explain.

Arrays are addressed by name with declared axes, so reports render any explainer generically:
a map whose last two axes are ``("row", "col")`` is drawn over the image grid, one whose last
axis is ``"prompt_token"`` over the prompt words, one with a leading ``"answer_token"`` axis
per answer token (by position: a repeated word keeps its own map). Saving writes ``.npz``
(arrays) and ``.json`` (everything else) and loads back exactly.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from xmllm import atomic

FORMAT_VERSION = 1
RENDERERS = "xmllm.renderers"
"""Entry-point group of HTML renderers (pyproject.toml): the report layer sits above the core, so
the core finds it by name, and a notebook that imported only :mod:`xmllm.explainers` still shows
an explanation as its report."""
EXPLANATION_RENDERER = "explanation"
"""The renderer of one :class:`Explanation` (a callable from it to HTML) in :data:`RENDERERS`."""


@dataclass
class Target:
    """The answer being explained, token by token, and where its tokens sit in the sequence."""

    text: str
    token_ids: list[int]
    tokens: list[str]
    positions: list[int]
    """Sequence positions of the answer tokens in the final (prompt + answer) sequence."""
    probs: list[float]
    prompt_positions: list[int] = field(default_factory=list)
    """Positions of the prompt's text tokens (not image tokens), the axis of prompt maps."""
    prompt_tokens: list[str] = field(default_factory=list)
    contrast: str | None = None
    """With a contrast: the foil answer; each answer token's value is log p(answer) - log p(foil)."""
    contrast_tokens: list[str] = field(default_factory=list)


@dataclass
class Explanation:
    """One explainer's result on one sample."""

    explainer: str
    params: dict[str, Any]
    target: Target
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    axes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    run: Any = field(default=None, repr=False, compare=False)
    """The run this explanation belongs to (its images and provenance), set by :class:`xmllm.Run`
    for display; never saved."""

    def _repr_html_(self) -> str:
        """This explanation's interactive report, inline in a notebook (in its own frame), by the
        renderer the application layer names in :data:`RENDERERS` (the core does not import it)."""
        return html_renderer()(self)

    def add(self, name: str, array: Any, axes: Iterable[str]) -> None:
        """Store an array under ``name`` with one axis name per dimension."""
        arr = np.asarray(array.detach().float().cpu().numpy() if hasattr(array, "detach") else array)
        axes = tuple(axes)
        if arr.ndim != len(axes):
            raise ValueError(f"{self.explainer}: map {name!r} has {arr.ndim} dims but axes {axes}")
        self.maps[name] = arr
        self.axes[name] = axes

    def image_maps(self) -> dict[str, np.ndarray]:
        """The maps over an image's patch grid (last axes row, col)."""
        return {k: v for k, v in self.maps.items() if self.axes[k][-2:] == ("row", "col")}

    def header(self) -> dict[str, Any]:
        """Everything but the arrays, as JSON-ready data."""
        return {
            "format": FORMAT_VERSION,
            "explainer": self.explainer,
            "params": self.params,
            "target": asdict(self.target),
            "axes": {k: list(v) for k, v in self.axes.items()},
            "shapes": {k: list(v.shape) for k, v in self.maps.items()},
            "scores": self.scores,
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> None:
        """Write ``path.npz`` and ``path.json`` atomically (``path`` is a stem: a dotted name
        such as ``run/attention.raw`` keeps its dots; a trailing ``.npz``/``.json`` is dropped)."""
        save_explanations([self], *_pair_paths(path))

    @classmethod
    def load(cls, path: str | Path) -> "Explanation":
        (only,) = load_explanations(*_pair_paths(path))
        return only


def html_renderer(name: str = EXPLANATION_RENDERER) -> Callable[[Any], str]:
    """The HTML renderer registered as ``name`` in the :data:`RENDERERS` entry-point group."""
    from importlib.metadata import entry_points

    found = entry_points(group=RENDERERS, name=name)
    if not found:
        raise LookupError(f"no {RENDERERS!r} entry point named {name!r}: install xmllm (pip install -e .) to render")
    return next(iter(found)).load()


def _pair_paths(path: str | Path) -> tuple[Path, Path]:
    """``stem.npz`` and ``stem.json`` for a stem, appending rather than replacing a suffix."""
    stem = str(path)
    for ext in (".npz", ".json"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return Path(stem + ".npz"), Path(stem + ".json")


def save_explanations(explanations: list[Explanation], npz_path: Path, json_path: Path,
                      extra: dict[str, Any] | None = None) -> None:
    """Many explanations in one ``.npz`` (keys ``explainer/map``) plus one JSON manifest."""
    arrays = {f"{e.explainer}/{name}": arr for e in explanations for name, arr in e.maps.items()}
    manifest = {**(extra or {}), "explanations": [e.header() for e in explanations]}
    atomic(npz_path, lambda fh: np.savez_compressed(fh, **arrays), binary=True)
    atomic(json_path, lambda fh: fh.write(json.dumps(manifest, indent=1, sort_keys=True, default=_json_default)))


def load_explanations(npz_path: Path, json_path: Path) -> list[Explanation]:
    manifest = json.loads(Path(json_path).read_text(encoding="utf-8"))
    out = []
    with np.load(npz_path, allow_pickle=False) as data:
        for head in manifest["explanations"]:
            eid = head["explainer"]
            exp = Explanation(eid, head["params"], Target(**head["target"]), scores=head["scores"], meta=head["meta"])
            for name, axes in head["axes"].items():
                exp.maps[name] = data[f"{eid}/{name}"]
                exp.axes[name] = tuple(axes)
            out.append(exp)
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


