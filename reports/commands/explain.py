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
                   help="an explainer parameter, e.g. perturbation.occlusion.window=2 (repeatable)")
    p.add_argument("--expected", help="the expected answer, if known (recorded in the manifest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: explanations.npz, manifest.json, the image and report.html")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise XmllmError("--question must not be empty")
    from ..runner import needs_attention, parse_params, resolve_explainers, run_explainers

    ids = resolve_explainers([e.strip() for e in args.explainers.split(",") if e.strip()] or None, args.leaf)
    params = parse_params(args.param)
    unknown = sorted(set(params) - set(ids))
    if unknown:
        raise XmllmError(f"--param names explainer {unknown[0]!r}, which is not being run")

    from tqdm import tqdm

    from xmllm.explainers.context import ExplainSample
    from xmllm.explainers.images import load_image
    from xmllm.explainers.models import load_model

    image = load_image(args.image)
    loaded = load_model(args.model, device=args.device, eager_attention=needs_attention(ids))
    sample = ExplainSample([image], args.question, id=args.image.stem, expected=args.expected)
    with tqdm(total=len(ids), desc="explaining", unit="explainer", file=sys.stderr) as bar:
        result = run_explainers(loaded, sample, ids, params, seed=args.seed,
                                progress=lambda eid: (bar.set_postfix_str(eid), bar.update(1)))
    npz, manifest = result.save(args.out)
    print(f"answer: {result.prepared.answer.text!r}")
    print(f"wrote {npz} and {manifest} ({len(ids)} explainers)")
    from ..report import write_report

    print(f"report: {write_report(args.out)}")
    return 0
