"""Explainers are classes registered by id (Inseq-style); the catalog resolves ids here.

An explainer declares its metadata as class attributes (Quantus-style) and overrides one
entry point, ``explain`` (Captum-style). Registration happens at import of the module that
defines the class; :func:`load_builtin_explainers` imports every built-in module.
"""
from __future__ import annotations

import enum
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

Scope = Literal["sample", "dataset"]


class Need(str, enum.Enum):
    """What an explainer requires from the model or the data, so callers can prepare it."""

    ATTENTION = "attention"  # eager attention weights
    GRADIENTS = "gradients"  # a backward pass through the model
    PAIR = "pair"  # a counterfactual partner sample
    LABELLED_SET = "labelled_set"  # a sample set with ground-truth attributes
    CHECKPOINTS = "checkpoints"  # two checkpoints of one model


@dataclass(frozen=True)
class Citation:
    """A paper an explainer implements or follows."""

    title: str
    year: int
    arxiv: str | None = None
    authors: str = ""


class Explainer:
    """Base class: subclasses set the metadata and implement :meth:`explain`."""

    id: ClassVar[str]
    title: ClassVar[str]
    family: ClassVar[str]
    scope: ClassVar[Scope] = "sample"
    needs: ClassVar[frozenset[Need]] = frozenset()
    citations: ClassVar[tuple[Citation, ...]] = ()
    summary: ClassVar[str] = ""

    def explain(self, model: Any, sample: Any, **params: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement explain()")


_REGISTRY: dict[str, type[Explainer]] = {}

BUILTIN_PACKAGE = "xmllm.explainers.methods"
"""Every module in this package defines built-in explainers (discovered, not listed)."""


class RegistryError(ValueError):
    """A registration or look-up that cannot be honoured."""


def register(cls: type[Explainer]) -> type[Explainer]:
    """Class decorator: add ``cls`` to the registry under ``cls.id``."""
    for attr in ("id", "title", "family"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise RegistryError(f"explainer class {cls.__name__} must set a non-empty {attr!r}")
    if cls.scope not in ("sample", "dataset"):
        raise RegistryError(f"explainer {cls.id}: scope must be 'sample' or 'dataset', not {cls.scope!r}")
    existing = _REGISTRY.get(cls.id)
    if existing is not None and existing is not cls:
        raise RegistryError(f"explainer id {cls.id!r} is already registered by {existing.__name__}")
    _REGISTRY[cls.id] = cls
    return cls


_LOADED = False


def load_builtin_explainers() -> None:
    """Import every built-in explainer module so that their classes register (once)."""
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module(BUILTIN_PACKAGE)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")
    _LOADED = True


def registered() -> dict[str, type[Explainer]]:
    """All registered explainers, built-ins included, by id."""
    load_builtin_explainers()
    return dict(sorted(_REGISTRY.items()))


def sample_level_ids() -> list[str]:
    """Ids of the explainers that explain one sample (not a sample set), sorted."""
    return [eid for eid, cls in registered().items() if cls.scope == "sample"]


def get_explainer(explainer_id: str) -> type[Explainer]:
    """The class registered under ``explainer_id``; a one-line error otherwise."""
    table = registered()
    if explainer_id in table:
        return table[explainer_id]
    raise RegistryError(f"unknown explainer id {explainer_id!r}; run 'xmllm explainers' to list them")


def status(explainer_id: str) -> Literal["implemented", "unknown"]:
    """Whether an id is registered (implemented) or unknown."""
    return "implemented" if explainer_id in registered() else "unknown"


def describe_all() -> list[dict[str, Any]]:
    """One record per registered explainer, for ``xmllm explainers``."""
    rows: list[dict[str, Any]] = []
    for eid, cls in registered().items():
        rows.append(
            {
                "id": eid,
                "status": "implemented",
                "title": cls.title,
                "family": cls.family,
                "scope": cls.scope,
                "needs": sorted(n.value for n in cls.needs),
                "summary": cls.summary,
                "citations": [
                    {"title": c.title, "year": c.year, "arxiv": c.arxiv, "authors": c.authors}
                    for c in cls.citations
                ],
            }
        )
    return rows
