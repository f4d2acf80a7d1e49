"""``xmllm run CONFIG.yaml``: audit a model over a sample set (see :mod:`xmllm.audit`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .explain import add_dispatch_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="audit a model over a sample set: per-sample reports, a summary, a site section")
    p.add_argument("config", type=Path, help="the audit's YAML config (see reports/examples/audit/demo.yaml)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the config's 'output', "
                                                          "relative to the config file)")
    p.add_argument("--executor", choices=("local", "ray"), default=None, help="where samples run (default: the config's)")
    p.add_argument("--ray-address", default=None, help="a Ray cluster's address (default: start a local instance)")
    p.add_argument("--workers", type=int, default=None, help="Ray actors, one model each (default: as resources allow)")
    p.add_argument("--limit", type=int, default=None, help="audit only the first N samples")
    p.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="tensor memory each explainer may add, e.g. 20GB (default: the config's, else the device's)")
    add_dispatch_options(p)
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="the generated answers' token limit (default: the config's, else the model's)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing sample")
    p.add_argument("--retry-failed", action="store_true", help="recompute samples that failed in an earlier run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import audit

    overrides = {}
    if args.executor:
        overrides["executor.kind"] = args.executor
    if args.ray_address:
        overrides["executor.address"] = args.ray_address
        overrides.setdefault("executor.kind", "ray")
    if args.workers is not None:
        overrides["executor.workers"] = args.workers
    if args.limit is not None:
        overrides["limit"] = args.limit
    if args.max_new_tokens is not None:
        overrides["max_new_tokens"] = args.max_new_tokens
    if args.max_memory is not None:
        overrides["max_memory"] = args.max_memory
    if args.device_map is not None:  # checked with the config (field device_map, ...)
        overrides["device_map"] = args.device_map
    if args.device_memory is not None:
        overrides["device_memory"] = args.device_memory
    if args.offload_folder is not None:  # relative to where the command runs, not to the config
        overrides["offload_folder"] = str(args.offload_folder.expanduser().resolve())
    outcome = audit(args.config, args.out, overrides=overrides, fail_fast=args.fail_fast,
                    retry_failed=args.retry_failed, progress=not args.no_progress)
    rate = outcome.computed / outcome.seconds if outcome.seconds > 0 else 0.0
    print(f"audited {outcome.total} samples in {outcome.seconds:.1f}s: {outcome.computed} computed "
          f"({rate:.2f}/s on {outcome.executor.get('executor', 'local')}), {outcome.reused} reused, "
          f"{outcome.failed} failed, {outcome.flagged} flagged")
    print(f"summary: {outcome.summary}")
    return 0
