"""Jinja2 templates of xmllm's reports and site pages, and the MkDocs theme overrides
(``mkdocs/``), shipped as package data and read through :mod:`importlib.resources`."""
from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable


def template_files() -> Traversable:
    """This package's folder of templates (a zip-safe handle, not a path)."""
    return files(__name__)


def read_template(name: str) -> str:
    """The text of one template or asset, e.g. ``report.css``."""
    return template_files().joinpath(name).read_text(encoding="utf-8")
