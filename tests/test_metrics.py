"""Metrics against values computed by hand: localisation formulas on small arrays, the ground
truth pooled from a demo mask by the demo's patch geometry, and deletion/insertion curves
against forwards masked by hand (no helper of the metrics code is used for the reference)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image


from loaded_models import answer_probability
from random_demo import save_random_demo

from xmllm.explainers.prepared import prepare
from xmllm.explainers.demo.samples import generate_samples, to_explain_sample
from xmllm.explainers.metrics import (
    MetricInputs,
    area_under,
    cell_truth,
    faithfulness_of,
    get_metric,
    pointing_game,
    random_map,
    registered_metrics,
    relevance_mass,
    relevance_rank,
)
from xmllm.explainers.metrics.curves import CurveRunner, step_counts
from xmllm.explainers.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# --- localisation on hand-made arrays ---------------------------------------------------------------


def test_pointing_game_hit_miss_and_ties() -> None:
    mask = np.array([[0, 1], [0, 0]], dtype=bool)
    assert pointing_game(np.array([[0.1, 0.9], [0.4, 0.2]]), mask) == 1.0
    assert pointing_game(np.array([[0.9, 0.1], [0.4, 0.2]]), mask) == 0.0
    # two maximal cells, one on the object: half a hit (the expectation of a random tie-break)
    assert pointing_game(np.array([[1.0, 1.0], [0.0, 0.0]]), mask) == 0.5
    # a constant map scores what a random map scores on average: |mask| / N
    assert pointing_game(np.zeros((2, 2)), mask) == 0.25
    assert math.isnan(pointing_game(np.ones((2, 2)), np.zeros((2, 2), dtype=bool)))


def test_relevance_mass_is_positive_relevance_inside_over_all() -> None:
    mask = np.array([[0, 1], [0, 0]], dtype=bool)
    assert relevance_mass(np.array([[0.1, 0.9], [0.4, 0.2]]), mask) == pytest.approx(0.9 / 1.6)
    # negative relevance is evidence against the answer, not mass: [0, 2, 1, 0] -> 2 / 3
    assert relevance_mass(np.array([[-1.0, 2.0], [1.0, 0.0]]), np.array([[1, 1], [0, 0]], bool)) == pytest.approx(2 / 3)
    assert math.isnan(relevance_mass(-np.ones((2, 2)), mask))


def test_relevance_rank_top_k_within_mask() -> None:
    mask = np.array([[1, 0], [0, 1]], dtype=bool)  # K = 2
    # top-2 cells are (0,0) and (1,0): one of them on the object
    assert relevance_rank(np.array([[3.0, 1.0], [2.0, 0.0]]), mask) == 0.5
    assert relevance_rank(np.array([[3.0, 1.0], [0.0, 2.0]]), mask) == 1.0
    # K = 1, two cells tied for first, one inside: the slot is shared, 1 * 1/2
    assert relevance_rank(np.array([[1.0, 1.0], [0.0, 0.0]]), np.array([[1, 0], [0, 0]], bool)) == 0.5
    # 3x3, K = 3: values 9..1; mask on 9, 5, 1 -> top-3 = {9, 8, 7} -> 1 / 3
    grid = np.arange(9, 0, -1, dtype=float).reshape(3, 3)
    assert relevance_rank(grid, np.isin(grid, [9, 5, 1])) == pytest.approx(1 / 3)


def test_metrics_are_registered_with_their_metadata_and_compute_through_a_context() -> None:
    table = registered_metrics()
    assert list(table) == ["pointing_game", "relevance_mass", "relevance_rank", "deletion_area", "insertion_area"]
    expected = {"pointing_game": (True, False), "relevance_mass": (True, False), "relevance_rank": (True, False),
                "deletion_area": (False, True), "insertion_area": (True, True)}
    for name, (higher, model) in expected.items():
        cls = get_metric(name)
        assert (cls.higher_is_better, cls.needs_model, cls.applies_to) == (higher, model, "image_map")
    mask = np.array([[0, 1], [0, 0]], dtype=bool)
    maps = [np.array([[0.1, 0.9], [0.4, 0.2]]), np.array([[0.9, 0.1], [0.4, 0.2]])]
    got = table["pointing_game"]().compute(maps, MetricInputs(truth=mask))
    assert got.tolist() == [1.0, 0.0]
    assert np.isnan(table["relevance_mass"]().compute(maps, MetricInputs())).all()  # no ground truth
    with pytest.raises(ValueError, match="unknown metric"):
        get_metric("accuracy")


def test_random_maps_give_the_analytic_floor() -> None:
    """Over many random maps each localisation metric averages |mask| / N (by symmetry)."""
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4, 3:6] = True  # 6 of 64 cells
    rng = np.random.default_rng(7)
    maps = [random_map((8, 8), rng) for _ in range(3000)]
    for fn in (pointing_game, relevance_mass, relevance_rank):
        assert np.mean([fn(m, mask) for m in maps]) == pytest.approx(6 / 64, abs=0.015)
    assert np.array_equal(random_map((8, 8), 3), random_map((8, 8), 3))
    assert not np.array_equal(random_map((8, 8), 3), random_map((8, 8), 4))


def test_area_and_step_counts_by_hand() -> None:
    assert area_under([1.0, 0.5, 0.0], [0.0, 0.5, 1.0]) == pytest.approx(0.5)
    assert area_under([0.2, 0.6, 0.6, 1.0], [0.0, 0.25, 0.5, 1.0]) == pytest.approx(0.1 + 0.15 + 0.4)
    assert step_counts(64, 8) == [0, 8, 16, 24, 32, 40, 48, 56, 64]
    assert step_counts(10, 4) == [0, 2, 5, 8, 10]


# --- on a real model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return load_model(save_random_demo(tmp_path_factory.mktemp("demo") / "model"), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prepared(demo):
    sample = to_explain_sample(generate_samples(1, 0)[0])
    return prepare(demo, sample)


def _patch(demo) -> int:
    return int(demo.model.config.vision_config.patch_size)


def test_ground_truth_cells_are_the_mask_pooled_by_patch(demo, prepared) -> None:
    mask = prepared.sample.mask
    p = _patch(demo)
    rows, cols = mask.shape[0] // p, mask.shape[1] // p
    by_hand = mask.reshape(rows, p, cols, p).mean(axis=(1, 3))
    truth = cell_truth(prepared)
    assert truth.cover == pytest.approx(by_hand, abs=1e-9)
    assert np.array_equal(truth.cells, by_hand >= 0.1)
    assert truth.cells.any()
    with pytest.raises(ValueError, match="does not match"):
        cell_truth(prepared, mask=np.zeros((3, 3), dtype=bool))


def test_deletion_and_insertion_curves_match_forwards_masked_by_hand(demo, prepared) -> None:
    p = _patch(demo)
    pixels = prepared.inputs["pixel_values"]
    rows, cols = pixels.shape[-2] // p, pixels.shape[-1] // p
    size = prepared.sample.images[0].size
    black = demo.processor.image_processor(Image.new("RGB", size, (0, 0, 0)), return_tensors="pt")["pixel_values"]
    map2d = np.random.default_rng(1).random((rows, cols))  # no ties
    ranked = np.argsort(-map2d.ravel(), kind="stable")
    steps = 4
    counts = [round(k * rows * cols / steps) for k in range(steps + 1)]

    def with_cells(start: torch.Tensor, fill: torch.Tensor, cells) -> torch.Tensor:
        out = start.clone()
        for index in cells:
            r, c = divmod(int(index), cols)
            out[..., r * p:(r + 1) * p, c * p:(c + 1) * p] = fill[..., r * p:(r + 1) * p, c * p:(c + 1) * p]
        return out

    deletion = [answer_probability(demo, prepared, with_cells(pixels, black, ranked[:n])) for n in counts]
    insertion = [answer_probability(demo, prepared, with_cells(black, pixels, ranked[:n])) for n in counts]
    inputs = MetricInputs(prepared, steps=steps, baseline="black")
    assert inputs.curves("deletion", [map2d])[0] == pytest.approx(deletion, abs=2e-5)
    assert inputs.curves("insertion", [map2d])[0] == pytest.approx(insertion, abs=2e-5)
    fractions = [n / (rows * cols) for n in counts]
    areas = {name: get_metric(name)().compute([map2d], inputs)[0] for name in ("deletion_area", "insertion_area")}
    by_hand = {"deletion_area": sum((deletion[i] + deletion[i + 1]) / 2 * (fractions[i + 1] - fractions[i])
                                    for i in range(steps)),
               "insertion_area": sum((insertion[i] + insertion[i + 1]) / 2 * (fractions[i + 1] - fractions[i])
                                     for i in range(steps))}
    assert areas == pytest.approx(by_hand, abs=2e-5)
    # the report helper's entry point gives the same numbers for the same map
    report = faithfulness_of(demo, prepared, map2d, steps=steps)
    assert report["deletion_area"] == pytest.approx(by_hand["deletion_area"], abs=2e-5)
    assert report["insertion_area"] == pytest.approx(by_hand["insertion_area"], abs=2e-5)
    assert report["deletion_curve"][0] == pytest.approx(answer_probability(demo, prepared, pixels), abs=2e-5)


def test_ties_follow_one_seeded_permutation_not_the_raster(demo, prepared) -> None:
    a = CurveRunner(prepared, seed=3)
    b = CurveRunner(prepared, seed=3)
    flat = np.zeros(a.shape)
    assert np.array_equal(a.order(flat), b.order(flat))
    assert not np.array_equal(a.order(flat), np.arange(flat.size))
    assert sorted(a.order(flat).tolist()) == list(range(flat.size))
    with pytest.raises(ValueError, match="does not match"):
        a.order(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="steps"):
        CurveRunner(prepared, steps=10_000)
