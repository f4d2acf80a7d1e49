"""Deletion and insertion: the two area metrics (run through a sample's :class:`MetricInputs`),
and one report's maps on its own sample, what every report shows per map."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Metric, register_metric
from xmllm.explainers.metrics.inputs import MetricInputs
from .curves import DEFAULT_BASELINE, DEFAULT_STEPS, SCORE_NOTE, area_under

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import Prepared
    from ..models import LoadedModel


def unmaskable(loaded: "LoadedModel") -> str | None:
    """Why deletion and insertion cannot run on ``loaded``'s family (they mask cells through its pixel
    map; a VQ or resampler family has none), or None: the one rule reports and audits apply."""
    why = loaded.adapter.lacks("pixel_cells")
    return None if why is None else f"{loaded.adapter.model_type}: {why}"


def faithfulness_many(loaded: "LoadedModel", prepared: "Prepared", maps: Mapping[str, np.ndarray], *,
                      baseline: str = DEFAULT_BASELINE, steps: int = DEFAULT_STEPS, seed: int = 0,
                      batch_size: int | None = None) -> dict[str, dict[str, Any]]:
    """:func:`faithfulness_of` for several ``(rows, cols)`` maps of one sample, in shared batches."""
    if prepared.loaded is not loaded:
        raise ValueError("the prepared sample was made with another model")
    names = list(maps)
    arrays = [np.asarray(maps[n], dtype=np.float64) for n in names]
    inputs = MetricInputs(prepared, baseline=baseline, steps=steps, seed=seed, batch_size=batch_size)
    deletion = inputs.curves("deletion", arrays)
    insertion = inputs.curves("insertion", arrays)
    runner = inputs.runner()
    out = {}
    for i, name in enumerate(names):
        out[name] = {
            "deletion_area": area_under(deletion[i], runner.fractions),
            "insertion_area": area_under(insertion[i], runner.fractions),
            "deletion_curve": deletion[i].tolist(),
            "insertion_curve": insertion[i].tolist(),
            "fractions": list(runner.fractions),
            "baseline": runner.baseline_kind,
            "steps": runner.steps,
            "seed": seed,
            "score": SCORE_NOTE,
        }
    return out


def faithfulness_of(loaded: "LoadedModel", prepared: "Prepared", map2d: np.ndarray, *,
                    baseline: str = DEFAULT_BASELINE, steps: int = DEFAULT_STEPS, seed: int = 0,
                    batch_size: int | None = None) -> dict[str, Any]:
    """Deletion and insertion areas (and curves) of one ``(rows, cols)`` map of the first image's
    main grid on its own sample: ``deletion_area`` (lower is better), ``insertion_area`` (higher is
    better), ``deletion_curve``, ``insertion_curve``, ``fractions``, ``baseline``, ``steps``,
    ``seed``, ``score``. Real forwards: ``2 + 2 (steps - 1)`` perturbed copies, batched."""
    return faithfulness_many(loaded, prepared, {"map": map2d}, baseline=baseline, steps=steps, seed=seed,
                             batch_size=batch_size)["map"]


PETSIUK = "RISE: Randomized Input Sampling for Explanation of Black-box Models (Petsiuk et al., 2018, arXiv 1806.07421)"


class CurveMetric(Metric):
    """The area under one kind of curve, for every map of a sample in one batched run."""

    needs_model = True
    kind: str

    def compute(self, maps: Sequence[np.ndarray], inputs: "MetricInputs") -> np.ndarray:
        curves = inputs.curves(self.kind, maps)
        fractions = inputs.runner().fractions
        return np.array([area_under(c, fractions) for c in curves], dtype=np.float64)


@register_metric
class DeletionArea(CurveMetric):
    name = "deletion_area"
    title = "Deletion area"
    higher_is_better = False
    kind = "deletion"
    summary = ("Area under p(answer) as the most relevant cells are replaced by the baseline first: "
               "low when the map finds what the answer needs.")
    reference = PETSIUK


@register_metric
class InsertionArea(CurveMetric):
    name = "insertion_area"
    title = "Insertion area"
    higher_is_better = True
    kind = "insertion"
    summary = ("Area under p(answer) as the most relevant cells are put back into the baseline image first: "
               "high when the map finds what the answer needs.")
    reference = PETSIUK
