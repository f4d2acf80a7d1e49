"""xmllm: explain why a vision-language model answered what it did.

One import package, mapped from the repository's folders: ``xmllm`` itself (the public API, the
command line, running explainers, reports, the site, audits and the bench) from ``reports/``,
:mod:`xmllm.explainers` (explainers, models and their adapters, the demo world and model) from
``explainers/``, :mod:`xmllm.catalog` (the survey's taxonomy) from ``catalog/`` and
:mod:`xmllm.templates` from ``templates/``.

Importing ``xmllm`` is cheap: torch and transformers load only when a model is used.

The root package is also the foundation every layer stands on: the error type and its kinds
(:mod:`xmllm.errors`) and whole-or-nothing writes (:mod:`xmllm.files`) are importable from here,
so the core (:mod:`xmllm.explainers`) imports ``xmllm`` itself and nothing of the application
layer. The other utilities every layer uses (``safe_yaml``, ``images``, ``samples``,
``allocator``) are modules of this package.
"""
from __future__ import annotations

from typing import Any

from .errors import MissingInput, XmllmError
from .files import atomic, write_atomic  # noqa: F401  (the foundation the core imports from here)

_API = {
    "load_model": "xmllm.api",
    "explain": "xmllm.api",
    "load_run": "xmllm.api",
    "evaluate": "xmllm.api",
    "audit": "xmllm.api",
    "catalog": "xmllm.catalog",  # the package itself, callable: xmllm.catalog() loads the taxonomy
    "Run": "xmllm.report.explained",
    "Explanation": "xmllm.explainers.explanation",
}


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (so ``import xmllm`` stays cheap)."""
    import importlib

    if name == "catalog":
        return importlib.import_module(_API[name])
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'xmllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["XmllmError", "MissingInput", *_API]
