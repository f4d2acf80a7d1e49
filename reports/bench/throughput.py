"""Audit throughput (samples per second): the local executor against Ray with one and two
workers, on the same demo samples with the same cheap audit, measured side by side.

Each side's model is loaded (and its Ray actors started) before the clock starts, so the rows
compare steady-state throughput, not start-up. Ray rows are skipped with a note when Ray is not
installed. The sample count is small by default (``--quick`` makes it smaller).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from xmllm.explainers.methods.perturbation import Occlusion

from . import BenchContext, BenchRow, interleaved
from .models import MAIN

GROUP = "audit.throughput"
SAMPLES, QUICK_SAMPLES = 6, 3
EXPLAINERS = {Occlusion.id: {"window": 2}}
"""The audit's one explainer: a fixed, model-bound workload (batched forwards of 2 x 2 windows), the
same in every run so that throughputs compare between runs."""
RAY_NOTE = 'Ray not installed: pip install "xmllm[distributed]"'
QUICK_NOTE = "--quick: Ray rows skipped (starting Ray takes longer than a quick bench)"


def _config(spec: str, samples: Path, device: str) -> dict[str, Any]:
    from ..audit.config import AuditConfig

    return json.loads(AuditConfig.model_validate({
        "model": spec, "device": device, "samples": {"type": "jsonl", "path": str(samples)},
        "explainers": EXPLAINERS, "checks": ["blank_image"], "faithfulness": {"steps": 2}, "reports": False,
    }).model_dump_json())


def _tasks(folder: Path, n: int) -> list[Any]:
    from xmllm.explainers.demo.samples import generate_samples, write_sample_set

    from xmllm.audit.driver import make_task
    from ..audit.sources import AuditItem

    path = write_sample_set(generate_samples(n, 11), folder, progress=False)
    items = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        rec = json.loads(line)
        items.append(AuditItem(k, rec["id"], rec["question"], rec["answer"], folder / rec["image"], None, rec["image"],
                               None, {"objects": rec["objects"]}))
    return [make_task(item) for item in items]


def cases(ctx: BenchContext) -> list[BenchRow]:
    if not ctx.selects(GROUP):
        return []
    from ..audit.config import ExecutorConfig
    from ..audit.worker import AuditWorker, WorkerSpec

    n = QUICK_SAMPLES if ctx.quick else SAMPLES
    spec_name = ctx.spec
    with tempfile.TemporaryDirectory(prefix="xmllm-bench-audit-") as tmp:
        tasks = _tasks(Path(tmp) / "set", n)
        device = str(ctx.models[MAIN].device) if MAIN in ctx.models else "auto"
        spec = WorkerSpec(_config(spec_name, Path(tmp) / "set" / "samples.jsonl", device), spec_name, "bench")
        ctx.tell("audit: loading the local worker")
        local = AuditWorker(spec)
        fns = {"local": lambda: [local.process(t) for t in tasks]}
        note = None
        try:
            import ray  # noqa: F401
        except ImportError:
            note = RAY_NOTE
        if ctx.quick:
            note = QUICK_NOTE
        ray_pool = None
        if note is None:
            from ..audit.executor import RayPool

            ctx.tell("audit: starting Ray with two workers")
            gpus = 0.5 if device.startswith("cuda") else 0.0  # two actors share the one GPU the bench uses
            ray_pool = RayPool(spec, ExecutorConfig(kind="ray", workers=2, num_cpus=1, num_gpus=gpus))
        rows: list[BenchRow] = []
        if ray_pool is None:
            timings = interleaved(fns, repeat=max(1, ctx.repeat - 1), warmup=0)
        else:
            with ray_pool as pool:
                def on(workers: int):
                    return lambda: pool.map(tasks, lambda out: None, workers=workers)

                fns.update({"ray1": on(1), "ray2": on(2)})
                ctx.tell("audit: measuring local, Ray 1 and Ray 2 workers")
                timings = interleaved(fns, repeat=max(1, ctx.repeat - 1), warmup=1)
        rate = {name: n / timings.seconds(name) for name in fns}
        details = {"samples": n, "explainers": list(EXPLAINERS), "checks": ["blank_image"], "reports": False,
                   **timings.summary()}
        rows.append(BenchRow(GROUP, "samples/s: local executor", rate["local"], model=spec_name,
                             details={**details, **({"ray": note} if note else {})}))
        if ray_pool is None:
            return rows
        for metric, a, b in (("speed-up: Ray 1 worker / local", "ray1", "local"),
                             ("speed-up: Ray 2 workers / local", "ray2", "local"),
                             ("speed-up: Ray 2 workers / Ray 1 worker", "ray2", "ray1")):
            rows.append(BenchRow(GROUP, metric, timings.ratio(b, a), model=spec_name,
                                 details={**details, "samples_per_second": {k: round(v, 4) for k, v in rate.items()}},
                                 ours=timings.seconds(a), reference=timings.seconds(b), unit="s"))
        return rows
