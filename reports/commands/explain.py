"""``xmllm explain``: run explainers on one image and question, save arrays, a manifest, the
image and a self-contained HTML report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..explainers.errors import XmllmError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="explain the model's answer to a question about an image")
    p.add_argument("--model", default="demo", help="'demo', a local folder or a hub id (default demo)")
    p.add_argument("--image", type=Path, required=True, help="image file")
    p.add_argument("--question", required=True, help="the question")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--explainers", default="", help="comma-separated explainer ids (default: all sample-level ones)")
    group.add_argument("--leaf", help="a catalog leaf id: run its implemented explainers")
    p.add_argument("--param", action="append", default=[], metavar="ID.NAME=VALUE",
                   help="an explainer parameter, e.g. perturbation.occlusion.window=2 (repeatable; VALUE as JSON; 'xmllm explainers ID' lists an explainer's parameters)")
    p.add_argument("--expected", help="the expected answer, if known (recorded in the manifest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: explanations.npz, manifest.json, the image and report.html")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..api import check_params, explain
    from ..runner import parse_params, resolve_explainers

    if not args.question.strip():
        raise XmllmError("--question must not be empty")
    ids = resolve_explainers([e.strip() for e in args.explainers.split(",") if e.strip()] or None, args.leaf)
    try:
        params = check_params(ids, parse_params(args.param))
    except XmllmError as exc:
        raise XmllmError(f"--param: {exc}") from None
    with tqdm(total=len(ids), desc="explaining", unit="explainer", file=sys.stderr) as bar:
        run = explain(args.model, args.image, args.question, ids, params=params, seed=args.seed,
                      expected=args.expected, device=args.device,
                      progress=lambda eid: (bar.set_postfix_str(eid), bar.update(1)))
    folder = run.save(args.out)
    print(f"answer: {run.answer.get('text', '')!r}")
    print(f"wrote {folder / 'explanations.npz'} and {folder / 'manifest.json'} ({len(ids)} explainers)")
    print(f"report: {folder / 'report.html'}")
    return 0
