"""xmllm: explain why a vision-language model answered what it did.

One import package, mapped from the repository's folders: ``xmllm`` itself (the public API, the
command line, running explainers, reports, the site, audits and the bench) from ``reports/``,
:mod:`xmllm.explainers` (explainers, models and their adapters, the demo world and model) from
``explainers/``, :mod:`xmllm.catalog` (the survey's taxonomy) from ``catalog/`` and
:mod:`xmllm.templates` from ``templates/``.

Importing ``xmllm`` is cheap: torch and transformers load only when a model is used.
"""
from __future__ import annotations

from typing import Any

from .explainers.errors import XmllmError


def __getattr__(name: str) -> Any:
    """``load_model`` without importing torch at package import."""
    if name == "load_model":
        from .explainers.models import load_model

        return load_model
    raise AttributeError(f"module 'xmllm' has no attribute {name!r}")


__all__ = ["XmllmError", "load_model"]
