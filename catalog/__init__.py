"""The survey's taxonomy (Dang, Huang et al., arXiv 2412.02104) as a validated catalog
that links each leaf to the explainers that put it into practice."""
from .loader import DEFAULT_PATH, CatalogError, load_catalog
from .schema import Catalog, Group, Leaf, Method, Perspective, Survey, Terms
from .view import coverage, is_covered, json_view, leaf_rows

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
