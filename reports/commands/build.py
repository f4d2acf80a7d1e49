"""``xmllm build``: example reports, the case study, the catalog pages and the MkDocs site."""
from __future__ import annotations

import argparse
from pathlib import Path

from xmllm.errors import XmllmError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..build import DEFAULT_OUT

    p = sub.add_parser("build", help="build the site: example reports, case study, catalog pages, MkDocs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default public/)")
    p.add_argument("--model", default="demo", help="'demo', a local folder or a hub id (default demo)")
    p.add_argument("--pairs", type=int, default=100, help="MMVP-style pairs in the case study (default 100)")
    p.add_argument("--seed", type=int, default=None, help="world seed of the case study's pairs")
    p.add_argument("--explainers", default="",
                   help="comma-separated explainer ids to make examples of (default: every implemented one)")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache folder (default $XMLLM_CACHE_DIR, else ~/.cache/xmllm)")
    p.add_argument("--no-cache", action="store_true", help="compute every result afresh")
    p.add_argument("--quick", action="store_true",
                   help="run no model: catalog, explainer and static pages only (for editing the site)")
    p.add_argument("--evaluation", type=Path, default=None, metavar="JSON",
                   help="an evaluation.json of 'xmllm evaluate': adds the 'Which explainer to trust' page")
    p.add_argument("--audit", type=Path, action="append", default=[], metavar="DIR",
                   help="an output folder of 'xmllm run': its pages join the site under Audits (repeatable)")
    p.add_argument("--config", type=Path, default=None,
                   help="an MkDocs config with its docs_dir of hand-written pages (default: xmllm's own)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..build import BuildOptions, build_site
    from ..cache import default_cache_dir

    if args.pairs < 1:
        raise XmllmError(f"--pairs must be a positive integer, got {args.pairs}")
    wanted = [e.strip() for e in args.explainers.split(",") if e.strip()] or None
    summary = build_site(BuildOptions(
        out=args.out, config=args.config, model=args.model, pairs=args.pairs, seed=args.seed,
        cache=args.cache or default_cache_dir(), use_cache=not args.no_cache, explainers=wanted, quick=args.quick, device=args.device,
        evaluation=args.evaluation, audits=args.audit,
    ))
    for warning in summary.warnings:
        print(f"mkdocs warning: {warning}")
    for eid, message in summary.skipped.items():
        print(f"example {eid} skipped: {message}")
    for eid, message in summary.failures.items():
        print(f"example {eid} failed: {message}")
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in summary.steps.items())
    print(f"built {summary.out} in {summary.seconds:.1f}s ({steps}); {summary.pages} generated pages, "
          f"{summary.examples} example reports; cache: {summary.cache_hits} reused, {summary.cache_misses} computed"
          f"{'; model loaded' if summary.model_loaded else '; model not loaded'}"
          f"{'; site unchanged, MkDocs skipped' if summary.mkdocs_skipped else ''}")
    return 1 if summary.failures else 0
