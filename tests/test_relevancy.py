"""Relevancy (Chefer et al. rules 5-6) against a slow, literal implementation, on real models.

The reference (``relevancy_reference.py``) does what the paper says in the plainest way: one fresh forward and one
backward per target, attention gradients kept with ``retain_grad``, full ``n x n`` matrices
``R <- R + A_bar @ R`` from ``R = I``, and the full normalised vision matrix. The explainer must
agree with it to float32 precision while doing one forward and row recursions only.
"""
from __future__ import annotations

import numpy as np
import pytest

from relevancy_reference import TINY_ANSWER, TINY_QUESTION, assert_close, forced, slow_relevancy, tiny_loaded, tiny_prepared
from tiny_models import FAMILIES, TEST_IMAGE_SIZES, tiny_image

from xmllm.explainers.prepared import ExplainSample
from xmllm.explainers.methods.relevancy import CheferRelevancy, ModalityRelevancy
from xmllm.explainers.relevancy_propagation import compute_relevancy
from xmllm.explainers.models import LoadedModel

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# --- models ---------------------------------------------------------------------------------------


def demo_prepared(demo: LoadedModel, text: str):
    from xmllm.explainers.demo.samples import generate_sample

    sample = generate_sample(0, 1)
    return forced(demo, [sample.image()], sample.text, text)


# --- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["logprob", "logit"])
def test_matches_slow_reference_on_tiny_model(target):
    prepared = tiny_prepared("llava")
    result = compute_relevancy(prepared, target=target)
    T = len(prepared.answer.token_ids)
    assert T > 1 and result.decoder.shape == (T, prepared.seq_len)
    for k in range(T):
        assert_close(result.decoder[k], slow_relevancy(prepared, k, target))
    assert_close(result.decoder_answer, slow_relevancy(prepared, "answer", target))
    assert float(result.decoder.abs().sum()) > 0


@pytest.mark.parametrize("through", ["decoder", "vision", "both"])
def test_matches_slow_reference_on_demo_model(demo, through):
    prepared = demo_prepared(demo, "red circle blue")
    result = compute_relevancy(prepared, through=through)
    T = len(prepared.answer.token_ids)
    assert T == 3
    for k in range(T):
        assert_close(result.image[k], slow_relevancy(prepared, k, through=through))
        assert_close(result.decoder[k], slow_relevancy(prepared, k))
    assert_close(result.image_answer, slow_relevancy(prepared, "answer", through=through))


def test_batched_gradients_equal_one_at_a_time(demo):
    prepared = demo_prepared(demo, "red circle blue square")
    one = compute_relevancy(prepared, through="both", batch=1)
    many = compute_relevancy(prepared, through="both", batch=3)
    assert many.backward_calls == 2 and one.backward_calls == 5  # 4 tokens + the whole answer
    assert_close(many.decoder, one.decoder)
    assert_close(many.image, one.image)
    assert_close(many.decoder_answer, one.decoder_answer)


# --- per-token behaviour ------------------------------------------------------------------------------


def test_each_answer_token_gets_its_own_map(demo):
    prepared = demo_prepared(demo, "red circle blue")
    exp = CheferRelevancy().explain(demo, prepared)
    maps = exp.maps["image"]
    assert maps.shape[0] == 3 and exp.axes["image"] == ("answer_token", "row", "col")
    assert exp.target.positions == prepared.answer_positions.tolist()
    for a in range(3):
        for b in range(a + 1, 3):
            assert not np.allclose(maps[a], maps[b]), f"answer tokens {a} and {b} share a map"
    prompt = exp.maps["prompt"]
    assert prompt.shape == (3, len(exp.target.prompt_positions))
    assert not np.allclose(prompt[0], prompt[1])


def test_repeated_answer_token_keeps_a_map_per_position(demo):
    prepared = demo_prepared(demo, "red red red")
    ids = prepared.answer.token_ids
    assert len(ids) == 3 and len(set(ids)) == 1
    exp = CheferRelevancy().explain(demo, prepared)
    maps = exp.maps["image"]
    assert len(set(exp.target.positions)) == 3
    for a in range(3):
        for b in range(a + 1, 3):
            assert not np.allclose(maps[a], maps[b])
    for k in range(3):  # each one is the relevancy of its own position, not of the last occurrence
        grid = prepared.layouts[0].main_grid
        expected = slow_relevancy(prepared, k)[grid.positions.numpy()].reshape(grid.rows, grid.cols)
        assert_close(maps[k], expected)


