"""``xmllm demo samples|train|eval``: the synthetic world and the embedded demo model."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xmllm.errors import XmllmError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the synthetic shape world and the embedded demo model")
    demo = p.add_subparsers(dest="demo_command", metavar="ACTION", required=True)

    s = demo.add_parser("samples", help="write a sample set (samples.jsonl + PNGs) from the shape world")
    s.add_argument("--n", type=int, default=100, help="number of samples (default 100)")
    s.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--question-types", default="",
                   help="comma-separated question types, e.g. colour,count or motion,which_picture; 'pictures' "
                        "stands for the four over several pictures and clips (default: the five single-image ones)")
    s.add_argument("--pairs", action="store_true",
                   help="add an MMVP-style partner for each sample (one detail changed, answer changed)")
    s.add_argument("--counterfactuals", action="store_true",
                   help="add recolour/move/remove/rephrase edits of each sample")
    s.set_defaults(func=run_samples)

    t = demo.add_parser("train", help="train the demo model on the CPU (reproducible)")
    t.add_argument("--out", type=Path, default=Path("runs/demo-model"),
                   help="folder for final/ and early/ checkpoints (default runs/demo-model)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--vision-steps", type=int, default=None, help="vision pretraining steps")
    t.add_argument("--answer-steps", type=int, default=None, help="answer training steps of the first cycle")
    t.add_argument("--restart-steps", type=int, default=None,
                   help="answer training steps of the warm-restart cycle (default 3000; 0: one cycle)")
    t.add_argument("--batch", type=int, default=None)
    t.set_defaults(func=run_train)

    e = demo.add_parser("eval", help="exact-match accuracy per question type on fresh samples")
    e.add_argument("--model", default="demo", help="model spec (default: the embedded demo model)")
    e.add_argument("--n", type=int, default=1000, help="number of single-image samples (default 1000)")
    e.add_argument("--pictures", type=int, default=None,
                   help="number of samples over two pictures or a clip's three frames (default: as many as --n)")
    e.add_argument("--seed", type=int, default=12345, help="world seed (default 12345)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=run_eval)


def _positive(value: int, name: str) -> int:
    if value <= 0:
        raise XmllmError(f"--{name} must be a positive integer, got {value}")
    return value


def run_samples(args: argparse.Namespace) -> int:
    from xmllm.explainers.demo.questions import ALL_QUESTION_TYPES
    from xmllm.explainers.demo.samples import (PICTURE_TYPE_NAMES, counterfactuals, generate_samples, make_pair,
                                               write_sample_set)

    n = _positive(args.n, "n")
    named = [t.strip() for t in args.question_types.split(",") if t.strip()]
    question_types = [x for t in named for x in (PICTURE_TYPE_NAMES if t == "pictures" else (t,))] or None
    for t in question_types or ():
        if t not in ALL_QUESTION_TYPES:
            raise XmllmError(f"--question-types: unknown question type {t!r}; "
                             f"choose from {', '.join(ALL_QUESTION_TYPES)} (or pictures: the last four)")
    samples = generate_samples(n, args.seed, question_types)
    out = list(samples)
    if args.pairs:
        out = []
        for s in samples:
            partner = make_pair(s, args.seed)
            out.extend([s, partner] if partner else [s])
    if args.counterfactuals:
        out = [x for s in out for x in (s, *counterfactuals(s, args.seed))]
    path = write_sample_set(out, args.out)
    print(f"wrote {len(out)} samples to {path}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from xmllm.explainers.demo.train import TrainConfig, train

    cfg = TrainConfig(seed=args.seed)
    if args.vision_steps is not None:
        cfg.vision_steps = _positive(args.vision_steps, "vision-steps")
    if args.answer_steps is not None:
        cfg.qa_steps = _positive(args.answer_steps, "answer-steps")
        cfg.early_step = min(cfg.early_step, cfg.qa_steps)
    if args.restart_steps is not None:
        if args.restart_steps < 0:
            raise XmllmError(f"--restart-steps must be 0 or more, not {args.restart_steps}")
        cfg.restart_steps = args.restart_steps
    if args.batch is not None:
        cfg.batch = _positive(args.batch, "batch")
    result = train(args.out, cfg, log=lambda line: print(line, flush=True))
    print(f"trained in {result['seconds']:.0f}s; checkpoints in {args.out}/final and {args.out}/early")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from xmllm.explainers.demo.evaluate import evaluate
    from xmllm.explainers.models import load_model

    pictures = args.n if args.pictures is None else args.pictures
    if pictures < 0:
        raise XmllmError(f"--pictures must be 0 or more, got {pictures}")
    loaded = load_model(args.model)
    report = evaluate(loaded, _positive(args.n, "n"), args.seed, progress=sys.stderr.isatty() or True,
                      pictures=pictures)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    lo, hi = report["interval"]
    print(f"model {args.model}: {report['accuracy']:.1%} exact match on {report['n']} samples "
          f"(seed {args.seed}; 95% CI {lo:.1%}-{hi:.1%})")
    for group, r in report.get("groups", {}).items():
        print(f"  {group + ' total':<16} {r['accuracy']:.1%}  (n={r['n']})")
    for qtype, r in report["question_types"].items():
        print(f"  {qtype:<16} {r['accuracy']:.1%}  (n={r['n']})")
    return 0
