"""The catalog joined with the explainer registry: which leaves its explainers cover."""
from __future__ import annotations

from typing import Any

from .schema import Catalog, Leaf


def _status(explainer_id: str) -> str:
    from xmllm.explainers.registry import status

    return status(explainer_id)


def leaf_rows(cat: Catalog) -> list[dict[str, Any]]:
    """One flat record per leaf; ``path`` runs from the perspective's name to the leaf's."""
    return [
        {
            "id": leaf.id,
            "name": leaf.name,
            "path": path,
            "explainers": [{"id": e, "status": _status(e)} for e in leaf.explainers],
        }
        for path, leaf in cat.iter_leaves()
    ]


def is_covered(leaf: Leaf) -> bool:
    """A leaf is covered once any one of its explainers is implemented."""
    return any(_status(e) == "implemented" for e in leaf.explainers)


def coverage(cat: Catalog) -> dict[str, int]:
    """Leaves covered and explainers implemented (out of every registered one)."""
    from xmllm.explainers.registry import describe_all

    rows = describe_all()
    leaves = cat.leaves()
    return {
        "leaves_covered": sum(is_covered(leaf) for leaf in leaves),
        "leaves_total": len(leaves),
        "explainers_implemented": sum(r["status"] == "implemented" for r in rows),
        "explainers_total": len(rows),
        "explainer_ids_used": len({e for leaf in leaves for e in leaf.explainers}),
    }


def json_view(cat: Catalog) -> dict[str, Any]:
    """The validated catalog as plain data, plus the flat ``leaves`` list and ``coverage``."""
    data = cat.model_dump(mode="json", exclude_none=True)
    data["leaves"] = leaf_rows(cat)
    data["coverage"] = coverage(cat)
    return data
