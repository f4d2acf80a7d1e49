"""``xmllm bench``: what explaining costs, as ratios measured side by side in one run.

Every module of :mod:`xmllm.bench` with a ``cases(ctx)`` function is a case (discovered, not
listed): attention capture, relevancy and occlusion against the ways they replace, each
sample-level explainer against a plain greedy ``generate`` of the same answer, and any case added
later. They run on the model chosen with ``--model`` and, unless ``--no-large``, on a larger
random LLaVA-shaped model (576 image tokens) built for the run, to show how costs scale.

``--scale`` runs another section instead: every sample-level explainer's peak memory on
real-width LLaVA-1.5-7B/-13B, LLaVA-NeXT-7B, Qwen2-VL-7B and Idefics3-8B configurations, measured
at a few decoder blocks and projected to the published depth plus the weights
(:mod:`xmllm.bench.scale`); ``--device cuda`` measures it with the GPU's allocator.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import pkgutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from xmllm.errors import XmllmError

PROGRESS_WIDTH = 100


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure explainers' time and memory as ratios, side by side in one run")
    p.add_argument("--model", default="demo", help="'demo', a local folder or a hub id (default demo)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON to stdout")
    p.add_argument("--quick", action="store_true", help="small sizes and one round (for tests and smoke runs)")
    p.add_argument("--only", metavar="SUBSTRING",
                   help="run only the cases, and explainers, whose name contains SUBSTRING")
    p.add_argument("--repeat", type=int, default=3, metavar="N", help="timed rounds per comparison (default 3)")
    p.add_argument("--no-large", action="store_true", help="skip the large random 576-image-token model")
    p.add_argument("--scale", action="store_true",
                   help="instead of the cases: every sample-level explainer's peak memory on real-width LLaVA-1.5-7B/"
                        "13B, LLaVA-NeXT-7B, Qwen2-VL-7B, Idefics3-8B, Qwen2.5-VL-7B, InternVL3.5-8B and "
                        "LLaVA-OneVision-7B configs, projected to full depth against 24/48/80 GB GPUs, with each "
                        "run's cost in forward-equivalents and the recomputed run of every explainer that "
                        "differentiates (with --only: the runs whose key contains one of its comma-separated "
                        "substrings, e.g. 'relevancy,@recompute')")
    p.add_argument("--configs", metavar="NAMES",
                   help="with --scale: comma-separated configs (default all: "
                        "llava-1.5-7b,llava-1.5-13b,llava-next-7b,qwen2-vl-7b,idefics3-8b,qwen2.5-vl-7b,"
                        "internvl3.5-8b,llava-onevision-7b)")
    p.add_argument("--no-recompute", action="store_true",
                   help="with --scale: leave out the recomputed runs (recompute=True) of the explainers that "
                        "differentiate")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="with --scale: measure nothing; merge the JSON of earlier --scale --json runs (a later "
                        "file's row replaces an earlier one's) and print the table, or with --json the merged report")
    p.add_argument("--markdown", action="store_true",
                   help="with --scale: print the table as Markdown (the README's), placements below it")
    p.add_argument("--growth", action="store_true",
                   help="with --scale: instead of the table, fit each explainer's projected peak memory and "
                        "forward-equivalents against answer length (32, 128, 512 tokens) and image tokens "
                        "(576, 2,916, 8,100) on one config (--configs, default llava-1.5-7b; LLaVA-style only), "
                        "and what a 500-token description costs")
    p.set_defaults(func=run)


# --- the cases --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A discovered benchmark module and the names ``--only`` matches it by."""

    name: str
    module: ModuleType

    @property
    def groups(self) -> list[str]:
        """What the case measures: its ``groups()``, its ``GROUP``, or its name."""
        listed = getattr(self.module, "groups", None)
        if callable(listed):
            return list(listed())
        group = getattr(self.module, "GROUP", None)
        return [group] if isinstance(group, str) else [self.name]

    def matches(self, only: str | None) -> bool:
        return not only or only in self.name or any(only in g for g in self.groups)


