"""``xmllm models``: every model type transformers maps to image-text-to-text, how xmllm serves it
(its own adapter, the generic one, or none and why) and what each explainer does on it."""
from __future__ import annotations

import argparse
import json

from xmllm.errors import XmllmError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model families, their adapter and the explainers that run on each")
    p.add_argument("model_type", nargs="?", help="one model type (e.g. qwen3_vl): its explainers and refusals")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--markdown", action="store_true", help="print the README's table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xmllm.explainers.models.coverage import all_families, coverage
    from xmllm.explainers.quiet import route_library_output
    from xmllm.explainers.registry import sample_level_ids

    import transformers  # noqa: F401  (imported first, so that routing reaches its logger)

    route_library_output()  # building every family's config talks; only our lines reach the user
    rows = all_families()
    total = len(sample_level_ids())
    if args.model_type is not None:
        row = next((r for r in rows if r.model_type == args.model_type), None)
        if row is None:
            raise XmllmError(f"unknown model type {args.model_type!r}; run 'xmllm models' to list them")
        if args.json:
            print(json.dumps(row.to_json(), indent=2))
            return 0
        print(_line(row, total))
        for explainer_id, why in sorted(row.refusals.items()):
            print(f"  {explainer_id}: refuses: {why}")
        return 0
    if args.json:
        print(json.dumps({"coverage": coverage(rows).__dict__, "families": [r.to_json() for r in rows]}, indent=2))
        return 0
    if args.markdown:
        print(markdown_table(rows, total))
        return 0
    print(f"{len(rows)} model types (xmllm models TYPE shows one's refusals)")
    for row in rows:
        print("  " + _line(row, total))
    print(coverage(rows).line())
    return 0


def _runs(row, total: int) -> str:
    if row.adapter == "none":
        return "-"
    return f"{total - len(row.refusals)}/{total}"


def _line(row, total: int) -> str:
    tested = "checked on a tiny model" if row.tested else (
        "unchecked: the grid is derived at load and checked against the model's features, or refused in one line"
        if row.adapter == "generic" else "unchecked")
    if row.adapter == "none":
        return f"{row.model_type:<26} none      {row.reason}"
    extra = "; its image processor needs torchvision" if row.needs_torchvision else ""
    return f"{row.model_type:<26} {row.adapter:<9} {_runs(row, total)} explainers run, the others declare why ({tested}{extra})"


def markdown_table(rows, total: int) -> str:
    """The README's model table: one row per model type, and the coverage line under it."""
    from xmllm.explainers.models.coverage import coverage

    lines = ["| model type | adapter | sample-level explainers | checked on a tiny model | note |",
             "| --- | --- | ---: | --- | --- |"]  # fmt: skip
    for row in rows:
        if row.adapter == "none":
            note = row.reason or ""
        else:
            reasons = sorted(set(row.refusals.values()))
            note = "; ".join(f"refused: {r}" for r in reasons)
            if row.needs_torchvision:
                note = ("image processor needs torchvision; " + note).rstrip("; ")
        tested = "yes" if row.tested else ("no (derived and checked at load)" if row.adapter == "generic" else "no")
        lines.append(f"| `{row.model_type}` | {row.adapter} | {_runs(row, total)} | {tested} | {note.replace('|', '/')} |")
    lines.append("")
    lines.append(f"Coverage: {coverage(rows).line()}.")
    return "\n".join(lines)
