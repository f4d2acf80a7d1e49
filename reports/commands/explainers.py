"""``xmllm explainers [ID]``: list the registered explainers, or one explainer's parameters."""
from __future__ import annotations

import argparse
import json

from xmllm.errors import XmllmError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explainers", help="list the explainers, or one explainer's declared parameters")
    p.add_argument("id", nargs="?", help="an explainer id: show its parameters (name, default, values, help)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xmllm.explainers.registry import describe_all

    rows = describe_all()
    if args.id is not None:
        row = next((r for r in rows if r["id"] == args.id), None)
        if row is None:
            raise XmllmError(f"unknown explainer id {args.id!r}; run 'xmllm explainers' to list them")
        if args.json:
            print(json.dumps(row, indent=2))
            return 0
        print(f"{row['id']}: {row['title']} [{row['scope']}]")
        if not row["params"]:
            print("  no parameters")
        for spec in row["params"]:
            print(f"  {spec['name']} = {json.dumps(spec['default'])}  ({spec['type']})\n      {spec['help']}")
        print(f"set one with --param {row['id']}.NAME=VALUE (VALUE as JSON)")
        return 0
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{len(rows)} explainers (xmllm explainers ID shows one's parameters)")
    for r in rows:
        print(f"  {r['id']:<34} {r['title']} [{r['scope']}]")
    return 0
