"""Occlusion and question-word ablation against forwards we mask by hand, on real models.

The reference here masks the demo model's pixels by its own patch geometry (config patch size)
and the CLIP normalisation of a black pixel, and removes words by editing ``input_ids``: none of
the explainer's helpers (cell map, baselines, batching, question location) are used, so the
explainer must agree with plain model forwards, batched or not.
"""
from __future__ import annotations

import math
import numpy as np
import pytest
import torch


from tiny_models import (
    FAMILIES,
    TEST_IMAGE_SIZES,
    tiny_image,
)
from loaded_models import black_pixel, demo_prepared, occlude_by_hand, tiny_loaded

from xmllm.explainers.answering import generate_answer
from xmllm.explainers.prepared import ExplainSample, Prepared, prepare
from xmllm.explainers.memory import MAX_COPIES_CPU, SAFETY, forward_copy_bytes, memory_budget
from xmllm.explainers.forward import LogitRows, base_logprobs, batch_size_for, first_image_position, logprobs_at, shared_prefix
from xmllm.explainers.methods.perturbation import Occlusion, TextAblation
from xmllm.explainers.masking import PixelCells, baseline_pixels, cell_map, occluded_logprobs, windows

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TINY_QUESTION = "what colour is the square"
TINY_ANSWER_TOKENS = 3
ATOL = 2e-5
"""Batched and single forwards differ in float32 summation order only."""


# --- models ---------------------------------------------------------------------------------------


def tiny_prepared(family: str) -> Prepared:
    """A tiny model's own (short) greedy answer on a test image."""
    loaded = tiny_loaded(family)
    image = tiny_image(*TEST_IMAGE_SIZES[family])
    answer = generate_answer(loaded, [image], TINY_QUESTION, max_new_tokens=TINY_ANSWER_TOKENS)
    return prepare(loaded, ExplainSample([image], TINY_QUESTION), answer=answer)


# --- hand-made references --------------------------------------------------------------------------


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
def test_shortcut_maps_equal_the_plain_map(family):
    """The shared prefix cache and the logit-row cut are optimisations only: with them, the map is
    the plain map within float tolerance where they apply; where the prefix does not, occlusion
    runs whole and says so. Every family's last block is row-wise after attention."""
    prep = tiny_prepared(family)
    params = {"window": 2, "stride": 1, "batch_size": 3}  # overlapping windows, a short last batch
    fast = Occlusion().explain(prep.loaded, prep, **params)
    plain = Occlusion().explain(prep.loaded, prep, prefix_cache=False, logit_rows=False, **params)
    assert plain.scores["prefix_tokens"] == 0 and plain.params["prefix_cache"] is False
    assert fast.meta["logit_rows_only"] is True and plain.meta["logit_rows_only"] is False
    for name in ("image", "image.answer"):
        np.testing.assert_allclose(fast.maps[name], plain.maps[name], atol=ATOL)
    assert np.abs(plain.maps["image"]).max() > 0
    if family in PREFIX_FAMILIES:
        assert fast.scores["prefix_tokens"] == first_image_position(prep) >= 1
    else:
        assert fast.scores["prefix_tokens"] == 0


def test_shortcuts_refuse_a_reference_they_do_not_reproduce():
    """The prefix cache and the logit-row cut are trusted only after the first forward's unoccluded
    row reproduces the plain forward's answer log-probabilities; otherwise every copy runs plainly,
    and the plain scores are still the true ones."""
    prep = tiny_prepared("llava")
    reference = base_logprobs(prep)
    prefix = shared_prefix(prep)
    assert prefix is not None and prefix.length == first_image_position(prep)
    sets = [w.positions for w in windows(prep.layouts[0], 2, 2, "main")]
    pixels, cells = baseline_pixels(prep, "black"), PixelCells(cell_map(prep))
    fast, used = occluded_logprobs(prep, pixels, cells, sets, 3, reference)
    assert used["prefix_tokens"] == prefix.length and used["logit_rows_only"]
    refused, fallback = occluded_logprobs(prep, pixels, cells, sets, 3, reference + 1e-2)
    assert fallback == {"prefix_tokens": 0, "logit_rows_only": False,
                        "forwards": 2 + math.ceil(len(sets) / 3)}  # prefix, the refused check, the plain ones
    plain, none = occluded_logprobs(prep, pixels, cells, sets, 3, reference, prefix_cache=False, logit_rows=False)
    assert none["forwards"] == math.ceil(len(sets) / 3)
    torch.testing.assert_close(refused, plain, rtol=0, atol=0)
    torch.testing.assert_close(fast, plain, rtol=0, atol=ATOL)