def test_modality_shares_sum_to_one(demo):
    prepared = demo_prepared(demo, "red circle blue")
    exp = ModalityRelevancy().explain(demo, prepared, top_k=4)
    share = exp.maps["share"]
    assert exp.axes["share"] == ("answer_token", "modality") and share.shape == (3, 2)
    assert exp.meta["modalities"] == ["image", "text"]
    np.testing.assert_allclose(share.sum(axis=1), 1.0, rtol=1e-6)
    assert (share >= 0).all()
    whole = exp.maps["share.answer"]
    assert exp.scores["image_share"] + exp.scores["text_share"] == pytest.approx(1.0)
    assert exp.scores["image_share"] == pytest.approx(float(whole[0]))
    # the shares are those of the chefer rows, recomputed here from its maps
    chefer = CheferRelevancy().explain(demo, prepared)
    result = compute_relevancy(prepared)
    image = result.decoder[:, prepared.image_positions].sum(-1)
    text = result.decoder[:, prepared.text_positions].sum(-1)
    np.testing.assert_allclose(share[:, 0], (image / (image + text)).numpy(), rtol=1e-5)
    assert chefer.scores["image_share"] == pytest.approx(float(share[:, 0].mean()), rel=1e-5)
    # top prompt words: by position, with their strings, most relevant first
    tokens = prepared.tokens()
    text_positions = set(prepared.text_positions.tolist())
    for k, top in enumerate(exp.meta["top_prompt_tokens"]):
        assert len(top) == 4
        assert [t["relevancy"] for t in top] == sorted((t["relevancy"] for t in top), reverse=True)
        for entry in top:
            assert entry["position"] in text_positions and entry["token"] == tokens[entry["position"]]
            column = exp.target.prompt_positions.index(entry["position"])
            assert entry["relevancy"] == pytest.approx(float(exp.maps["prompt"][k, column]))


def test_the_model_own_answer_on_the_demo(demo):
    from xmllm.explainers.demo.samples import generate_sample

    sample = generate_sample(0, 2)
    exp = CheferRelevancy().explain(demo, ExplainSample([sample.image()], sample.text, id=sample.id))
    assert exp.target.text and exp.maps["image"].shape[0] == len(exp.target.token_ids)
    assert np.isfinite(exp.maps["image"]).all() and exp.maps["image"].max() > 0
    assert exp.params == {"through": "decoder", "target": "logit", "batch": 1, "recompute": False}


# --- every family ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_smoke_every_family(family):
    prepared = tiny_prepared(family)
    loaded = prepared.loaded
    T = len(prepared.answer.token_ids)
    exp = CheferRelevancy().explain(loaded, prepared)
    main = prepared.layouts[0].main_grid
    assert exp.maps["image"].shape == (T, main.rows, main.cols)
    assert exp.maps["image.answer"].shape == (main.rows, main.cols)
    for index, layout in enumerate(prepared.layouts):
        for grid in layout.grids:
            name = "image" if index == 0 and grid is layout.main_grid else f"image{index}.{grid.name}"
            assert exp.maps[name].shape == (T, grid.rows, grid.cols)
            assert exp.axes[f"{name}.answer"] == ("row", "col")
    for name, array in exp.maps.items():
        assert np.isfinite(array).all(), name
    total = sum(float(a.sum()) for n, a in exp.maps.items() if n.endswith(".answer"))
    assert total > 0
    modality = ModalityRelevancy().explain(loaded, prepared)
    np.testing.assert_allclose(modality.maps["share"].sum(axis=1), 1.0, rtol=1e-6)


NO_VISION_WEIGHTS = {"qwen2_vl", "qwen2_5_vl"}
"""Families whose vision attention runs per-image chunks and returns no weights."""


@pytest.mark.parametrize("family", FAMILIES)
def test_through_the_vision_tower_on_every_family(family):
    prepared = tiny_prepared(family)
    if family in NO_VISION_WEIGHTS:
        with pytest.raises(ValueError, match="through='decoder'"):
            compute_relevancy(prepared, through="both")
        return
    result = compute_relevancy(prepared, through="both")
    assert float(result.image.sum()) > 0
    for k in range(len(prepared.answer.token_ids)):
        assert_close(result.image[k], slow_relevancy(prepared, k, through="both"))


def test_explanations_save_and_load(demo, tmp_path):
    from xmllm.explainers.explanation import Explanation

    prepared = demo_prepared(demo, "red circle")
    for explainer in (CheferRelevancy(), ModalityRelevancy()):
        exp = explainer.explain(demo, prepared)
        exp.save(tmp_path / explainer.id)
        back = Explanation.load(tmp_path / explainer.id)
        assert back.meta == exp.meta and back.scores == exp.scores and back.axes == exp.axes
        for name, array in exp.maps.items():
            np.testing.assert_array_equal(back.maps[name], array)


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, word",
    [({"through": "pixels"}, "through"), ({"target": "prob"}, "target"), ({"batch": 0}, "batch"),
     ({"layers": 3}, "layers")],
)
def test_bad_parameters_are_one_line_errors(params, word):
    prepared = tiny_prepared("llava")
    with pytest.raises(ValueError, match=word):
        CheferRelevancy().explain(prepared.loaded, prepared, **params)


def test_a_model_loaded_with_fused_attention_is_switched_to_eager_and_back():
    eager = tiny_prepared("llava")
    loaded = tiny_loaded("llava", eager=False)
    before = loaded.model.config._attn_implementation
    assert before != "eager"
    prepared = forced(loaded, [tiny_image(*TEST_IMAGE_SIZES["llava"])], TINY_QUESTION, TINY_ANSWER)
    fused = compute_relevancy(prepared)
    assert loaded.model.config._attn_implementation == before
    assert_close(fused.decoder, compute_relevancy(eager).decoder)


def test_a_frozen_model_gives_the_same_relevancy():
    prepared = tiny_prepared("llava")
    model = prepared.model
    expected = compute_relevancy(prepared, through="both")
    flags = [p.requires_grad for p in model.parameters()]
    try:
        model.requires_grad_(False)  # as after freezing for inference: no parameter builds a graph
        frozen = compute_relevancy(prepared, through="both")
    finally:
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)
    assert_close(frozen.decoder, expected.decoder)
    assert_close(frozen.image, expected.image)
