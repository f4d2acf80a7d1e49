"""``xmllm evaluate``: score explainers' image maps against ground truth and a random floor."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..explainers.errors import XmllmError

DEFAULT_OUT = Path("runs/evaluation")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="which explainer to trust: faithfulness and localisation of image maps")
    p.add_argument("--model", default="demo", help="'demo', a local folder or a hub id (default demo)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", type=Path, help="a JSONL sample set (masks give the ground truth)")
    source.add_argument("--demo", type=int, metavar="N", help="N object-grounded questions from the demo world")
    p.add_argument("--explainers", default="", help="comma-separated explainer ids (default: every sample-level one "
                                                     "with an image map but causal.minimal_set, whose 0/1 set costs "
                                                     "as much as the rest to find)")
    p.add_argument("--param", action="append", default=[], metavar="ID.NAME=VALUE",
                   help="an explainer parameter, overriding the evaluation's defaults (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo samples, random maps and intervals (default 0)")
    p.add_argument("--baseline", default=None, help="what a removed cell shows: black (default), mean, blur or noise")
    p.add_argument("--steps", type=int, default=None, help="points of the deletion and insertion curves (default 8)")
    p.add_argument("--sanity-samples", type=int, default=None,
                   help="samples for the model-randomisation check (default 10; 0 skips it)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output folder: evaluation.json, table.txt, trust.md and its plots (default {DEFAULT_OUT})")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    from xmllm.explainers.methods.perturbation import BASELINES

    if args.baseline is not None and args.baseline not in BASELINES:
        raise XmllmError(f"--baseline {args.baseline!r}: choose from {', '.join(BASELINES)}")
    if args.steps is not None and args.steps < 1:
        raise XmllmError(f"--steps must be a positive integer, got {args.steps}")
    if args.sanity_samples is not None and args.sanity_samples < 0:
        raise XmllmError(f"--sanity-samples must be 0 or more, got {args.sanity_samples}")
    if args.demo is not None and args.demo < 1:
        raise XmllmError(f"--demo must be a positive number of samples, got {args.demo}")
    if args.out.exists() and not args.out.is_dir():
        raise XmllmError(f"--out {args.out}: exists and is not a folder")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from ..evaluation import (
        SANITY_SAMPLES,
        TABLE_NAME,
        EvaluationConfig,
        demo_samples,
        evaluate,
        jsonl_samples,
        save_result,
        text_table,
        write_page,
    )
    from ..runner import needs_attention, parse_params, resolve_explainers

    named = [e.strip() for e in args.explainers.split(",") if e.strip()]
    ids = resolve_explainers(named or None)
    params = parse_params(args.param)
    unknown = sorted(set(params) - set(ids))
    if unknown:
        raise XmllmError(f"--param names explainer {unknown[0]!r}, which is not being run")
    if args.samples is not None:
        samples = jsonl_samples(args.samples)
        source = {"source": "jsonl", "path": str(args.samples)}
    else:
        samples = demo_samples(args.demo, args.seed)
        source = {"source": "demo", "seed": args.seed, "grounded_only": True}

    from tqdm import tqdm

    from xmllm.explainers.models import load_model

    loaded = load_model(args.model, device=args.device, eager_attention=needs_attention(ids))
    config = EvaluationConfig(ids, params, explicit=bool(named), seed=args.seed, baseline=args.baseline,
                              steps=args.steps, sanity_samples=SANITY_SAMPLES if args.sanity_samples is None
                              else args.sanity_samples)
    bars: dict[str, tqdm] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if phase not in bars:
            label = "evaluating" if phase == "samples" else "sanity check"
            unit = "sample" if phase == "samples" else "step"
            bars[phase] = tqdm(total=total, desc=label, unit=unit, file=sys.stderr)
        bar = bars[phase]
        bar.update(done - bar.n)

    try:
        result = evaluate(loaded, samples, config, source, progress)
    finally:
        for bar in bars.values():
            bar.close()
    table = text_table(result)
    path = save_result(result, args.out)
    table_path = args.out / TABLE_NAME
    tmp = table_path.with_name(f".{TABLE_NAME}.tmp")
    tmp.write_text(table, encoding="utf-8")
    tmp.replace(table_path)
    page = write_page(result, args.out)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "per_sample"}, indent=1, sort_keys=True))
    else:
        print(table, end="")
        print(f"wrote {path}, {table_path} and {page}")
    return 0
