"""``xmllm explainers``: list the registered explainers."""
from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explainers", help="list the explainers with their metadata")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xmllm.explainers.registry import describe_all

    rows = describe_all()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    done = sum(r["status"] == "implemented" for r in rows)
    print(f"{done}/{len(rows)} explainers implemented")
    for r in rows:
        mark = "x" if r["status"] == "implemented" else " "
        title = r.get("title", "")
        scope = f" [{r['scope']}]" if "scope" in r else ""
        print(f"  [{mark}] {r['id']:<34} {title}{scope}")
    return 0
