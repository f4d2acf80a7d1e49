"""Occlusion and question-word ablation against forwards we mask by hand, on real models.

The reference here masks the demo model's pixels by its own patch geometry (config patch size)
and the CLIP normalisation of a black pixel, and removes words by editing ``input_ids``: none of
the explainer's helpers (cell map, baselines, batching, question location) are used, so the
explainer must agree with plain model forwards, batched or not.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import (
    FAMILIES,
    TEST_IMAGE_SIZES,
    tiny_image,
)
from loaded_models import tiny_loaded  # noqa: F401  (other test modules import it from here)

from explainers.answering import generate_answer
from explainers.context import ExplainSample, Prepared, prepare
from explainers.demo.samples import generate_samples
from explainers.methods.perturbation import (
    Occlusion,
    TextAblation,
    base_logprobs,
    baseline_pixels,
    cell_map,
    first_image_position,
    shared_prefix,
    windows,
)
from explainers.models import LoadedModel, load_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DEMO_FOLDERS = (Path(__file__).resolve().parents[1] / "explainers/demo/weights/final", Path("/tmp/demo-early-run1"))
TINY_QUESTION = "what colour is the square"
TINY_ANSWER_TOKENS = 3
ATOL = 2e-5
"""Batched and single forwards differ in float32 summation order only."""


# --- models ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    for folder in DEMO_FOLDERS:
        if (folder / "config.json").is_file():
            return load_model(folder, device="cpu", dtype="float32", eager_attention=True)
    pytest.skip("no demo-model checkpoint available")


def demo_prepared(loaded: LoadedModel, index: int = 0, family: str | None = None) -> Prepared:
    sample = generate_samples(index + 1, 0, families=[family] if family else None)[index]
    return prepare(loaded, ExplainSample([sample.image()], sample.text, id=sample.id))




def tiny_prepared(family: str) -> Prepared:
    """A tiny model's own (short) greedy answer on a test image."""
    loaded = tiny_loaded(family)
    image = tiny_image(*TEST_IMAGE_SIZES[family])
    answer = generate_answer(loaded, [image], TINY_QUESTION, max_new_tokens=TINY_ANSWER_TOKENS)
    return prepare(loaded, ExplainSample([image], TINY_QUESTION), answer=answer)


# --- hand-made references --------------------------------------------------------------------------


def black_pixel(loaded: LoadedModel) -> torch.Tensor:
    """A black pixel after the processor's rescale and normalisation, per channel."""
    proc = loaded.processor.image_processor
    mean, std = torch.tensor(proc.image_mean), torch.tensor(proc.image_std)
    return (0.0 - mean) / std


