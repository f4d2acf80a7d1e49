"""On the trained demo model, maps point at the object the question asks about far more often
than chance (a fixed seed; the trained weights must be present).

Chance for one sample is the share of grid cells that show the grounding objects: a map with
no information lands its maximum there that often. Over the samples the number of hits under
chance follows a Poisson binomial law; each explainer's hits must lie beyond its 0.1% tail.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xmllm.explainers.prepared import prepare
from xmllm.explainers.demo.samples import generate_sample, to_explain_sample
from xmllm.explainers.metrics.localisation import pointing_game
from xmllm.explainers.metrics.maps import primary_image_map
from xmllm.explainers.metrics.truth import cell_truth
from xmllm.explainers.models import load_model
from xmllm.explainers.registry import get_explainer

WEIGHTS = Path(__file__).resolve().parents[1] / "explainers/demo/weights/final"
SEED = 4242
N = 30
EXPLAINERS = ("relevancy.chefer", "gradient.saliency", "perturbation.occlusion")
GROUNDED = ("colour", "shape", "presence", "position")
"""Question types whose answer depends on named objects (count may ground on none)."""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (WEIGHTS / "config.json").is_file(), reason="trained demo weights not present"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def poisson_binomial_tail(probs: list[float], k: int) -> float:
    """P(at least ``k`` successes) for independent trials with success chances ``probs``."""
    dist = np.zeros(len(probs) + 1)
    dist[0] = 1.0
    for p in probs:
        dist[1:] = dist[1:] * (1 - p) + dist[:-1] * p
        dist[0] *= 1 - p
    return float(dist[k:].sum())


def test_poisson_binomial_tail_matches_the_binomial():
    from math import comb

    assert poisson_binomial_tail([0.5] * 4, 3) == pytest.approx((comb(4, 3) + 1) / 16)
    assert poisson_binomial_tail([0.2, 0.7], 0) == pytest.approx(1.0)
    assert poisson_binomial_tail([0.2, 0.7], 2) == pytest.approx(0.14)


@pytest.fixture(scope="module")
def grounded():
    loaded = load_model("demo", device="cpu", dtype="float32", eager_attention=True)
    out = []
    i = 0
    while len(out) < N:
        qtype = GROUNDED[i % len(GROUNDED)]
        sample = to_explain_sample(generate_sample(SEED, i, qtype))
        i += 1
        if sample.mask is None or not sample.mask.any():
            continue
        prepared = prepare(loaded, sample)
        truth = cell_truth(prepared)
        out.append((prepared, truth))
    return loaded, out


@pytest.mark.parametrize("explainer_id", EXPLAINERS)
def test_maps_point_at_the_asked_object_beyond_chance(grounded, explainer_id):
    loaded, items = grounded
    explainer = get_explainer(explainer_id)()
    hits, chance = [], []
    for prepared, truth in items:
        scored = primary_image_map(explainer.explain(loaded, prepared))
        assert scored is not None and scored.values.shape == truth.cells.shape
        hits.append(pointing_game(scored.values, truth.cells))
        chance.append(float(truth.cells.mean()))
    k = int(round(sum(hits)))
    p = poisson_binomial_tail(chance, k)
    assert p < 1e-3, (f"{explainer_id}: {k}/{len(hits)} hits against {sum(chance):.1f} expected by chance "
                      f"(tail probability {p:.2g})")
