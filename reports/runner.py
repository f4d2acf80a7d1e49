"""Run chosen explainers on one sample and keep what is needed to redo it."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from xmllm.errors import XmllmError
from .provenance import package_versions, sample_sha256, utc_now

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import ExplainSample, Prepared
    from xmllm.explainers.explanation import Explanation
    from xmllm.explainers.models import LoadedModel

    from xmllm.report.explained import Run

    from .pipeline import Plan


def resolve_explainers(ids: list[str] | None = None, leaf: str | None = None) -> list[str]:
    """Explainer ids from an explicit list or a catalog leaf; one-line errors otherwise."""
    from xmllm.explainers.registry import RegistryError, get_explainer, sample_level_ids

    if ids and leaf:
        raise XmllmError("give either --explainers or --leaf, not both")
    if leaf:
        from xmllm.catalog import load_catalog
        from xmllm.catalog.view import json_view

        leaves = {l["id"]: l for l in json_view(load_catalog())["leaves"]}
        if leaf not in leaves:
            raise XmllmError(f"--leaf: unknown catalog leaf {leaf!r}; run 'xmllm catalog' to list them")
        ids = [e["id"] for e in leaves[leaf]["explainers"] if e["status"] == "implemented"]
        if not ids:
            raise XmllmError(f"--leaf {leaf}: none of its explainers is implemented yet")
    if not ids:
        ids = sample_level_ids()
        if not ids:
            raise XmllmError("no sample-level explainer is implemented yet; run 'xmllm explainers'")
    for eid in ids:
        try:
            cls = get_explainer(eid)
        except RegistryError as exc:
            raise XmllmError(str(exc)) from None
        if cls.scope != "sample":
            raise XmllmError(f"explainer {eid!r} runs over a sample set, not one sample; use 'xmllm run'")
    return list(dict.fromkeys(ids))


def needs_attention(ids: list[str]) -> bool:
    """Whether any of the explainers needs eager attention weights."""
    from xmllm.explainers.registry import Need, get_explainer

    return any(Need.ATTENTION in get_explainer(eid).needs for eid in ids)


def run_explainers(loaded: "LoadedModel", sample: "ExplainSample", plan: "Plan",
                   progress: Callable[[str], None] | None = None, faithfulness: bool = True) -> "Run":
    """Explain the model's answer on ``sample`` with each explainer of ``plan`` in turn
    (:func:`xmllm.pipeline.run_plan`); ``progress`` is called with each explainer's id when it is
    done (or skipped).

    The answer is generated greedily (up to the plan's ``max_new_tokens``, default the model's), or
    given (scored by the model); with a contrast the explainers that support it explain ``answer
    rather than contrast`` (see :mod:`xmllm.explainers.prepared`). Explainers that cannot run on
    this sample are skipped with their reason (:meth:`~xmllm.pipeline.Plan.skipped`). Words of the
    question the tokenizer does not know are warned about.

    With ``faithfulness`` (the default) every explainer that gives an image map also gets the
    deletion and insertion areas of that map on this sample (:func:`faithfulness_entry`), in one
    batched set of forwards after the explainers; the manifest holds them under ``faithfulness``
    and every report shows them. ``faithfulness=False`` skips those forwards."""
    import torch

    from xmllm.explainers.answering import unknown_words
    from xmllm.explainers.prepared import prepare

    from .pipeline import run_plan

    seed = plan.seed or 0
    skipped = plan.skipped(loaded, sample)
    runnable = [step for step in plan.steps if step.label not in skipped]
    warnings = []
    unknown = unknown_words(loaded, sample.question)
    if unknown:
        warnings.append(f"the tokenizer does not know {', '.join(map(repr, unknown))} in the question: the model "
                        "reads an unknown-word token there, so the answer cannot be about "
                        f"{'it' if len(unknown) == 1 else 'them'}")
    torch.manual_seed(seed)
    started = utc_now()
    t0 = time.perf_counter()
    plain = prepare(loaded, sample, answer=plan.answer, max_new_tokens=plan.max_new_tokens)
    contrasted = plain.with_contrast(plan.contrast) if plan.contrast is not None else plain
    if plain.answer.cut:
        warnings.append(f"the answer was cut at max_new_tokens={plain.answer.max_new_tokens}: it may go on; "
                        "raise max_new_tokens to explain the whole answer")
    timings = {"prepare": time.perf_counter() - t0}
    explanations = []
    for outcome in run_plan(loaded, contrasted, plan, skipped):
        exp = outcome.explanation
        if exp is not None:
            timings[outcome.label] = outcome.wall
            exp.meta.setdefault("seconds", outcome.wall)
            explanations.append(exp)
        if progress:
            progress(outcome.label)
    prepared = contrasted
    faithful = None
    if faithfulness:
        t = time.perf_counter()
        faithful = faithfulness_entry(loaded, prepared, explanations, seed)
        timings["faithfulness"] = time.perf_counter() - t
    manifest = {
        "created": started,
        "seed": seed,
        "model": loaded.provenance(),
        "sample": {
            "id": sample.id,
            "question": sample.question,
            "expected": sample.expected,
            "sha256": sample_sha256(sample.images, sample.question),
            "image_sizes": [list(img.size) for img in sample.images],
        },
        "answer": plain.answer.to_json(),
        "explainers": [step.label for step in runnable],
        "params": {step.label: step.params.as_dict(cli_only=True) for step in runnable},
        "timings_seconds": {k: round(v, 4) for k, v in timings.items()},
        "versions": package_versions(),
        # float sums split across threads add up in another order: the last bits of every number
        # depend on this count, so it is part of what makes a run reproducible
        "torch_threads": _torch_threads(),
    }
    if sample.extra.get("video"):  # the pictures are a video's frames: which, and from what file
        manifest["video"] = sample.extra["video"]
    if contrasted.contrast is not None:
        manifest["contrast"] = contrasted.contrast.to_json()
    if skipped:
        manifest["skipped"] = skipped
    if unknown:
        manifest["unknown_words"] = unknown
    if warnings:
        manifest["warnings"] = warnings
    if faithful is not None:
        manifest["faithfulness"] = faithful
    from xmllm.report.explained import IMAGE_NAME, Run

    names = [IMAGE_NAME.format(k) for k in range(len(sample.images))]
    manifest["sample"]["images"] = names
    manifest["layouts"] = layouts_json(prepared.layouts)
    return Run(manifest, explanations, list(sample.images), names, prepared=prepared)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def faithfulness_entry(loaded: "LoadedModel", prepared: "Prepared", explanations: "list[Explanation]",
                       seed: int = 0) -> dict[str, Any] | None:
    """Deletion and insertion of each explanation's scored image map on its own sample
    (:func:`xmllm.explainers.metrics.faithfulness_many`, every map in shared batches), as the manifest
    keeps them: the settings once, then per explainer the map scored, both areas and both curves.
    Explainers without an image map are left out; one whose map cannot be scored (non-finite
    values, another grid) is listed under ``skipped`` with why. None when no explainer has a map."""
    import numpy as np

    from xmllm.explainers.masking import first_layout
    from xmllm.explainers.metrics import (
        DEFAULT_BASELINE,
        DEFAULT_STEPS,
        faithfulness_many,
        primary_image_map,
        unmaskable,
    )
    from xmllm.explainers.metrics.curves import SCORE_NOTE

    maps: dict[str, Any] = {}
    names: dict[str, str] = {}
    skipped: dict[str, str] = {}
    grid = None
    for exp in explanations:
        scored = primary_image_map(exp)
        if scored is None:
            continue
        if grid is None:
            main = first_layout(prepared).main_grid
            grid = (main.rows, main.cols)
        if scored.values.shape != grid:
            skipped[exp.explainer] = f"map of shape {scored.values.shape} is not the {grid[0]}x{grid[1]} image grid"
        elif not np.isfinite(scored.values).all():
            skipped[exp.explainer] = "the map has non-finite values: its cells cannot be ranked"
        else:
            maps[exp.explainer] = scored.values
            names[exp.explainer] = scored.describe()
    if not maps and not skipped:
        return None
    entry: dict[str, Any] = {"baseline": DEFAULT_BASELINE, "steps": DEFAULT_STEPS, "seed": seed, "score": SCORE_NOTE,
                             "explainers": {}, "skipped": skipped}
    why = unmaskable(loaded) if maps else None
    if why is not None:
        entry["skipped"].update({eid: f"not computed: {why}" for eid in maps})
        return entry
    if maps:
        try:
            got = faithfulness_many(loaded, prepared, maps, seed=seed)
        except (ValueError, RuntimeError, NotImplementedError) as exc:  # e.g. a model whose cells cannot be masked
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            entry["skipped"].update({eid: f"not computed: {reason}" for eid in maps})
            return entry
        first = next(iter(got.values()))
        entry.update(fractions=first["fractions"], baseline=first["baseline"], steps=first["steps"])
        for eid, values in got.items():
            entry["explainers"][eid] = {
                "map": names[eid],
                **{k: values[k] for k in ("deletion_area", "insertion_area", "deletion_curve", "insertion_curve")},
            }
    return entry


def parse_params(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``--param ID.KEY=VALUE`` (VALUE parsed as JSON when it parses, else a string)."""
    import json

    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        eid, dot, name = key.rpartition(".")
        if not sep or not dot or not eid or not name:
            raise XmllmError(f"--param {pair!r}: expected EXPLAINER.NAME=VALUE, e.g. perturbation.occlusion.window=2")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(eid, {})[name] = value
    return out


def layouts_json(layouts: list) -> list[dict[str, Any]]:
    """Where each image grid lies on its image, keyed by the map name explainers give it
    (:func:`xmllm.explainers.methods.attention.grid_names`), so a report can overlay a map on the
    right part of the right image."""
    from xmllm.explainers.models.layout import grid_names

    names = {id(grid): name for name, grid in grid_names(layouts)}
    return [
        {
            "image": layout.image_index,
            "grids": [
                {
                    "map": names[id(grid)],
                    "name": grid.name,
                    "rows": grid.rows,
                    "cols": grid.cols,
                    "region": list(grid.region) if grid.region is not None else None,
                    "main": grid is layout.main_grid,
                }
                for grid in layout.grids
            ],
        }
        for layout in layouts
    ]