def occlude_by_hand(prep: Prepared, cells: list[tuple[int, int]]) -> torch.Tensor:
    """pixel_values with each cell's patch-size square set to black, from the config's patch size."""
    patch = int(prep.model.config.vision_config.patch_size)
    pixels = prep.inputs["pixel_values"].clone()
    black = black_pixel(prep.loaded).to(pixels)
    for r, c in cells:
        pixels[:, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = black[:, None, None]
    return pixels


@torch.no_grad()
def answer_logprobs(prep: Prepared, shift: int = 0, **inputs) -> torch.Tensor:
    """Each answer token's log-prob from one plain forward of ``inputs`` (the final sequence's by
    default); ``shift`` moves the answer left when a prompt token was removed."""
    logits = prep.model(**{**dict(prep.inputs), **inputs}).logits[0].float()
    logp = torch.log_softmax(logits[prep.logit_positions - shift], dim=-1)
    return logp[torch.arange(len(prep.answer.token_ids)), torch.tensor(prep.answer.token_ids)]


# --- occlusion -------------------------------------------------------------------------------------


def test_occlusion_equals_forward_with_the_patch_masked_by_hand(demo):
    prep = demo_prepared(demo)
    exp = Occlusion().explain(demo, prep, window=1, baseline="black", batch_size=8)
    grid = prep.layouts[0].main_grid
    assert exp.maps["image"].shape == (len(prep.answer.token_ids), grid.rows, grid.cols)
    assert exp.axes["image"] == ("answer_token", "row", "col") and exp.axes["image.answer"] == ("row", "col")
    original = answer_logprobs(prep)
    worst = tuple(exp.meta["worst_window"]["cells"][0])
    for cell in [(0, 0), (grid.rows - 1, grid.cols // 2), worst]:
        drop = original - answer_logprobs(prep, pixel_values=occlude_by_hand(prep, [cell]))
        np.testing.assert_allclose(exp.maps["image"][:, cell[0], cell[1]], drop.numpy(), atol=ATOL)
    np.testing.assert_allclose(exp.maps["image.answer"], exp.maps["image"].sum(axis=0), atol=ATOL)
    masked = answer_logprobs(prep, pixel_values=occlude_by_hand(prep, [worst])).sum()
    assert math.isclose(exp.scores["prob_answer_worst"], float(masked.exp()), rel_tol=1e-4)
    assert exp.scores["prob_answer_worst"] == pytest.approx(
        math.exp(exp.scores["logprob_answer"] - float(exp.maps["image.answer"].max())), rel=1e-4)


def test_occlusion_window_gives_each_cell_its_window_drop(demo):
    prep = demo_prepared(demo, 1)
    exp = Occlusion().explain(demo, prep, window=2, stride=2, baseline="black")
    block = [(2, 4), (2, 5), (3, 4), (3, 5)]
    drop = answer_logprobs(prep) - answer_logprobs(prep, pixel_values=occlude_by_hand(prep, block))
    for r, c in block:
        np.testing.assert_allclose(exp.maps["image"][:, r, c], drop.numpy(), atol=ATOL)
    grid = prep.layouts[0].main_grid
    assert exp.scores["windows"] == (grid.rows // 2) * (grid.cols // 2)


def test_occlusion_batched_equals_unbatched(demo):
    prep = demo_prepared(demo, 2)
    params = {"window": 3, "stride": 2, "baseline": "noise", "seed": 3}  # overlapping windows
    one = Occlusion().explain(demo, prep, batch_size=1, **params)
    many = Occlusion().explain(demo, prep, batch_size=7, **params)
    for name in ("image", "image.answer"):
        np.testing.assert_allclose(one.maps[name], many.maps[name], atol=ATOL)
    assert many.scores["forwards"] < one.scores["forwards"]


def test_baselines_are_what_the_processor_makes_of_them(demo):
    prep = demo_prepared(demo)
    black = baseline_pixels(prep, "black")
    expected = black_pixel(demo).to(black)[None, :, None, None].expand_as(black)
    torch.testing.assert_close(black, expected, atol=1e-5, rtol=0)
    mean = baseline_pixels(prep, "mean")
    assert torch.allclose(mean, mean[:, :, :1, :1].expand_as(mean))  # one colour
    assert torch.equal(baseline_pixels(prep, "noise", seed=1), baseline_pixels(prep, "noise", seed=1))
    assert not torch.equal(baseline_pixels(prep, "noise", seed=1), baseline_pixels(prep, "noise", seed=2))
    blur = baseline_pixels(prep, "blur")
    assert blur.std() < prep.inputs["pixel_values"].std()


@pytest.mark.parametrize(
    "params, fragment",
    [({"window": 0}, "window=0"), ({"baseline": "grey"}, "baseline='grey'"), ({"batch_size": -1}, "batch_size=-1"),
     ({"views": "tiles"}, "views='tiles'"), ({"windw": 2}, "windw"),
     ({"baseline": "blur", "blur_radius": -1.0}, "blur_radius=-1.0"), ({"seed": "x"}, "seed='x'")],
)
def test_occlusion_bad_parameters_are_one_line_errors(demo, params, fragment):
    with pytest.raises(ValueError, match=fragment):
        Occlusion().explain(demo, demo_prepared(demo), **params)


# --- text ablation ----------------------------------------------------------------------------------


def test_question_words_are_located_not_assumed(demo):
    prep = demo_prepared(demo)
    exp = TextAblation().explain(demo, prep)
    words = exp.meta["words"]
    tokenizer = demo.processor.tokenizer
    located = tokenizer.decode([int(prep.inputs["input_ids"][0, w["position"]]) for w in words])
    assert located.split() == tokenizer.decode(tokenizer(prep.sample.question, add_special_tokens=False)["input_ids"]).split()
    target = exp.target
    ablated = {w["prompt_index"] for w in words}
    for j, position in enumerate(target.prompt_positions):
        column = exp.maps["prompt"][:, j]
        assert np.isnan(column).all() == (j not in ablated), (position, target.prompt_tokens[j])
    special = set(tokenizer.all_special_ids)
    assert not any(int(prep.inputs["input_ids"][0, w["position"]]) in special for w in words)


def test_text_drop_equals_forward_with_the_word_removed(demo):
    prep = demo_prepared(demo, 3)
    exp = TextAblation().explain(demo, prep, mode="drop", batch_size=4)
    original = answer_logprobs(prep)
    ids, mask = prep.inputs["input_ids"], prep.inputs["attention_mask"]
    for word in exp.meta["words"]:
        p = word["position"]
        kept = torch.cat([torch.arange(p), torch.arange(p + 1, ids.shape[1])])
        drop = original - answer_logprobs(prep, shift=1, input_ids=ids[:, kept], attention_mask=mask[:, kept])
        np.testing.assert_allclose(exp.maps["prompt"][:, word["prompt_index"]], drop.numpy(), atol=ATOL)


def test_text_replace_equals_forward_with_the_word_replaced(demo):
    prep = demo_prepared(demo, 4)
    exp = TextAblation().explain(demo, prep, mode="replace")
    unk = demo.processor.tokenizer.unk_token_id
    assert exp.params["replacement"] == unk
    original = answer_logprobs(prep)
    for word in exp.meta["words"][:3]:
        ids = prep.inputs["input_ids"].clone()
        ids[0, word["position"]] = unk
        drop = original - answer_logprobs(prep, input_ids=ids)
        np.testing.assert_allclose(exp.maps["prompt"][:, word["prompt_index"]], drop.numpy(), atol=ATOL)


def test_text_ablation_bad_parameters(demo):
    prep = demo_prepared(demo)
    with pytest.raises(ValueError, match="mode='swap'"):
        TextAblation().explain(demo, prep, mode="swap")
    with pytest.raises(ValueError, match="replacement='notaword'"):
        TextAblation().explain(demo, prep, mode="replace", replacement="notaword")


# --- every family -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_perturbation_runs_on_every_family(family):
    prep = tiny_prepared(family)
    answer_tokens = len(prep.answer.token_ids)
    grid = prep.layouts[0].main_grid
    occ = Occlusion().explain(prep.loaded, prep, window=2, stride=2, batch_size=4)
    assert occ.maps["image"].shape == (answer_tokens, grid.rows, grid.cols)
    assert np.isfinite(occ.maps["image"]).all() and np.isfinite(occ.maps["image.answer"]).all()
    for mode in ("drop", "replace"):
        text = TextAblation().explain(prep.loaded, prep, mode=mode, batch_size=8)
        values = text.maps["prompt"]
        assert values.shape == (answer_tokens, len(prep.text_positions))
        ablated = [w["prompt_index"] for w in text.meta["words"]]
        assert ablated and np.isfinite(values[:, ablated]).all()
        assert np.isnan(np.delete(values, ablated, axis=1)).all()


PREFIX_FAMILIES = ("llava", "llava_next", "idefics3", "smolvlm")
"""Families whose forward resumes from a text-only prefix cache exactly as a full forward."""
WHOLE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "paligemma", "gemma3")
"""Families that must run every copy whole: multimodal rope or token-type inputs, or no text
before the image."""


@pytest.mark.parametrize("family", PREFIX_FAMILIES + WHOLE_FAMILIES)
def test_prefix_cache_map_equals_the_uncached_map(family):
    """The shared prefix cache is an optimisation only: with it, the map is the uncached map within
    float tolerance where it applies; where it does not, occlusion runs whole and says so."""
    prep = tiny_prepared(family)
    params = {"window": 2, "stride": 1, "batch_size": 3}  # overlapping windows, a short last batch
    cached = Occlusion().explain(prep.loaded, prep, **params)
    whole = Occlusion().explain(prep.loaded, prep, prefix_cache=False, **params)
    assert whole.scores["prefix_tokens"] == 0 and whole.params["prefix_cache"] is False
    for name in ("image", "image.answer"):
        np.testing.assert_allclose(cached.maps[name], whole.maps[name], atol=ATOL)
    assert np.abs(whole.maps["image"]).max() > 0 or family == "gemma3"
    if family in PREFIX_FAMILIES:
        assert cached.scores["prefix_tokens"] == first_image_position(prep) >= 1
    else:
        assert cached.scores["prefix_tokens"] == 0


def test_prefix_cache_refuses_a_reference_it_does_not_reproduce():
    """The cache is trusted only after it reproduces the full forward's answer log-probabilities."""
    prep = tiny_prepared("llava")
    reference = base_logprobs(prep)
    prefix = shared_prefix(prep, reference)
    assert prefix is not None and prefix.length == first_image_position(prep)
    assert shared_prefix(prep, reference + 1e-2) is None


def test_prefix_cache_bad_parameter():
    prep = tiny_prepared("llava")
    with pytest.raises(ValueError, match="prefix_cache='yes'"):
        Occlusion().explain(prep.loaded, prep, prefix_cache="yes")


@pytest.mark.parametrize("family", ["llava_next", "idefics3", "qwen2_vl"])
def test_windows_reach_every_view_of_a_region_exactly_once(family):
    """Tiling the main grid with windows occludes every cell of every grid (tiles, global or
    base view) exactly once: a region is hidden in all the views the model sees it through."""
    prep = tiny_prepared(family)
    layout = prep.layouts[0]
    wins = windows(layout, 1, 1, "all")
    reached = torch.cat([w.positions for w in wins])
    every = torch.cat([g.positions for g in layout.grids if g.region is not None])
    assert sorted(reached.tolist()) == sorted(every.tolist())
    main = set(layout.main_grid.positions.tolist())
    assert all(set(w.positions.tolist()) & main for w in wins)
    mapping = cell_map(prep)
    assert set(torch.unique(mapping).tolist()) - {-1} <= set(every.tolist())
