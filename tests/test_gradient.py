"""Gradient explainers on tiny models of every family and on the demo model.

Each property is checked against an independent computation: completeness against separate
forwards at the input and the baseline, saliency against a plain autograd gradient pooled by
patch arithmetic, Grad-CAM against hooked activations and gradients, the batched engine
against Captum's own attribution classes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


from tiny_models import FAMILIES, TEST_IMAGE_SIZES, build_tiny, missing_dependency, tiny_image

from xmllm.explainers.answering import Answer
from xmllm.explainers.prepared import ExplainSample, Prepared, prepare
from xmllm.explainers.methods.gradient import GAP_WARNING
from xmllm.explainers.models.layout import grid_names
from xmllm.explainers.masking import baseline_pixels
from xmllm.explainers.models import adapter_for
from xmllm.explainers.models.loading import LoadedModel
from xmllm.explainers.registry import get_explainer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

QUESTION = "what colour is the square"
ANSWER = "red"
IDS = ("gradient.saliency", "gradient.input_x_gradient", "gradient.integrated", "gradient.gradcam")
FAST = {"gradient.integrated": {"n_steps": 2, "internal_batch_size": 2}}
"""Smoke runs need no accuracy: two path points keep integrated gradients cheap."""
DEMO_WEIGHTS = (Path(__file__).resolve().parents[1] / "explainers/demo/weights/final", Path("/tmp/demo-early-run1"))

_TINY: dict[str, Prepared] = {}


def randomise_zero_matrices(model: torch.nn.Module, std: float = 0.02) -> None:
    """Weight matrices left at zero by their init (Gemma 3's projection) get random values:
    a zero projection makes every image feature, and so every pixel gradient, zero."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not bool(param.any()):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def forced(loaded: LoadedModel, images, question: str, text: str) -> Prepared:
    """The final sequence with a given answer: exact checks need no trained model."""
    ids = loaded.adapter.tokenize_answer(text)
    tokens = tuple(loaded.processor.tokenizer.convert_ids_to_tokens(ids))
    answer = Answer(text, tuple(ids), tokens, (0.0,) * len(ids))
    return prepare(loaded, ExplainSample(list(images), question), answer=answer)


def tiny(family: str) -> Prepared:
    package = missing_dependency(family)
    if package:
        pytest.skip(f"the {family} processor needs {package}, which is not installed")
    if family not in _TINY:
        model, processor = build_tiny(family)
        randomise_zero_matrices(model)
        loaded = LoadedModel(model, processor, adapter_for(model, processor), f"tiny-{family}", "tests",
                             torch.device("cpu"), torch.float32)
        _TINY[family] = forced(loaded, [tiny_image(*TEST_IMAGE_SIZES[family])], QUESTION, ANSWER)
    return _TINY[family]


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    from xmllm.explainers.models import load_model

    for path in DEMO_WEIGHTS:
        if (path / "config.json").is_file():
            return load_model(str(path), eager_attention=True)
    pytest.skip("no demo-model weights")


def token_logprobs(prep: Prepared, pixels: torch.Tensor) -> torch.Tensor:
    """(T,) answer log-probabilities from a plain forward with ``pixels``."""
    return prep.answer_logprobs(prep.forward(pixel_values=pixels).logits)[0]


def llava_cells(values: torch.Tensor, patch: int, pool: str) -> torch.Tensor:
    """(C, H, W) pixel scores -> (rows, cols) by patch arithmetic, independent of pixel_cell_map."""
    if pool == "abs_sum":
        values = values.abs()
    channels, height, width = values.shape
    return values.reshape(channels, height // patch, patch, width // patch, patch).sum(dim=(0, 2, 4))


def assert_close(actual, expected, rtol: float = 1e-4) -> None:
    """Equal up to float32 round-off, measured against the map's scale (signed sums cancel)."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * float(np.abs(expected).max()))


# --- exact properties on the tiny LLaVA ------------------------------------------------------------


def test_tiny_answer_has_several_tokens():
    assert len(tiny("llava").answer.token_ids) >= 2  # per-token maps really differ from the sum


@pytest.mark.parametrize("baseline", ["black", "mean", "blur"])
def test_integrated_gradients_are_complete(baseline):
    prep = tiny("llava")
    exp = get_explainer("gradient.integrated")().explain(prep.loaded, prep, baseline=baseline, n_steps=16)
    with torch.no_grad():
        at_input = token_logprobs(prep, prep.inputs["pixel_values"])
        at_base = token_logprobs(prep, baseline_pixels(prep, baseline))
    change = (at_input - at_base).numpy()
    assert abs(change.sum()) > 1e-4  # the baseline really moves the answer
    # every pixel of the tiny LLaVA lies in a grid cell, so the pooled sums hold all the attribution
    assert exp.scores["off_grid_fraction"] == 0.0
    np.testing.assert_allclose(exp.maps["image"].sum(axis=(1, 2)), change, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(exp.maps["image.answer"].sum(), change.sum(), rtol=1e-3, atol=1e-6)
    assert exp.scores["completeness_gap"] <= 1e-3 * abs(change.sum())
    assert exp.scores["completeness_gap"] == pytest.approx(abs(exp.maps["image.answer"].sum() - change.sum()), abs=1e-5)


def test_integrated_gradients_gap_shrinks_with_steps():
    prep = tiny("llava")
    ig = get_explainer("gradient.integrated")()
    coarse = ig.explain(prep.loaded, prep, n_steps=1, per_token=False)
    fine = ig.explain(prep.loaded, prep, n_steps=16, per_token=False)
    assert fine.scores["completeness_gap"] < coarse.scores["completeness_gap"]
    for exp in (coarse, fine):  # a poor approximation says so
        assert ("warning" in exp.meta) == (exp.scores["completeness_gap_relative"] > GAP_WARNING)
    assert fine.params["n_steps"] == 16 and "blur_radius" not in fine.params


@pytest.mark.parametrize("pool", ["abs_sum", "sum", "l2"])
def test_saliency_equals_plain_autograd_pooled_by_hand(pool):
    prep = tiny("llava")
    exp = get_explainer("gradient.saliency")().explain(prep.loaded, prep, pool=pool)
    patch = prep.model.config.vision_config.patch_size
    pixels = prep.inputs["pixel_values"].detach().clone().requires_grad_(True)
    logp = token_logprobs(prep, pixels)
    for t in range(logp.numel()):
        (grad,) = torch.autograd.grad(logp[t], pixels, retain_graph=True)
        if pool == "l2":
            expected = llava_cells(grad[0].square(), patch, "sum").sqrt()
        else:
            expected = llava_cells(grad[0], patch, pool)
        assert_close(exp.maps["image"][t], expected.numpy())
    (grad,) = torch.autograd.grad(logp.sum(), pixels)
    if pool != "l2":
        assert_close(exp.maps["image.answer"], llava_cells(grad[0], patch, pool).numpy())
    assert exp.params["pool"] == pool


def test_input_x_gradient_is_pixels_times_gradient():
    prep = tiny("llava")
    exp = get_explainer("gradient.input_x_gradient")().explain(prep.loaded, prep)
    patch = prep.model.config.vision_config.patch_size
    pixels = prep.inputs["pixel_values"].detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(token_logprobs(prep, pixels).sum(), pixels)
    expected = llava_cells((grad * pixels)[0].detach(), patch, "sum")
    assert_close(exp.maps["image.answer"], expected.numpy())
    assert exp.params["pool"] == "sum"


@pytest.mark.parametrize(
    "explainer, params",
    [("gradient.saliency", {}), ("gradient.input_x_gradient", {}),
     ("gradient.integrated", {"n_steps": 4, "internal_batch_size": 2, "baseline": "blur"})],
)
def test_batched_engine_matches_captum(explainer, params):
    prep = tiny("llava")
    cls = get_explainer(explainer)
    ours = cls().explain(prep.loaded, prep, engine="batched", **params)
    captum = cls().explain(prep.loaded, prep, engine="captum", **params)
    for name, values in ours.maps.items():
        assert_close(values, captum.maps[name])
    # the batched engine needs one forward per input (per batch of path points), Captum one per token
    assert ours.meta["forward_passes"] < captum.meta["forward_passes"]


@pytest.mark.parametrize("explainer", ["gradient.saliency", "gradient.integrated", "gradient.gradcam"])
def test_vectorised_backward_matches_one_pass_per_token(explainer):
    prep = tiny("llava")
    params = {"n_steps": 4, "internal_batch_size": 2} if explainer == "gradient.integrated" else {}
    one = get_explainer(explainer)().explain(prep.loaded, prep, token_batch=1, **params)
    chunked = get_explainer(explainer)().explain(prep.loaded, prep, token_batch=3, **params)
    for name, values in one.maps.items():
        assert_close(chunked.maps[name], values)


def test_whole_answer_alone_equals_the_sum_of_tokens():
    prep = tiny("llava")
    sal = get_explainer("gradient.saliency")()
    both = sal.explain(prep.loaded, prep)
    alone = sal.explain(prep.loaded, prep, per_token=False)
    assert set(alone.maps) == {"image.answer"}
    assert_close(alone.maps["image.answer"], both.maps["image.answer"])


def test_gradcam_equals_hand_computation():
    prep = tiny("llava")
    exp = get_explainer("gradient.gradcam")().explain(prep.loaded, prep)
    layer = exp.params["layer"]
    # LLaVA reads hidden state vision_feature_layer (-2 here): the block before the last
    assert layer == len(prep.adapter.vision_layers()) + prep.model.config.vision_feature_layer
    store: list[torch.Tensor] = []
    block = prep.adapter.vision_layers()[layer]
    handle = block.register_forward_hook(lambda m, a, out: store.append(out[0] if isinstance(out, tuple) else out))
    try:
        pixels = prep.inputs["pixel_values"].detach().clone().requires_grad_(True)
        logp = token_logprobs(prep, pixels)
    finally:
        handle.remove()
    (act,) = store
    grid = prep.layouts[0].main_grid
    for t in range(logp.numel()):
        (grad,) = torch.autograd.grad(logp[t], act, retain_graph=True)
        patches_act, patches_grad = act[0, 1:].detach(), grad[0, 1:]  # the class token comes first
        weights = patches_grad.mean(dim=0)
        cam = torch.relu((patches_act * weights).sum(dim=-1)).reshape(grid.rows, grid.cols)
        assert_close(exp.maps["image"][t], cam.numpy())
    assert float(np.abs(exp.maps["image.answer"]).sum()) > 0


def test_gradcam_on_a_block_the_model_ignores_is_an_error():
    prep = tiny("llava")
    unused = len(prep.adapter.vision_layers()) - 1  # vision_feature_layer=-2 skips the last block
    with pytest.raises(ValueError, match="does not reach the answer"):
        get_explainer("gradient.gradcam")().explain(prep.loaded, prep, layer=unused)


@pytest.mark.parametrize(
    "explainer, params, word",
    [("gradient.saliency", {"pool": "max"}, "pool"),
     ("gradient.saliency", {"engine": "jax"}, "engine"),
     ("gradient.integrated", {"baseline": "noise"}, "baseline"),
     ("gradient.integrated", {"n_steps": 0}, "n_steps"),
     ("gradient.gradcam", {"layer": 99}, "layer"),
     ("gradient.input_x_gradient", {"steps": 3}, "steps")],
)
def test_bad_parameters_are_one_line_errors(explainer, params, word):
    prep = tiny("llava")
    with pytest.raises(ValueError) as info:
        get_explainer(explainer)().explain(prep.loaded, prep, **params)
    assert word in str(info.value) and "\n" not in str(info.value)


# --- every family ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gets_finite_grid_maps(family):
    prep = tiny(family)
    named = grid_names(prep.layouts)
    count = len(prep.answer.token_ids)
    for explainer in IDS:
        exp = get_explainer(explainer)().explain(prep.loaded, prep, **FAST.get(explainer, {}))
        assert set(exp.maps) == {n for name, _ in named for n in (name, f"{name}.answer")}
        for name, grid in named:
            assert exp.maps[name].shape == (count, grid.rows, grid.cols), (explainer, name)
            assert exp.axes[name] == ("answer_token", "row", "col")
            assert exp.maps[f"{name}.answer"].shape == (grid.rows, grid.cols)
            assert np.isfinite(exp.maps[name]).all() and np.isfinite(exp.maps[f"{name}.answer"]).all()
        assert np.abs(exp.maps["image.answer"]).sum() > 0, explainer  # the answer depends on the pixels
        assert all(np.isfinite(v) for v in exp.scores.values())


# --- the demo model --------------------------------------------------------------------------------


def test_demo_maps_have_the_layout_grid(demo):
    from xmllm.explainers.demo.samples import generate_sample

    sample = generate_sample(0, 0)
    prep = prepare(demo, ExplainSample([sample.image()], sample.text, id=sample.id))
    grid = prep.layouts[0].main_grid
    count = len(prep.answer.token_ids)
    for explainer in IDS:
        exp = get_explainer(explainer)().explain(demo, prep, **FAST.get(explainer, {}))
        assert exp.maps["image"].shape == (count, grid.rows, grid.cols)
        assert exp.maps["image.answer"].shape == (grid.rows, grid.cols)
        assert np.isfinite(exp.maps["image"]).all()
        assert exp.target.positions == prep.answer_positions.tolist()
    assert exp.params["layer"] == len(demo.adapter.vision_layers()) - 1  # the demo reads the last block
