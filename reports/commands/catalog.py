"""``xmllm catalog``: the survey's taxonomy with per-leaf explainer coverage.

Imports of the catalog (pydantic, yaml) happen inside :func:`run` so that ``xmllm --help``
stays fast; nothing here imports torch.
"""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xmllm.catalog import Leaf


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("catalog", help="show the survey taxonomy and which explainers cover it")
    p.add_argument("--json", action="store_true", help="print the validated catalog as JSON")
    p.add_argument("--check", metavar="FILE", help="validate FILE instead of showing the packaged catalog")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xmllm.catalog import coverage, is_covered, json_view

    from ..api import catalog

    cat = catalog(args.check)
    if args.json:
        print(json.dumps(json_view(cat), indent=2, ensure_ascii=False))
        return 0
    cov = coverage(cat)
    if args.check:
        print(f"{args.check}: ok ({cov['leaves_total']} leaves, {cov['explainer_ids_used']} explainer ids)")
        return 0

    from xmllm.explainers.registry import status

    s = cat.survey
    print(f"{s.title}\n{s.authors}, {s.year}, arXiv {s.arxiv}\n")

    def show(leaf: Leaf, indent: str) -> None:
        done = sum(status(e) == "implemented" for e in leaf.explainers)
        mark = "x" if is_covered(leaf) else " "
        print(f"{indent}[{mark}] {leaf.name:<{28 - len(indent)}} {leaf.id:<32} [{done}/{len(leaf.explainers)} implemented]")

    for p in cat.perspectives:
        print(f"{p.name}  ({p.id})")
        for leaf in p.leaves:
            show(leaf, "  ")
        for g in p.children:
            print(f"  {g.name}")
            for leaf in g.leaves:
                show(leaf, "    ")
    print(
        f"\nLeaves covered: {cov['leaves_covered']}/{cov['leaves_total']}"
        f" · explainers implemented: {cov['explainers_implemented']}/{cov['explainers_total']}"
    )
    return 0
