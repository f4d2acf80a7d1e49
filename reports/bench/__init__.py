"""``xmllm bench``: costs measured side by side in one run, reported as ratios.

Every module in this package (other than this one and ``models``) defines
``cases(ctx: BenchContext) -> list[BenchRow]``; the command discovers and runs them.
Absolute seconds depend on the machine; the ratios compare two things measured in the same
process, interleaved, so they hold when the machine's speed drifts.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class BenchRow:
    """One measured ratio (or quantity) with the target it is held to, if any."""

    group: str
    """Explainer id or topic, e.g. ``attention.raw`` or ``build``."""
    metric: str
    """What is compared, e.g. ``time / plain eager generate``."""
    value: float
    target: str | None = None
    """e.g. ``<= 1.3``; None for a reported figure without a target."""
    model: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool | None:
        if not self.target:
            return None
        op, bound = self.target.split()
        return self.value <= float(bound) if op == "<=" else self.value >= float(bound)

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "metric": self.metric, "value": self.value, "target": self.target,
                "ok": self.ok, "model": self.model, "details": self.details}


@dataclass
class BenchContext:
    """What a benchmark case may use: the models to measure on and the repeat count."""

    models: dict[str, Any]
    """Loaded models by label: ``demo`` (the embedded model) and ``llava-576`` (large, random)."""
    repeat: int = 3
    quick: bool = False


def median_seconds(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_ratio(a: Callable[[], Any], b: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> tuple[float, float, float]:
    """Median of a/b over interleaved runs (A B A B ...): (ratio, median a, median b)."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeat):
        for fn, out in ((a, ta), (b, tb)):
            gc.collect()
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    ratios = [x / y for x, y in zip(ta, tb)]
    return statistics.median(ratios), statistics.median(ta), statistics.median(tb)


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors in a (nested) structure: what a method retains."""
    import torch

    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
