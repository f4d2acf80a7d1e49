"""The survey's taxonomy (Dang, Huang et al., arXiv 2412.02104) as a validated catalog
that links each leaf to the explainers that put it into practice.

This package is also callable: ``xmllm.catalog()`` returns the validated packaged catalog
(``xmllm.catalog(path)`` another file), the API's spelling of :func:`load_catalog`.
"""
import sys
import types
from .loader import DEFAULT_PATH, CatalogError, load_catalog
from .schema import Catalog, Group, Leaf, Method, Perspective, Survey, Terms
from .view import coverage, is_covered, json_view, leaf_rows



class _CallablePackage(types.ModuleType):
    """The package's module type: calling ``xmllm.catalog(path=None)`` loads a catalog."""

    def __call__(self, path=None) -> Catalog:
        return load_catalog(path)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = [
    "DEFAULT_PATH",
    "Catalog",
    "CatalogError",
    "Group",
    "Leaf",
    "Method",
    "Perspective",
    "Survey",
    "Terms",
    "coverage",
    "is_covered",
    "json_view",
    "leaf_rows",
    "load_catalog",
]