def test_shortcut_bad_parameters():
    prep = tiny_prepared("llava")
    with pytest.raises(ValueError, match="prefix_cache='yes'"):
        Occlusion().explain(prep.loaded, prep, prefix_cache="yes")
    with pytest.raises(ValueError, match="logit_rows=1"):
        Occlusion().explain(prep.loaded, prep, logit_rows=1)


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


def test_logit_rows_run_the_last_block_on_the_logit_rows_only():
    """Inside the cut, the last block's MLP and attention output projection see the logit rows only
    (the work skipped), earlier blocks see every row, and the log-probabilities are unchanged."""
    prep = tiny_prepared("llava")
    points = prep.adapter.hook_points()
    last = len(prep.adapter.decoder_layers()) - 1
    watched = {name: points[name] for name in (f"decoder.blocks.{last}.mlp", f"decoder.blocks.{last}.attn.out",
                                               f"decoder.blocks.{last - 1}.mlp")}
    seen: dict[str, int] = {}
    # a forward hook reads the input as the module ran on it (after any pre-hook's cut)
    handles = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0].shape[1]))
               for n, m in watched.items()]
    ids = torch.as_tensor(prep.answer.token_ids)
    try:
        with torch.inference_mode():
            cut = logprobs_at(prep.model, dict(prep.inputs), prep.logit_positions, ids, rows=LogitRows.of(prep))
            rows_cut = dict(seen)
            plain = logprobs_at(prep.model, dict(prep.inputs), prep.logit_positions, ids)
    finally:
        for handle in handles:
            handle.remove()
    answer_rows = len(prep.answer.token_ids)
    assert rows_cut == {f"decoder.blocks.{last}.mlp": answer_rows, f"decoder.blocks.{last}.attn.out": answer_rows,
                        f"decoder.blocks.{last - 1}.mlp": prep.seq_len}
    assert seen[f"decoder.blocks.{last}.mlp"] == prep.seq_len  # hooks gone: the next forward runs whole
    torch.testing.assert_close(cut, plain, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["llava", "llava_next", "idefics3", "qwen2_vl"])
def test_pixel_cells_mask_exactly_the_pixels_the_map_assigns(family):
    """The sorted-run index masks, per copy, exactly the pixel values whose cell-map entry is one of
    the set's positions (a plain ``isin`` over the whole map), tiles and padding included."""
    prep = tiny_prepared(family)
    mapping, pixels = cell_map(prep), prep.inputs["pixel_values"]
    baseline = torch.full_like(pixels, 7.0)
    positions = torch.unique(mapping[mapping >= 0])
    sets = [positions[:1], positions[3:9], torch.empty(0, dtype=torch.long), positions[::5], positions]
    copies = PixelCells(mapping).masked(pixels, baseline, sets).view(len(sets), *pixels.shape)
    for copy, chosen in zip(copies, sets):
        expected = torch.where(torch.isin(mapping, chosen), baseline, pixels)
        assert torch.equal(copy, expected)
    with pytest.raises(ValueError, match="cell map"):
        PixelCells(mapping).masked(pixels[..., :-1], baseline, sets)


def test_cpu_batch_size_fits_the_memory_budget():
    """Small models get the full CPU batch; where one copy's forward is large the batch is as many
    copies as fit the run's memory budget (a wider MLP: fewer), never fewer than one; an explicit
    batch_size wins."""
    prep = tiny_prepared("llava")
    assert batch_size_for(prep, None) == MAX_COPIES_CPU
    assert batch_size_for(prep, 5) == 5
    one = int(forward_copy_bytes(prep) * SAFETY) + 1
    with memory_budget(8 * one):
        assert batch_size_for(prep, None) == 8
        assert batch_size_for(prep, 5) == 5
    with memory_budget(one // 2):  # one copy overflows the budget: still one
        assert batch_size_for(prep, None) == 1
    text = prep.model.config.get_text_config()
    before = text.intermediate_size
    try:
        with memory_budget(8 * one):
            text.intermediate_size = 4 * before  # wider copies, fewer of them
            assert batch_size_for(prep, None) < 8
    finally:
        text.intermediate_size = before
    with pytest.raises(ValueError, match="batch_size=0"):
        batch_size_for(prep, 0)
