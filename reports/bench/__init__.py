"""``xmllm bench``: costs measured side by side in one run, reported as ratios.

Every module in this package that defines ``cases(ctx: BenchContext) -> list[BenchRow]`` is a
benchmark case; the command discovers and runs them. Absolute seconds depend on the machine; the
ratios compare two things measured in the same process, interleaved (A B A B ...), so they hold
when the machine's speed drifts, and each ratio's CPU-time twin (process CPU seconds) holds when
other processes share the CPU.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BenchRow:
    """One measured ratio (or quantity) with the target it is held to, if any."""

    group: str
    """Explainer id or topic, e.g. ``attention.capture`` or ``relevancy.chefer``."""
    metric: str
    """What is compared, e.g. ``time: generate with capture / plain eager generate``."""
    value: float
    target: str | None = None
    """e.g. ``<= 1.3``; None for a reported figure without a target."""
    model: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    ours: float | None = None
    """The measured side (seconds or bytes, see ``unit``), when the value is a ratio."""
    reference: float | None = None
    """What it is divided by (or what is divided by it, for a speed-up)."""
    unit: str = ""
    """``s`` (seconds), ``B`` (bytes) or empty."""

    @property
    def ok(self) -> bool | None:
        if not self.target:
            return None
        if not math.isfinite(self.value):
            return False
        op, bound = self.target.split()
        return self.value <= float(bound) if op == "<=" else self.value >= float(bound)

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "metric": self.metric, "value": _finite(self.value), "target": self.target,
                "ok": self.ok, "model": self.model, "ours": _finite(self.ours),
                "reference": _finite(self.reference), "unit": self.unit, "details": jsonable(self.details)}


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: None stands for a value that could not be measured."""
    return None if value is None or not math.isfinite(value) else float(value)


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as None and tuples as lists, so that strict JSON can hold it."""
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


@dataclass
class BenchContext:
    """What a benchmark case may use: the models to measure on, the repeat count, a filter."""

    models: dict[str, Any]
    """Loaded models by role: ``demo`` (the model chosen with ``--model``, the demo model by
    default) and ``llava-576`` (large, random; absent with ``--no-large``)."""
    repeat: int = 3
    quick: bool = False
    only: str | None = None
    """A substring: cases that honour it measure only what it names (e.g. explainer ids)."""
    spec: str = "demo"
    """What ``--model`` named, for the report."""
    progress: Callable[[str], None] | None = None
    """Called with a short label as a case moves on (the command shows it on stderr)."""

    def tell(self, label: str) -> None:
        if self.progress is not None:
            self.progress(label)

    def selects(self, name: str) -> bool:
        return not self.only or self.only in name


@dataclass
class Timings:
    """Wall and CPU seconds per round of each function measured by :func:`interleaved`."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    def seconds(self, name: str) -> float:
        return statistics.median(self.wall[name])

    def cpu_seconds(self, name: str) -> float:
        return statistics.median(self.cpu[name])

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of wall(a) / wall(b): each round's pair ran back to back."""
        return statistics.median(x / y for x, y in zip(self.wall[a], self.wall[b]))

    def cpu_ratio(self, a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(self.cpu[a], self.cpu[b]))

    def summary(self) -> dict[str, float]:
        """Median wall and CPU seconds of every function, for a row's details."""
        return {**{f"seconds_{n}": self.seconds(n) for n in self.wall},
                **{f"cpu_seconds_{n}": self.cpu_seconds(n) for n in self.cpu}}


def interleaved(fns: Mapping[str, Callable[[], Any]], repeat: int = 3, warmup: int = 1,
                kept: dict[str, Any] | None = None) -> Timings:
    """Run the functions in turn (A B C A B C ...), ``warmup`` rounds unclocked then ``repeat``
    clocked ones; ``kept`` gets each function's last result."""
    kept = {} if kept is None else kept
    for _ in range(warmup):
        for name, fn in fns.items():
            kept[name] = fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(repeat, 1)):
        for name, fn in fns.items():
            gc.collect()
            _synchronise()
            start, start_cpu = time.perf_counter(), time.process_time()
            kept[name] = fn()
            _synchronise()  # an accelerator's queued work belongs to the function that queued it
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return Timings(wall, cpu)


def _synchronise() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()



