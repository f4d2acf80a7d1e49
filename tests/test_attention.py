"""Attention capture and the attention views, checked against plain ``output_attentions`` forwards.

Every reference here is computed independently from the full attention tensors of a real
forward pass (``output_attentions=True``), never from the capture's own code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


from tiny_models import FAMILIES, TEST_IMAGE_SIZES, build_tiny, missing_dependency, tiny_image

from xmllm.explainers.answering import Answer
from xmllm.explainers.capture import (
    AttentionRecorder,
    RolloutOptions,
    attn_implementations,
    capture_forward,
    capture_generate,
    eager_attention,
    full_attention_bytes,
)
from xmllm.explainers.prepared import ExplainSample, Prepared, prepare
from xmllm.explainers.models import LoadedModel, adapter_for, load_model
from xmllm.explainers.registry import Need, get_explainer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

QUESTION = "what colour is the square"
NEW_TOKENS = 4
EXACT = 1e-6  # same kernel, same inputs: only summation order may differ
CACHED = 1e-5  # KV-cached decode rows against the teacher-forced forward
DEMO_CANDIDATES = (Path(__file__).resolve().parents[1] / "explainers/demo/weights/final", Path("/tmp/demo-early-run1"))
IDS = ("attention.raw", "attention.summary", "attention.rollout")

_CACHE: dict[str, LoadedModel] = {}


def tiny_loaded(family: str) -> LoadedModel:
    """A tiny model of ``family`` as a LoadedModel, left on its default (non-eager) kernel."""
    package = missing_dependency(family)
    if package:
        pytest.skip(f"the {family} processor needs {package}, which is not installed")
    if family not in _CACHE:
        model, processor = build_tiny(family)
        _CACHE[family] = LoadedModel(
            model, processor, adapter_for(model, processor), f"tiny-{family}", "tests", torch.device("cpu"), torch.float32
        )
    return _CACHE[family]


def tiny_sample(family: str) -> ExplainSample:
    return ExplainSample([tiny_image(*TEST_IMAGE_SIZES[family])], QUESTION, id=f"tiny-{family}")


@pytest.fixture(scope="module")
def llava() -> LoadedModel:
    return tiny_loaded("llava")


GEN_FAMILY = "llava_next"
"""Its tiny random model answers with several tokens before any special one (the tiny LLaVA stops at one)."""


@pytest.fixture(scope="module")
def generated() -> tuple[Prepared, object]:
    """A several-token answer captured during the model's own generate."""
    return capture_generate(tiny_loaded(GEN_FAMILY), tiny_sample(GEN_FAMILY), max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def long_prepared(llava) -> Prepared:
    """A given four-token answer with a repeated token, so rows and rollouts span several steps."""
    tok = llava.processor.tokenizer
    red = tok("red", add_special_tokens=False)["input_ids"]
    ids = tuple(red + tok(" is", add_special_tokens=False)["input_ids"] + red + red)
    answer = Answer(tok.decode(ids), ids, tuple(tok.convert_ids_to_tokens(list(ids))), (1.0,) * len(ids))
    return prepare(llava, tiny_sample("llava"), answer=answer)


def full_attentions(prepared: Prepared) -> torch.Tensor:
    """``(layers, heads, seq, seq)`` from a plain output_attentions=True forward of the final sequence."""
    with eager_attention(prepared.model), torch.no_grad():
        out = prepared.forward(output_attentions=True)
    return torch.stack([a[0] for a in out.attentions]).float()


# --- capture ------------------------------------------------------------------------------------


def test_forward_capture_rows_equal_output_attentions(long_prepared):
    full = full_attentions(long_prepared)
    record = capture_forward(long_prepared)
    expected = full[:, :, long_prepared.logit_positions].permute(2, 0, 1, 3)  # (T, L, H, S)
    assert record.source == "forward" and record.rows.shape == expected.shape
    torch.testing.assert_close(record.rows, expected, atol=EXACT, rtol=0)
    assert torch.equal(record.query_positions, long_prepared.logit_positions)


def test_generate_capture_rows_equal_the_teacher_forced_forward(generated):
    prepared, record = generated
    assert record.source == "generate" and record.rows.shape[0] == len(prepared.answer.token_ids) > 1
    full = full_attentions(prepared)
    expected = full[:, :, prepared.logit_positions].permute(2, 0, 1, 3)
    torch.testing.assert_close(record.rows, expected, atol=CACHED, rtol=0)
    forward = capture_forward(prepared)
    torch.testing.assert_close(record.rows, forward.rows, atol=CACHED, rtol=0)
    for name, values in forward.blocks.items():
        torch.testing.assert_close(record.blocks[name], values, atol=CACHED, rtol=0)


def test_rows_sum_to_one_and_keys_after_the_query_are_zero(generated):
    prepared, record = generated
    torch.testing.assert_close(record.rows.sum(-1), torch.ones(record.rows.shape[:-1]), atol=CACHED, rtol=0)
    for t, query in enumerate(prepared.logit_positions.tolist()):
        assert bool((record.rows[t, ..., query + 1 :] == 0).all())


def test_capture_restores_the_attention_kernel_and_keeps_little(generated):
    prepared, record = generated
    model = prepared.model
    before = attn_implementations(model.config)
    assert before[""] != "eager"  # the tiny model is built with its default kernel
    capture_forward(prepared)
    assert attn_implementations(model.config) == before
    with eager_attention(model), torch.no_grad():
        out = model.generate(**prepared.inputs, max_new_tokens=1, output_attentions=True,
                                   return_dict_in_generate=True)
    full_prefill = full_attention_bytes(out.attentions)
    assert 0 < record.nbytes() < full_prefill  # one prefill alone is bigger than every answer row


def test_mixed_kernels_are_restored_exactly(llava):
    model = llava.model
    before = attn_implementations(model.config)
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    try:
        mixed = attn_implementations(model.config)
        with eager_attention(model):
            assert attn_implementations(model.config)["vision_config"][""] == "eager"
        assert attn_implementations(model.config) == mixed
    finally:
        model.set_attn_implementation(before)


def test_decoder_rollout_is_refused_during_generate(llava, long_prepared):
    with pytest.raises(ValueError, match="capture_forward"):
        AttentionRecorder(llava, long_prepared.image_positions, long_prepared.text_positions, rollout=RolloutOptions())


# --- attention.raw --------------------------------------------------------------------------------


def test_raw_maps_are_the_rows_over_grid_and_prompt(llava, long_prepared):
    exp = get_explainer("attention.raw")().explain(llava, long_prepared)
    full = full_attentions(long_prepared)
    rows = full[:, :, long_prepared.logit_positions].permute(2, 0, 1, 3)
    grid = long_prepared.layouts[0].main_grid
    assert exp.axes["image"] == ("answer_token", "layer", "head", "row", "col")
    expected = rows[..., grid.positions].reshape(*rows.shape[:3], grid.rows, grid.cols)
    np.testing.assert_allclose(exp.maps["image"], expected.numpy(), atol=EXACT)
    assert exp.axes["prompt"] == ("answer_token", "layer", "head", "prompt_token")
    np.testing.assert_allclose(exp.maps["prompt"], rows[..., long_prepared.text_positions].numpy(), atol=EXACT)
    assert exp.target.prompt_positions == long_prepared.text_positions.tolist()


def test_repeated_answer_token_keeps_a_map_per_position(llava, long_prepared):
    ids = long_prepared.answer.token_ids
    repeats = [i for i, tid in enumerate(ids) if ids.count(tid) > 1]
    assert len(repeats) >= 2
    raw = get_explainer("attention.raw")().explain(llava, long_prepared)
    rollout = get_explainer("attention.rollout")().explain(llava, long_prepared)
    full = full_attentions(long_prepared)
    grid = long_prepared.layouts[0].main_grid
    assert raw.maps["image"].shape[0] == rollout.maps["image"].shape[0] == len(ids)
    for t in repeats:
        row = full[:, :, int(long_prepared.logit_positions[t])]  # this position's own row
        expected = row[..., grid.positions].reshape(*row.shape[:2], grid.rows, grid.cols)
        np.testing.assert_allclose(raw.maps["image"][t], expected.numpy(), atol=EXACT)
    first, second = repeats[:2]
    assert not np.allclose(raw.maps["image"][first], raw.maps["image"][second])
    assert not np.allclose(rollout.maps["prompt"][first], rollout.maps["prompt"][second])


def test_raw_layers_param(llava, long_prepared):
    exp = get_explainer("attention.raw")().explain(llava, long_prepared, layers=[-1])
    last = len(llava.adapter.decoder_layers()) - 1
    assert exp.params["layers"] == [last] and exp.maps["image"].shape[1] == 1
    with pytest.raises(ValueError, match="layers"):
        get_explainer("attention.raw")().explain(llava, long_prepared, layers=[99])
    with pytest.raises(ValueError, match="unknown parameter"):
        get_explainer("attention.raw")().explain(llava, long_prepared, head=1)


# --- attention.summary ----------------------------------------------------------------------------


def test_summary_means_equal_a_direct_computation(llava, long_prepared):
    exp = get_explainer("attention.summary")().explain(llava, long_prepared)
    full = full_attentions(long_prepared)  # (L, H, S, S)
    sets = {"image": long_prepared.image_positions, "text": long_prepared.text_positions,
            "answer": long_prepared.logit_positions}
    for name in ("answer_to_image", "answer_to_text", "text_to_image", "image_to_image", "text_to_text", "image_to_text"):
        query, key = name.split("_to_")
        expected = full[:, :, sets[query]][:, :, :, sets[key]].mean(dim=(-2, -1))
        assert exp.axes[name] == ("layer", "head")
        assert exp.maps[name].shape == (len(llava.adapter.decoder_layers()), full.shape[1])  # every layer
        np.testing.assert_allclose(exp.maps[name], expected.numpy(), atol=EXACT)
        mean = exp.maps[name].astype(np.float64)  # z of the map itself: near-equal heads amplify rounding
        np.testing.assert_allclose(exp.maps[f"{name}.z"], (mean - mean.mean()) / mean.std(), atol=1e-4)
    mass = full[:, :, sets["answer"]][..., sets["image"]].sum(-1).mean()
    assert exp.scores["answer_mass_image"] == pytest.approx(float(mass), abs=EXACT)


def test_summary_from_generate_equals_summary_from_forward():
    loaded = tiny_loaded(GEN_FAMILY)
    summary = get_explainer("attention.summary")()
    fresh = summary.explain(loaded, tiny_sample(GEN_FAMILY))  # the model's own generate, default length
    prepared = prepare(loaded, tiny_sample(GEN_FAMILY), answer=answer_of(fresh.target))
    forward = summary.explain(loaded, prepared)
    assert fresh.meta["source"] == "generate" and forward.meta["source"] == "forward"
    assert fresh.target == forward.target
    assert set(fresh.maps) == set(forward.maps)
    for name, values in forward.maps.items():
        if not name.endswith(".z"):  # z-scores of near-equal random heads magnify rounding; means suffice
            np.testing.assert_allclose(fresh.maps[name], values, atol=CACHED)


# --- attention.rollout ----------------------------------------------------------------------------


def reference_rollout(layers: list[np.ndarray], fusion: str, discard: float) -> np.ndarray:
    """Abnar & Zuidema written out slowly: one (heads, n, n) array per layer, first layer first."""
    n = layers[0].shape[-1]
    result = np.eye(n)
    for heads in layers:
        fused = {"mean": heads.mean(0), "max": heads.max(0), "min": heads.min(0)}[fusion].astype(np.float64)
        for i in range(n):
            nonzero = [j for j in sorted(range(n), key=lambda j: fused[i, j]) if fused[i, j] > 0]
            for j in nonzero[: int(np.floor(len(nonzero) * discard))]:
                fused[i, j] = 0.0
        mixed = 0.5 * fused + 0.5 * np.eye(n)
        for i in range(n):
            mixed[i] /= mixed[i].sum()
        result = mixed @ result
    return result


@pytest.mark.parametrize(("fusion", "discard"), [("mean", 0.0), ("max", 0.3), ("min", 0.5)])
def test_rollout_equals_a_slow_reference(llava, long_prepared, fusion, discard):
    exp = get_explainer("attention.rollout")().explain(llava, long_prepared, head_fusion=fusion, discard_ratio=discard)
    full = full_attentions(long_prepared).double().numpy()
    reference = reference_rollout(list(full), fusion, discard)[long_prepared.logit_positions.numpy()]
    grid = long_prepared.layouts[0].main_grid
    expected = reference[:, grid.positions.numpy()].reshape(-1, grid.rows, grid.cols)
    np.testing.assert_allclose(exp.maps["image"], expected, atol=1e-5)
    np.testing.assert_allclose(exp.maps["image.answer"], expected.mean(0), atol=1e-5)
    np.testing.assert_allclose(exp.maps["prompt"], reference[:, long_prepared.text_positions.numpy()], atol=1e-5)
    assert exp.params == {"head_fusion": fusion, "discard_ratio": discard, "through_vision": False}


def test_rollout_through_the_clip_tower_equals_a_reference(llava, long_prepared):
    exp = get_explainer("attention.rollout")().explain(llava, long_prepared, through_vision=True)
    decoder = reference_rollout(list(full_attentions(long_prepared).double().numpy()), "mean", 0.0)
    model = llava.model
    depth = model.config.vision_feature_layer % (model.config.vision_config.num_hidden_layers + 1)
    with eager_attention(model), torch.no_grad():
        out = model.model.vision_tower(long_prepared.inputs["pixel_values"], output_attentions=True)
    vision = reference_rollout([a[0].double().numpy() for a in out.attentions[:depth]], "mean", 0.0)
    grid = long_prepared.layouts[0].main_grid
    cells = decoder[long_prepared.logit_positions.numpy()][:, grid.positions.numpy()]
    expected = (cells @ vision[1:, 1:]).reshape(-1, grid.rows, grid.cols)  # CLS row and column dropped
    assert exp.axes["image.vision"] == ("answer_token", "row", "col")
    np.testing.assert_allclose(exp.maps["image.vision"], expected, atol=1e-5)


def test_vision_rollout_is_the_same_during_generate_and_forward(llava, long_prepared):
    options = RolloutOptions("max", 0.2)
    _, during = capture_generate(llava, tiny_sample("llava"), max_new_tokens=1, vision=options)
    forward = capture_forward(long_prepared, vision=options)
    assert during.vision_rollout is not None and during.vision_rollout.shape[0] == 1
    torch.testing.assert_close(during.vision_rollout, forward.vision_rollout, atol=CACHED, rtol=0)
    torch.testing.assert_close(forward.vision_rollout.sum(-1), torch.ones(forward.vision_rollout.shape[:-1]))


def test_rollout_saves_and_loads_back(llava, long_prepared, tmp_path):
    from xmllm.explainers.explanation import Explanation

    exp = get_explainer("attention.rollout")().explain(llava, long_prepared, through_vision=True)
    exp.save(tmp_path / "rollout")
    back = Explanation.load(tmp_path / "rollout")
    assert back.params == exp.params and back.axes == exp.axes and back.target == exp.target
    for name, values in exp.maps.items():
        np.testing.assert_array_equal(back.maps[name], values)


def test_rollout_rejects_bad_params(llava, long_prepared):
    rollout = get_explainer("attention.rollout")()
    for bad, match in (({"head_fusion": "median"}, "head_fusion"), ({"discard_ratio": 1.0}, "discard_ratio"),
                       ({"discard_ratio": -0.1}, "discard_ratio"), ({"through_vision": "yes"}, "through_vision")):
        with pytest.raises(ValueError, match=match):
            rollout.explain(llava, long_prepared, **bad)


@pytest.mark.parametrize("family", ["gemma3", "qwen2_vl"])
def test_rollout_through_a_tower_that_is_not_one_to_one_is_refused(family):
    """Gemma 3 pools 8x8 SigLIP patches to 4x4 tokens; Qwen2-VL's vision blocks return no weights."""
    loaded = tiny_loaded(family)
    prepared = prepare(loaded, tiny_sample(family), answer=_first_tokens(loaded, 2))
    with pytest.raises(ValueError, match="through_vision"):
        get_explainer("attention.rollout")().explain(loaded, prepared, through_vision=True)


# --- every family, and the demo model ---------------------------------------------------------------


def answer_of(target) -> Answer:
    return Answer(target.text, tuple(target.token_ids), tuple(target.tokens), tuple(target.probs))


def _first_tokens(loaded: LoadedModel, count: int) -> Answer:
    ids = tuple(loaded.adapter.tokenize_answer("the answer is red")[:count])
    tok = loaded.processor.tokenizer
    return Answer(tok.decode(ids), ids, tuple(tok.convert_ids_to_tokens(list(ids))), (1.0,) * count)


def _check_shapes(exp, prepared: Prepared) -> None:
    T, prompt = len(prepared.answer.token_ids), len(prepared.text_positions)
    grids = {g.name: g for layout in prepared.layouts for g in layout.grids}
    main = prepared.layouts[0].main_grid
    for name, arr in exp.maps.items():
        assert np.isfinite(arr).all(), name
        axes = exp.axes[name]
        if axes[0] == "answer_token":
            assert arr.shape[0] == T, name
        if axes[-1] == "prompt_token":
            assert arr.shape[-1] == prompt, name
        if axes[-2:] == ("row", "col"):
            grid = main if name.split(".")[0] == "image" else grids[name.split(".")[1]]
            assert arr.shape[-2:] == (grid.rows, grid.cols), name


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family(family):
    loaded = tiny_loaded(family)
    before = attn_implementations(loaded.model.config)
    prepared = prepare(loaded, tiny_sample(family), answer=_first_tokens(loaded, 2))
    for eid in IDS:
        cls = get_explainer(eid)
        assert cls.needs == frozenset({Need.ATTENTION}) and cls.citations
        exp = cls().explain(loaded, prepared)
        _check_shapes(exp, prepared)
        assert exp.target.positions == prepared.answer_positions.tolist()
        assert bool(exp.image_maps()) == (eid != "attention.summary")
    fresh, record = capture_generate(loaded, tiny_sample(family), max_new_tokens=2)
    forward = capture_forward(fresh)
    torch.testing.assert_close(record.rows, forward.rows, atol=CACHED, rtol=0)
    assert attn_implementations(loaded.model.config) == before


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    for folder in DEMO_CANDIDATES:
        if (folder / "config.json").is_file():
            return load_model(folder, device="cpu", eager_attention=True)
    pytest.skip("no demo checkpoint available")


@pytest.mark.slow
def test_demo_maps_have_the_layout_grid(demo):
    from xmllm.explainers.demo.samples import generate_sample

    sample = generate_sample(0, 0)
    explain_sample = ExplainSample([sample.image()], sample.text, id=sample.id, expected=sample.answer)
    raw = get_explainer("attention.raw")().explain(demo, explain_sample)  # captured during generate
    prepared = prepare(demo, explain_sample, answer=answer_of(raw.target))
    assert raw.meta["source"] == "generate" and prepared.target() == raw.target
    grid = prepared.layouts[0].main_grid
    L, H = len(demo.adapter.decoder_layers()), demo.model.config.text_config.num_attention_heads
    assert raw.maps["image"].shape == (len(raw.target.token_ids), L, H, grid.rows, grid.cols)
    summary = get_explainer("attention.summary")().explain(demo, prepared)
    assert summary.maps["answer_to_image"].shape == (L, H)
    rollout = get_explainer("attention.rollout")().explain(demo, prepared, through_vision=True)
    for name in ("image", "image.vision"):
        assert rollout.maps[name].shape[-2:] == (grid.rows, grid.cols)
        assert np.isfinite(rollout.maps[name]).all()