def discover() -> list[Case]:
    """Every module of :mod:`xmllm.bench` that defines ``cases(ctx)``, in name order."""
    from .. import bench

    found = []
    for info in sorted(pkgutil.iter_modules(bench.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{bench.__name__}.{info.name}")
        if callable(getattr(module, "cases", None)):
            found.append(Case(info.name, module))
    return found


def run_cases(cases: list[Case], ctx: Any) -> tuple[list[tuple[str, Any]], dict[str, float]]:
    """(case name, row) for every row of every case, and each case's wall seconds; a progress
    bar on stderr."""
    from tqdm import tqdm

    rows: list[tuple[str, Any]] = []
    seconds: dict[str, float] = {}
    with tqdm(total=len(cases), desc="bench", unit="case", file=sys.stderr, ncols=PROGRESS_WIDTH) as bar:
        for case in cases:
            bar.set_postfix_str(case.name)
            # A case picked by its own name runs whole; otherwise it measures what --only names.
            whole = not ctx.only or ctx.only in case.name
            sub = replace(ctx, only=None if whole else ctx.only, progress=bar.set_postfix_str)
            start = time.perf_counter()
            rows += [(case.name, row) for row in case.module.cases(sub)]
            seconds[case.name] = round(time.perf_counter() - start, 3)
            bar.update(1)
    return rows, seconds


# --- the models -------------------------------------------------------------------------------------


def load_models(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from xmllm.explainers.models import load_model

    from ..bench.models import LARGE, MAIN, load_large

    models = {MAIN: load_model(args.model, device=args.device, eager_attention=True)}
    if not args.no_large:
        models[LARGE] = load_large(scratch / LARGE, device=args.device)
    return models


def describe(models: dict[str, Any], spec: str) -> dict[str, Any]:
    from ..bench.models import MAIN

    out = {}
    for label, loaded in models.items():
        config = loaded.model.config
        text = getattr(config, "text_config", config)
        out[label] = {"spec": spec if label == MAIN else "random LLaVA (reports/bench/models.py)",
                      "model_type": config.model_type, "layers": getattr(text, "num_hidden_layers", None),
                      "hidden_size": getattr(text, "hidden_size", None), "dtype": str(loaded.dtype).replace("torch.", ""),
                      "device": str(loaded.device),
                      "parameters": sum(p.numel() for p in loaded.model.parameters())}
    return out


# --- output -----------------------------------------------------------------------------------------


def explainer_summary(rows: list[Any]) -> dict[str, dict[str, Any]]:
    """Per explainer: its time and peak-memory ratios to plain greedy generate, and the figures."""
    from ..bench.explainer_costs import MEMORY, TIME

    names = {TIME: ("time_ratio", "seconds", "generate_seconds"),
             MEMORY: ("memory_ratio", "peak_bytes", "generate_peak_bytes")}
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.metric not in names:
            continue
        ratio, ours, reference = names[row.metric]
        entry = out.setdefault(row.group, {"model": row.model})
        entry[ratio] = row.to_json()["value"]
        entry[ours] = row.ours
        entry[reference] = row.reference
        if "error" in row.details:
            entry["error"] = row.details["error"]
    return out


def _amount(value: float | None, unit: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if unit == "B":
        for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.1f} {name}"
        return f"{value:.0f} B"
    if unit == "s":
        return f"{value:.3g} s"
    return f"{value:.4g}"


def _figures(row: dict[str, Any]) -> list[str]:
    """ours, reference, ratio cells; a figure measured without a reference (a number of seconds or
    minutes, not a ratio) shows in the ours column."""
    if row["ours"] is None and row["reference"] is None:
        return [_amount(row["value"], row["unit"]), "-", "-"]
    return [_amount(row["ours"], row["unit"]), _amount(row["reference"], row["unit"]), _ratio(_num(row["value"]))]


def _ratio(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "error"


def _verdict(ok: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "-"}[ok]


def _table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rows = [header, ["-" * w for w in widths], *lines]
    return "\n".join(fmt.format(*row).rstrip() for row in rows)


def render(report: dict[str, Any]) -> str:
    """The report as text: the models, a table of the cases' ratios, one of the explainers'."""
    from ..bench.explainer_costs import MEMORY, TIME

    parts = [f"xmllm bench on {report['device']} ({report['threads']} threads; allocator: {report['allocator']})"]
    for label, info in report["models"].items():
        parts.append(f"  {label}: {info['spec']} ({info['model_type']}, {info['layers']} layers, "
                     f"{info['parameters'] / 1e6:.1f}M parameters, {info['dtype']})")
    cases = [r for r in report["rows"] if r["metric"] not in (TIME, MEMORY)]
    if cases:
        parts += ["", _table(["case", "model", "ours", "reference", "ratio", "target", "result"],
                             [[f"{r['group']}: {r['metric']}", r["model"], *_figures(r), r["target"] or "-",
                               _verdict(r["ok"])] for r in cases])]
    summary = report["explainers"]
    if summary:
        lines = [[eid, e["model"], _ratio(_num(e.get("time_ratio"))), _ratio(_num(e.get("memory_ratio"))),
                  _amount(e.get("seconds"), "s"), _amount(e.get("generate_seconds"), "s"),
                  _amount(e.get("peak_bytes"), "B"), _amount(e.get("generate_peak_bytes"), "B"),
                  e.get("error", "")]
                 for eid, e in summary.items()]
        parts += ["", "explainers against a plain greedy generate of the same answer:",
                  _table(["explainer", "model", "time ratio", "memory ratio", "explain", "generate",
                          "explain peak", "generate peak", "error"], lines)]
    met, missed = report["targets"]["met"], report["targets"]["missed"]
    parts += ["", f"targets met: {met} of {met + missed}" + (f" (missed: {', '.join(report['targets']['which'])})"
                                                           if missed else "")]
    return "\n".join(parts)


def _num(value: float | None) -> float:
    return float("nan") if value is None else float(value)


# --- the command ------------------------------------------------------------------------------------


def run_scale(args: argparse.Namespace) -> int:
    """``--scale``: the real-width memory table (:mod:`xmllm.bench.scale`)."""
    from tqdm import tqdm

    from xmllm.explainers.models import resolve_device
    from xmllm.explainers.registry import sample_level_ids

    from ..bench.scale import markdown, render, run_keys, run_scale as measure_scale, selected
    from ..bench.scale_configs import CONFIGS

    show = markdown if args.markdown else render
    if args.merge:
        report = merged(args.merge)
        print(json.dumps(report, indent=2, allow_nan=False) if args.json else show(report))
        return 0

    known = [c.name for c in CONFIGS]
    names = [n.strip() for n in args.configs.split(",") if n.strip()] if args.configs else None
    unknown = [n for n in names or [] if n not in known]
    if unknown or names == []:
        raise XmllmError(f"--configs {args.configs!r}: unknown {', '.join(unknown) or 'empty list'}; "
                         f"known: {', '.join(known)}")
    if args.only and not any(selected(key, args.only) for key in run_keys(sample_level_ids())):
        raise XmllmError(f"--only {args.only!r} matches no sample-level explainer or recomputed run")
    device = resolve_device("cpu" if args.device == "auto" else args.device)
    if device.type not in ("cpu", "cuda"):
        raise XmllmError(f"--device {args.device!r}: --scale measures on cpu (free arithmetic) or cuda (the allocator)")
    if args.growth:
        from ..bench.scale_costs import GROWTH_FAMILIES

        if len(names or []) > 1:
            raise XmllmError(f"--growth fits one config; --configs {args.configs!r} names {len(names)}")
        growth_config = (names or ["llava-1.5-7b"])[0]
        family = next(c.model_type for c in CONFIGS if c.name == growth_config)
        if family not in GROWTH_FAMILIES:
            raise XmllmError(f"--growth resizes a LLaVA-style vision tower; {growth_config!r} is {family}")
    with tqdm(desc="bench --scale", unit="run", file=sys.stderr, ncols=PROGRESS_WIDTH) as bar:
        def tell(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)

        if args.growth:
            from ..bench.scale_costs import render_growth, run_growth

            report = run_growth(growth_config, args.only, device, tell, recompute=not args.no_recompute)
            print(json.dumps(report, indent=2, allow_nan=False) if args.json else render_growth(report))
            return 0
        report = measure_scale(names, args.only, device, tell, recompute=not args.no_recompute)
    print(json.dumps(report, indent=2, allow_nan=False) if args.json else show(report))
    return 0


def merged(paths: list[str]) -> dict[str, Any]:
    """The ``--merge`` report of the JSON files at ``paths`` (a bad file is one error line naming it)."""
    from ..bench.scale import merge

    reports = []
    for path in paths:
        try:
            reports.append((path, json.loads(Path(path).read_text(encoding="utf-8"))))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
            raise XmllmError(f"--merge {path}: {reason}") from None
        if not isinstance(reports[-1][1], dict):
            raise XmllmError(f"--merge {path}: not an 'xmllm bench --scale --json' report")
    return merge(reports)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "scale", False):
        return run_scale(args)
    if getattr(args, "configs", None):
        raise XmllmError("--configs needs --scale")
    for flag in ("growth", "no_recompute", "merge", "markdown"):
        if getattr(args, flag, False):
            raise XmllmError(f"--{flag.replace('_', '-')} needs --scale")
    if args.repeat < 1:
        raise XmllmError(f"--repeat {args.repeat}: must be at least 1")
    cases = [case for case in discover() if case.matches(args.only)]
    if not cases:
        names = ", ".join(case.name for case in discover())
        raise XmllmError(f"--only {args.only!r} matches no bench case or explainer; cases: {names}")

    import torch

    from xmllm.allocator import allocator_state

    from ..bench import BenchContext

    with tempfile.TemporaryDirectory(prefix="xmllm-bench-") as scratch:
        models = load_models(args, Path(scratch))
        ctx = BenchContext(models, repeat=args.repeat, quick=args.quick, only=args.only, spec=args.model)
        labelled, seconds = run_cases(cases, ctx)
        report = {
            "model": args.model,
            "device": str(next(iter(models.values())).device),
            "threads": torch.get_num_threads(),
            "allocator": allocator_state(),
            "quick": args.quick,
            "repeat": args.repeat,
            "models": describe(models, args.model),
            "case_seconds": seconds,
        }
    rows = [row for _, row in labelled]
    missed = [f"{r.group} on {r.model}" for r in rows if r.ok is False]
    report.update({
        "rows": [{"case": name, **row.to_json()} for name, row in labelled],
        "explainers": explainer_summary(rows),
        "targets": {"met": sum(r.ok is True for r in rows), "missed": len(missed), "which": missed},
    })
    print(json.dumps(report, indent=2, allow_nan=False) if args.json else render(report))
    return 0
