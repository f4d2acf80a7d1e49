"""Example runs for the site: one run folder per explainer, made by a builder chosen by what it needs.

A builder is registered with :func:`example_builder` under a need (a
:class:`~xmllm.explainers.registry.Need`, say ``Need.CHECKPOINTS``: every explainer that needs that
kind of input) or a scope (``"sample"``, ``"dataset"``: the default for every explainer of that
scope). :func:`builder_for` picks the builder of the first need that has one, then the scope's.
Every module in this package is imported on first use, so a new builder is a new module here
with a decorated function; nothing else changes.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.registry import Explainer

    from ..session import ModelSession


@dataclass(frozen=True)
class ExampleRun:
    """A run folder (``manifest.json`` + ``explanations.npz`` + images) and whether it came from the cache."""

    run_dir: Path
    cached: bool


class ExampleSkipped(Exception):
    """Raised by a builder when this model has no example of the explainer (say, no second
    checkpoint to compare with): the page says why, and the build is not failed for it."""


ExampleBuilder = Callable[["ModelSession", "type[Explainer]"], ExampleRun]
_BUILDERS: dict[str, ExampleBuilder] = {}
_LOADED = False


def example_builder(key: str) -> Callable[[ExampleBuilder], ExampleBuilder]:
    """Register the decorated function as the example builder for a need or a scope."""

    def register(fn: ExampleBuilder) -> ExampleBuilder:
        if key in _BUILDERS and _BUILDERS[key] is not fn:
            raise ValueError(f"an example builder for {key!r} is already registered ({_BUILDERS[key].__name__})")
        _BUILDERS[key] = fn
        return fn

    return register


def _load() -> None:
    global _LOADED
    if not _LOADED:
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True


def builder_for(cls: "type[Explainer]") -> ExampleBuilder | None:
    """The builder for this explainer: its first need's (in sorted order) that has one, else its
    scope's; None when there is none."""
    _load()
    for need in sorted(need.value for need in cls.needs):
        if need in _BUILDERS:
            return _BUILDERS[need]
    return _BUILDERS.get(cls.scope)


