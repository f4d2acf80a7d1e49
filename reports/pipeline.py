"""One run pipeline: what to run is planned once, before any model work, and one generator runs it.

``xmllm explain``, ``xmllm evaluate``, an audit's worker and the build's examples go the same way:
:func:`make_plan` turns explainer ids and the user's parameters into a :class:`Plan` (every
parameter parsed once against its explainer's declaration; the given answer, the contrast and the
token limit checked once); :meth:`Plan.refusals` says, per sample, which explainers will not run
and why; :func:`run_plan` runs the others on a prepared sample and yields one :class:`Outcome`
each. Only :class:`~xmllm.XmllmError` (and its kinds) is the user's error: anything else an
explainer raises is a bug and keeps its traceback, unless a caller that records failures per
sample (the evaluation) names what it tolerates.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from xmllm.errors import XmllmError

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.explanation import Explanation
    from xmllm.explainers.models import LoadedModel
    from xmllm.explainers.params import ExplainerParams
    from xmllm.explainers.registry import Explainer


@dataclass(frozen=True)
class Step:
    """One explainer of a plan, under its run label, with its parameters parsed once."""

    label: str
    """The explainer's id, or in an evaluation a variant of it (``relevancy.chefer[target=logit]``)."""
    explainer: "type[Explainer]"
    params: "ExplainerParams"

    @property
    def id(self) -> str:
        return self.explainer.id


def plan_step(explainer_id: str, values: Mapping[str, Any] | None = None, label: str | None = None) -> Step:
    """``explainer_id`` with ``values`` checked against its declaration (a one-line error otherwise)."""
    from xmllm.explainers.registry import get_explainer

    cls = get_explainer(explainer_id)
    return Step(label or explainer_id, cls, cls.check_params(values))


@dataclass(frozen=True)
class Plan:
    """What a run does on each sample: the explainers in order with their parsed parameters, the
    answer explained (generated up to ``max_new_tokens``, or given), the contrast, and the seed
    every explainer starts from (None: the caller's random state, as the sanity cascade needs)."""

    steps: tuple[Step, ...]
    answer: str | None = None
    contrast: str | None = None
    max_new_tokens: int | None = None
    seed: int | None = 0

    @property
    def labels(self) -> list[str]:
        return [step.label for step in self.steps]

    def step(self, label: str) -> Step:
        return next(step for step in self.steps if step.label == label)

    def only(self, labels: Iterable[str]) -> "Plan":
        """This plan with the steps of ``labels`` alone (in the plan's order)."""
        keep = set(labels)
        return replace(self, steps=tuple(step for step in self.steps if step.label in keep))

    def refusals(self, loaded: "LoadedModel", sample: Any) -> dict[str, str]:
        """Why each explainer that will not run on ``sample`` refuses it (its unmet inputs, or a
        contrast it does not explain), by label: decided before any model work."""
        out = {}
        for step in self.steps:
            why = step.explainer().refusal(loaded, sample, step.params, self.contrast is not None)
            if why is not None:
                out[step.label] = why
        return out

    def skipped(self, loaded: "LoadedModel", sample: Any) -> dict[str, str]:
        """:meth:`refusals` as a run of explainers treats them: listed as skipped while others run;
        an explainer asked for alone, or a run where none can run, is a one-line error instead."""
        skipped = self.refusals(loaded, sample)
        if skipped and len(self.steps) == 1:
            label, why = next(iter(skipped.items()))
            raise XmllmError(f"{label}: {why}")
        if self.steps and len(skipped) == len(self.steps):
            raise XmllmError("no explainer can run on this sample: " +
                             "; ".join(f"{label}: {why}" for label, why in skipped.items()))
        return skipped


def check_named(ids: Sequence[str], params: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The user's parameters by explainer id, as plain dicts; a one-line error for an explainer
    that is not being run."""
    params = {str(k): dict(v or {}) for k, v in (params or {}).items()}
    unknown = sorted(set(params) - set(ids))
    if unknown:
        raise XmllmError(f"params name explainer {unknown[0]!r}, which is not being run")
    return params


def make_plan(ids: Sequence[str], params: Mapping[str, Mapping[str, Any]] | None = None, *,
              answer: str | None = None, contrast: str | None = None, max_new_tokens: int | None = None,
              seed: int | None = 0, flags: bool = False) -> Plan:
    """The plan of a run of ``ids``, every check made here once and before any model work:
    ``params`` (by explainer id) against each declaration, the token limit, the given answer's and
    the contrast's text. ``flags``: errors name the command line's flags (``--param``,
    ``--max-new-tokens``) rather than the API's arguments."""
    from xmllm.explainers.answering import check_answer_text, check_max_new_tokens

    check_max_new_tokens(max_new_tokens, "--max-new-tokens" if flags else "max_new_tokens")
    for what, text in (("answer", answer), ("contrast", contrast)):
        if text is not None:
            check_answer_text(text, what)
    try:
        given = check_named(ids, params)
        steps = tuple(plan_step(eid, given.get(eid)) for eid in ids)
    except XmllmError as exc:
        if not flags:
            raise
        raise XmllmError(f"--param: {exc}") from None
    return Plan(steps, answer=answer, contrast=contrast, max_new_tokens=max_new_tokens, seed=seed)


@dataclass(frozen=True)
class Outcome:
    """What one step of a plan gave on one sample: its explanation, why it was skipped, or (only
    for the exception types the caller tolerates) the error it raised; with the seconds it took."""

    label: str
    explanation: "Explanation | None" = None
    skipped: str | None = None
    error: BaseException | None = None
    wall: float = 0.0
    cpu: float = 0.0


def run_plan(loaded: "LoadedModel", sample: Any, plan: Plan, skip: Mapping[str, str] | None = None,
             tolerate: tuple[type[BaseException], ...] = ()) -> Iterator[Outcome]:
    """Run ``plan`` on ``sample`` (prepared, with the plan's contrast if it has one; or a sample set
    for dataset-scope explainers), one :class:`Outcome` per step in order. Steps in ``skip`` (label
    -> reason, from :meth:`Plan.skipped`) are yielded as skipped; explainers that do not explain a
    contrast get the plain answer. Each explainer starts from the plan's seed. An exception of a
    ``tolerate`` type is yielded as the step's error; any other propagates as it is."""
    import torch

    skip = skip or {}
    plain = sample.with_contrast(None) if getattr(sample, "contrast", None) is not None else sample
    for step in plan.steps:
        if step.label in skip:
            yield Outcome(step.label, skipped=skip[step.label])
            continue
        explainer = step.explainer()
        if plan.seed is not None:
            torch.manual_seed(plan.seed)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            given = sample if step.explainer.supports_contrast else plain
            explanation = explainer.compute(loaded, explainer.ready(loaded, given), step.params)
        except tolerate as exc:
            yield Outcome(step.label, error=exc, wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)
            continue
        yield Outcome(step.label, explanation, wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)
