"""``xmllm evaluate``: score explainers' image maps against ground truth and a random floor."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .explain import add_memory_option, add_model_options

DEFAULT_OUT = Path("runs/evaluation")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="which explainer to trust: faithfulness and localisation of image maps")
    p.add_argument("--model", default="demo", help="'demo', a local folder or a hub id (default demo)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", type=Path, help="a JSONL sample set (masks give the ground truth)")
    source.add_argument("--demo", type=int, metavar="N", help="N object-grounded questions from the demo world")
    source.add_argument("--demo-pictures", type=int, metavar="N",
                        help="N demo questions over two pictures or a clip's three frames, the evidence in one "
                             "of them (scores image pointing, and the maps within the evidence picture)")
    p.add_argument("--explainers", default="", help="comma-separated explainer ids (default: every sample-level one "
                                                     "with an image map but causal.minimal_set, whose 0/1 set costs "
                                                     "as much as the rest to find)")
    p.add_argument("--param", action="append", default=[], metavar="ID.NAME=VALUE",
                   help="an explainer parameter, overriding the evaluation's defaults (repeatable; VALUE as JSON; 'xmllm explainers ID' lists an explainer's parameters)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo samples, random maps and intervals (default 0)")
    p.add_argument("--baseline", default=None, help="what a removed cell shows: black (default), mean, blur or noise")
    p.add_argument("--steps", type=int, default=None, help="points of the deletion and insertion curves (default 8)")
    p.add_argument("--sanity-samples", type=int, default=None,
                   help="samples for the model-randomisation check (default 10; 0 skips it)")
    add_model_options(p)
    add_memory_option(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output folder: evaluation.json, table.txt, trust.md and its plots (default {DEFAULT_OUT})")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    """The options in the words the user typed, before anything is loaded (the same check as the
    API's, naming the flags)."""
    from xmllm.evaluation.scoring import check_options

    check_options(baseline=args.baseline, steps=args.steps, sanity_samples=args.sanity_samples, demo=args.demo,
                  demo_pictures=args.demo_pictures, out=args.out, flags=True)
    if args.max_memory is not None:
        from xmllm.explainers.memory import parse_memory

        parse_memory(args.max_memory)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    _check(args)

    from ..api import evaluate
    from ..evaluation import RESULT_NAME, TABLE_NAME, text_table
    from ..evaluation.page import PAGE_NAME
    from ..runner import parse_params

    named = [e.strip() for e in args.explainers.split(",") if e.strip()]
    bars: dict[str, tqdm] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if phase not in bars:
            label = "evaluating" if phase == "samples" else "sanity check"
            unit = "sample" if phase == "samples" else "step"
            bars[phase] = tqdm(total=total, desc=label, unit=unit, file=sys.stderr)
        bar = bars[phase]
        bar.update(done - bar.n)

    try:
        result = evaluate(args.model, samples=args.samples, demo=args.demo, demo_pictures=args.demo_pictures,
                          explainers=named or None,
                          params=parse_params(args.param), seed=args.seed, baseline=args.baseline,
                          steps=args.steps, sanity_samples=args.sanity_samples, device=args.device,
                          dtype=args.dtype, max_memory=args.max_memory,
                          progress=progress, out=args.out)
    finally:
        for bar in bars.values():
            bar.close()
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "per_sample"}, indent=1, sort_keys=True))
    else:
        print(text_table(result), end="")
        print(f"wrote {args.out / RESULT_NAME}, {args.out / TABLE_NAME} and {args.out / PAGE_NAME}")
    return 0
