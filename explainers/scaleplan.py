"""How ``xmllm bench --scale`` measures an explainer, declared by the explainer itself.

An explainer's :meth:`~xmllm.explainers.registry.Explainer.scale_plan` returns a :class:`ScalePlan`:
the parameters the measurement uses where memory does not depend on them (fewer occlusion windows,
IG path points or token-drop steps than the defaults, but never fewer copies per forward than the
defaults batch), what that changes against the defaults, and the run's cost in forward-equivalents
at the defaults. The bench (``xmllm.bench.scale``) reads only this: it keeps no table of explainers.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TRIAL_BATCHES: tuple[int, int] = (4, 8)
"""Copies per forward a batching explainer is measured with; the peak at the batch the defaults use is
extrapolated along the line through the two (a batched forward's tensors grow by one copy's worth
per copy). Explainers that batch no more than the larger trial batch are measured at their own batch."""


@dataclass
class ScalePlan:
    """How one explainer is measured: its parameters, what they change against the defaults, and
    (for batching explainers) the batch the defaults use at full depth and the trial batches measured."""

    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    batch: int | None = None
    """Copies per forward the defaults batch at full depth on the budget's GPU (batching explainers)."""
    trials: tuple[int, ...] = ()
    """Batches measured (explicit batch sizes), stopping after the first forward of that batch."""
    set_batch: Callable[[dict[str, Any], int], dict[str, Any]] | None = None
    no_truth: bool = False
    """Explain the sample without its demo ground truth (a counterfactual: one rephrasing instead of
    the demo's edits, each costing what a rephrasing does)."""
    cost: dict[str, float] | None = None
    """Forward-equivalents at the defaults where the measured run does not complete them."""
    stop_backwards: int | None = None
    """Stop once this many backward passes have run (each later one repeats the first's sizes)."""

    def at(self, batch: int) -> dict[str, Any]:
        """The parameters for a run of ``batch`` copies per forward."""
        return self.set_batch(dict(self.params), batch) if self.set_batch else dict(self.params)


def windows_count(side_rows: int, side_cols: int, window: int) -> int:
    """How many ``window`` x ``window`` windows tile a grid of ``side_rows`` x ``side_cols`` cells."""
    return math.ceil(side_rows / window) * math.ceil(side_cols / window)


def with_batch_size(params: dict[str, Any], batch: int) -> dict[str, Any]:
    """``params`` with an explicit ``batch_size``: the ``set_batch`` of most batching explainers."""
    return {**params, "batch_size": batch}


def trials_for(copies: int) -> tuple[int, ...]:
    """The trial batches for an explainer whose defaults batch ``copies`` copies."""
    return (copies,) if copies <= TRIAL_BATCHES[-1] else TRIAL_BATCHES


def costs(forwards: float, backwards: float = 0.0, lower_bound: bool = False) -> dict[str, float]:
    """A run's cost in forwards, backwards and forward-equivalents (a backward counts as two)."""
    out = {"forwards": round(forwards, 2), "backwards": round(backwards, 2),
           "forward_equivalents": round(forwards + 2 * backwards, 2)}
    if lower_bound:
        out["lower_bound"] = True
    return out


def decode_step(prep: Any) -> float:
    """One generation's decode steps in copies of the explained sequence (``prep``: a Prepared)."""
    return (len(prep.answer.token_ids) - 1) / prep.seq_len


def recomputed(cost: dict[str, float]) -> dict[str, float]:
    """A :func:`costs` dict for the same run with its blocks recomputed in the backward
    (:mod:`xmllm.explainers.recompute`): every backward pass first runs the blocks' forward again,
    so each adds one forward (``recomputed_forwards``) on top of its two; forwards and backwards
    are unchanged. The memory side is :func:`xmllm.explainers.memory.recompute_copy_bytes`."""
    extra = cost.get("backwards", 0.0)
    out = {**cost, "recomputed_forwards": round(extra, 2),
           "forward_equivalents": round(cost.get("forward_equivalents", 0.0) + extra, 2)}
    return out
