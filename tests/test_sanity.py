"""The model-randomisation check on a real (random-weight) demo-architecture model: the cascade,
the restore, rank correlation by hand, and the flag on a map that ignores the model."""
from __future__ import annotations


import numpy as np
import pytest
import torch


from random_demo import save_random_demo

from xmllm.explainers.prepared import prepare
from xmllm.explainers.demo.samples import generate_samples, to_explain_sample
from xmllm.explainers.metrics.sanity import SURVIVAL_THRESHOLD, cascade, explainer_map, randomisation_check, randomised
from xmllm.explainers.metrics.stats import average_ranks, mean_interval, spearman
from xmllm.explainers.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_spearman_by_hand() -> None:
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert spearman(a, a) == 1.0
    assert spearman(a, -a) == -1.0
    assert spearman(a, a ** 3) == 1.0  # ranks only
    assert spearman(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0  # identical maps
    assert spearman(a, np.zeros((2, 2))) == 0.0  # a constant map has no ranking
    # ties share their mean rank: [1, 2.5, 2.5, 4] against [1, 2, 3, 4] -> 0.9486833
    assert average_ranks(np.array([0.0, 5.0, 5.0, 9.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert spearman(np.array([0.0, 5.0, 5.0, 9.0]), np.arange(4.0)) == pytest.approx(4.5 / np.sqrt(4.5 * 5.0))
    assert np.isnan(spearman(np.array([np.nan, 1.0]), np.array([0.0, 1.0])))


def test_mean_interval_is_seeded_and_brackets_the_mean() -> None:
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    first, again = mean_interval(values, seed=0), mean_interval(values, seed=0)
    assert first == again
    assert first["mean"] == 0.625 and first["n"] == 8
    assert 0.0 <= first["low"] < 0.625 < first["high"] <= 1.0
    assert mean_interval([float("nan")]) == {"mean": None, "low": None, "high": None, "n": 0}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return load_model(save_random_demo(tmp_path_factory.mktemp("demo") / "model"), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prepared(demo):
    return [prepare(demo, to_explain_sample(s)) for s in generate_samples(2, 0)]


def test_cascade_goes_top_down_then_the_vision_tower(demo) -> None:
    stages = cascade(demo)
    blocks = list(demo.adapter.decoder_layers())
    assert [s.name for s in stages] == ["decoder 3", "decoder 2-3", "decoder 1-3", "decoder 0-3",
                                        "vision tower + all decoder"]
    assert stages[0].modules == (blocks[3],)
    assert stages[3].modules == (blocks[3], blocks[2], blocks[1], blocks[0])
    assert stages[-1].modules[-1] is demo.adapter.vision_tower


def test_randomising_layers_changes_a_gradient_map_and_restores_the_weights(demo, prepared) -> None:
    prep = prepared[0]
    before = {n: p.detach().clone() for n, p in demo.model.named_parameters()}
    original = explainer_map(demo, prep, "gradient.saliency", {"per_token": False})
    assert spearman(original, explainer_map(demo, prep, "gradient.saliency", {"per_token": False})) == 1.0
    top = cascade(demo)[0]
    with randomised(demo.model, top.modules, seed=0):
        changed = [n for n, p in demo.model.named_parameters() if not torch.equal(p, before[n])]
        assert changed and all(n.startswith("model.language_model.layers.3.") for n in changed)
        shifted = explainer_map(demo, prep, "gradient.saliency", {"per_token": False})
    assert not np.allclose(shifted, original)
    assert spearman(original, shifted) < 0.99
    assert all(torch.equal(p, before[n]) for n, p in demo.model.named_parameters())
    with randomised(demo.model, top.modules, seed=0):  # same seed, same random weights
        assert np.array_equal(explainer_map(demo, prep, "gradient.saliency", {"per_token": False}), shifted)


def _brightness(loaded, prep, explainer_id, params):
    """A 'map' that reads the pixels alone: it must survive any randomisation of the model."""
    pixels = prep.inputs["pixel_values"][0].mean(0).numpy()
    p = int(loaded.model.config.vision_config.patch_size)
    rows, cols = pixels.shape[0] // p, pixels.shape[1] // p
    return pixels.reshape(rows, p, cols, p).mean(axis=(1, 3))


def test_the_check_flags_maps_that_ignore_the_model(demo, prepared) -> None:
    report = randomisation_check(demo, prepared, ["input.brightness"], map_of=_brightness)
    check = report["explainers"]["input.brightness"]
    assert report["stages"][-1] == "vision tower + all decoder"
    assert [row["mean"] for row in check["stages"]] == [1.0] * 5
    assert check["survives"] and report["threshold"] == SURVIVAL_THRESHOLD

    # Grad-CAM reads the vision block's activations and the gradients through the decoder: both go
    params = {"gradient.gradcam": {"per_token": False}}
    report = randomisation_check(demo, prepared, ["gradient.gradcam"], params, seed=0)
    check = report["explainers"]["gradient.gradcam"]
    assert len(check["stages"]) == 5 and all(row["n"] == 2 for row in check["stages"])
    assert not check["survives"]
    assert check["final"] < SURVIVAL_THRESHOLD
