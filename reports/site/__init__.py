"""Generators of the site's pages: the taxonomy, the explainers, the gallery and the case study.

Each generator returns :class:`~xmllm.site.pages.Page` objects (a path under the MkDocs docs
folder and its content) and, where it owns a section of the navigation, the nav entries for it.
Everything that comes from the catalog, the registry or the model is escaped on the way in
(:mod:`xmllm.site.markdown`), so a ``<script>`` in a description shows as text.
"""
from .pages import Page, SiteOutput

__all__ = ["Page", "SiteOutput"]
