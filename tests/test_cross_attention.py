"""Llama 3.2 Vision (Mllama): the image reaches the decoder through cross-attention (#24 item 3).

The attention and relevancy views read the cross-attention and are checked against references that
share nothing with them but the model: the attention weights transformers itself returns
(``output_attentions``), and Chefer et al.'s co-attention rules written out as whole matrices, layer by
layer from the first (the explainer carries one row per answer token from the last block to the first).
"""
from __future__ import annotations

import json

import pytest
import torch
from loaded_models import TINY_QUESTION, tiny_loaded, tiny_prepared
from tiny_models import build_tiny, tiny_image

import xmllm
from xmllm import MissingInput
from xmllm.cli import main
from xmllm.explainers.capture import eager_attention
from xmllm.explainers.models.cell_check import check_cell_positions
from xmllm.explainers.models.coverage import family_status
from xmllm.explainers.params import ParamError
from xmllm.explainers.registry import get_explainer, sample_level_ids
from xmllm.report.slabs import build_slab

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def prepared():
    return tiny_prepared("mllama", TINY_QUESTION, tokens=3)


@pytest.mark.parametrize("size", [(64, 40), (40, 64), (30, 30), (100, 20)])
def test_the_canvas_is_placed_over_the_image_as_the_processor_resizes_it(size):
    """The grid covers the canvas: the image as the processor's own functions resize it, then padding
    to the bottom and right."""
    from transformers.models.mllama.image_processing_pil_mllama import (
        get_image_size_fit_to_canvas,
        get_optimal_tiled_canvas,
    )

    loaded = tiny_loaded("mllama")
    inputs, _ = loaded.adapter.build_inputs([tiny_image(*size)], TINY_QUESTION)
    (layout,) = loaded.adapter.image_layouts(inputs)
    tile = int(loaded.processor.image_processor.size["height"])
    width, height = size
    canvas_h, canvas_w = get_optimal_tiled_canvas(height, width, loaded.processor.image_processor.max_image_tiles, tile)
    resized_h, resized_w = get_image_size_fit_to_canvas(height, width, canvas_h, canvas_w, tile)
    grid = layout.main_grid
    assert grid.region == pytest.approx((0.0, 0.0, canvas_h / resized_h, canvas_w / resized_w))
    patch = loaded.model.config.vision_config.patch_size
    assert (grid.rows * patch, grid.cols * patch) == (canvas_h, canvas_w)
    assert check_cell_positions(loaded.adapter, inputs) == []  # empty tiles and any arrangement


def _grid(prepared, rows: torch.Tensor) -> torch.Tensor:
    """Rows over the vision tokens ``(..., V)`` laid out on the image's grid."""
    grid = prepared.layouts[0].main_grid
    return rows.index_select(-1, grid.positions - prepared.seq_len).reshape(*rows.shape[:-1], grid.rows, grid.cols)


def _own_attentions(prepared, grad: bool = False):
    """The model's own per-layer attention weights (self or cross), from one eager forward."""
    with eager_attention(prepared.model), torch.set_grad_enabled(grad):
        out = prepared.model(**prepared.inputs, output_attentions=True, use_cache=False)
    return out, out.attentions


def test_raw_attention_is_the_models_own_cross_attention(prepared):
    exp = get_explainer("attention.raw")().explain(prepared.loaded, prepared)
    _, attentions = _own_attentions(prepared)
    cross = prepared.adapter.config.text_config.cross_attention_layers
    assert exp.meta["image_layers"] == list(cross)
    rows = prepared.logit_positions
    own = torch.stack([attentions[i][0][:, rows].transpose(0, 1) for i in cross], dim=1)  # (T, layers, heads, V)
    assert torch.allclose(torch.as_tensor(exp.maps["image"]), _grid(prepared, own).float(), atol=1e-6)
    # the prompt's rows come from the self-attention blocks, over the prompt's words
    own_self = [i for i in range(len(attentions)) if i not in cross]
    assert exp.meta["prompt_layers"] == own_self
    text = torch.stack([attentions[i][0][:, rows].transpose(0, 1) for i in own_self], dim=1)
    assert torch.allclose(torch.as_tensor(exp.maps["prompt"]), text[..., prepared.text_positions].float(), atol=1e-6)
    # the report's layer slider names each map's own blocks
    assert [a.labels for a in build_slab(exp, "image", 2).lead if a.name == "layer"] == [[str(i) for i in cross]]
    assert [a.labels for a in build_slab(exp, "prompt", 1).lead if a.name == "layer"] == [[str(i) for i in own_self]]
    # every answer row spends its cross-attention on the image's tiles: the grid's cells and the
    # tiles' class tokens take it all (the empty tiles none)
    image = torch.as_tensor(exp.maps["image"]).sum(dim=(-1, -2))
    assert bool((image > 0.5).all()) and bool((image <= 1 + 1e-5).all())


def _reference_relevancy(prepared, target_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chefer et al.'s co-attention rules as whole matrices, first layer first: ``(R_tt - I, R_ti)``
    rows of the answer token ``target_index`` (None: the whole answer)."""
    out, attentions = _own_attentions(prepared, grad=True)
    positions = prepared.logit_positions
    logits = out.logits[0, positions].float()
    ids = torch.as_tensor(prepared.answer.token_ids)
    values = logits[torch.arange(len(ids)), ids]
    target = values.sum() if target_index is None else values[target_index]
    grads = torch.autograd.grad(target, attentions, allow_unused=True)
    seq = prepared.seq_len
    vision = attentions[prepared.adapter.config.text_config.cross_attention_layers[0]].shape[-1]
    r_tt, r_ti = torch.eye(seq), torch.zeros(seq, vision)
    for weights, grad in zip(attentions, grads):
        if grad is None:
            continue
        a = (grad[0] * weights[0]).clamp_min(0).mean(dim=0).detach()
        if a.shape[-1] == seq:  # self-attention: rules 6-7
            r_tt, r_ti = r_tt + a @ r_tt, r_ti + a @ r_ti
        else:  # cross-attention: rules 10-11 with R_ii = I, R_it = 0
            r_ti = r_ti + a
    rows = positions if target_index is None else positions[target_index : target_index + 1]
    return (r_tt - torch.eye(seq))[rows].sum(0), r_ti[rows].sum(0)


def test_relevancy_follows_the_co_attention_rules(prepared):
    exp = get_explainer("relevancy.chefer")().explain(prepared.loaded, prepared)
    image, prompt = torch.as_tensor(exp.maps["image"]), torch.as_tensor(exp.maps["prompt"])
    for k in range(len(prepared.answer.token_ids)):
        text_row, image_row = _reference_relevancy(prepared, k)
        assert torch.allclose(image[k], _grid(prepared, image_row), rtol=1e-4, atol=1e-7), k
        assert torch.allclose(prompt[k], text_row[prepared.text_positions], rtol=1e-4, atol=1e-7), k
    text_row, image_row = _reference_relevancy(prepared, None)
    assert torch.allclose(torch.as_tensor(exp.maps["image.answer"]), _grid(prepared, image_row), rtol=1e-4, atol=1e-7)
    assert float(image_row.abs().sum()) > 0  # the gates are open: the image is relevant


def test_modality_shares_count_the_cross_attended_tokens(prepared):
    exp = get_explainer("relevancy.modality")().explain(prepared.loaded, prepared)
    text_row, image_row = _reference_relevancy(prepared, None)
    image, text = float(image_row.sum()), float(text_row[prepared.text_positions].sum())
    assert exp.scores["image_share"] == pytest.approx(image / (image + text), rel=1e-4)


@pytest.mark.parametrize("head_fusion", ["mean", "max"])
def test_rollout_is_the_product_of_every_blocks_factor(prepared, head_fusion):
    """The rollout equals ``F_L ... F_1`` built as whole (text + vision) x (text + vision) matrices from
    the model's own attentions, first block first: self-attention ``0.5 I + 0.5 A`` on the text;
    cross-attention ``[0.5 I | 0.5 A]`` for every text row (those before the image attend too, alike
    to every vision token, and their states change with the pixels); rows normalised."""
    exp = get_explainer("attention.rollout")().explain(prepared.loaded, prepared, head_fusion=head_fusion)
    _, attentions = _own_attentions(prepared)
    seq = prepared.seq_len
    total = prepared.position_count
    product = torch.eye(total, dtype=torch.float64)
    for weights in attentions:
        heads = weights[0].double()
        fused = heads.mean(0) if head_fusion == "mean" else heads.amax(0)
        factor = torch.eye(total, dtype=torch.float64)
        if fused.shape[-1] == seq:
            factor[:seq, :seq] = 0.5 * fused + 0.5 * torch.eye(seq, dtype=torch.float64)
        else:
            factor[:seq, seq:] = 0.5 * fused
            factor[:seq, :seq] = 0.5 * torch.eye(seq, dtype=torch.float64)
        factor = factor / factor.sum(-1, keepdim=True)
        product = factor @ product
    rows = product[prepared.logit_positions]
    assert torch.allclose(torch.as_tensor(exp.maps["image"]).double(), _grid(prepared, rows[:, seq:]), atol=1e-6)
    assert torch.allclose(torch.as_tensor(exp.maps["prompt"]).double(), rows[:, prepared.text_positions], atol=1e-6)
    assert float(rows[:, seq:].sum()) > 0.05  # the answer draws on the image


def test_attention_summary_reads_each_block_kind(prepared):
    exp = get_explainer("attention.summary")().explain(prepared.loaded, prepared)
    _, attentions = _own_attentions(prepared)
    cross = list(prepared.adapter.config.text_config.cross_attention_layers)
    own = [i for i in range(len(attentions)) if i not in cross]
    rows, text = prepared.logit_positions, prepared.text_positions
    image = prepared.image_positions - prepared.seq_len
    expected = {
        "answer_to_image": torch.stack([attentions[i][0][:, rows][:, :, image].mean((1, 2)) for i in cross]),
        "answer_to_text": torch.stack([attentions[i][0][:, rows][:, :, text].mean((1, 2)) for i in own]),
        "text_to_image": torch.stack([attentions[i][0][:, text][:, :, image].mean((1, 2)) for i in cross]),
        "text_to_text": torch.stack([attentions[i][0][:, text][:, :, text].mean((1, 2)) for i in own]),
    }
    assert {name for name in exp.maps if not name.endswith(".z")} == set(expected)
    for name, values in expected.items():
        assert torch.allclose(torch.as_tensor(exp.maps[name]), values.float(), atol=1e-6), name
    assert exp.meta["axis_labels"]["answer_to_image:layer"] == [str(i) for i in cross]


def _gates_closed_prob(prepared) -> float:
    """The whole answer's probability with every cross-attention gate closed (no block adds its
    cross-attention output): the model with no image flow, from a change of its own parameters."""
    import copy

    closed = copy.deepcopy(prepared.model)
    for layer in closed.model.language_model.layers:
        if hasattr(layer, "cross_attn_attn_gate"):
            layer.cross_attn_attn_gate.data.zero_()
    with torch.no_grad():
        logits = closed(**prepared.inputs, use_cache=False).logits[0, prepared.logit_positions]
    ids = torch.as_tensor(prepared.answer.token_ids)
    return float(torch.log_softmax(logits.double(), -1)[torch.arange(len(ids)), ids].sum().exp())


def test_dropping_every_vision_token_closes_the_cross_attention(prepared):
    exp = get_explainer("tokens.visual_importance")().explain(prepared.loaded, prepared, steps=4)
    assert exp.params["rank_layer"] in prepared.adapter.config.text_config.cross_attention_layers
    assert exp.scores["prob_none"] == pytest.approx(_gates_closed_prob(prepared), rel=1e-4)
    assert exp.scores["prob_full"] == pytest.approx(float(torch.tensor(prepared.answer.probs).double().prod()), rel=1e-4)
    assert exp.scores["image_tokens"] == prepared.image_positions.numel()
    with pytest.raises(ParamError) as error:
        get_explainer("tokens.visual_importance")().explain(prepared.loaded, prepared, rank_layer=0)
    assert "cross-attention blocks" in str(error.value)


def test_knockout_cuts_the_cross_attention_flow(prepared):
    """Cutting image -> all over every block leaves the answer as the model gives it with every
    cross-attention gate closed (tanh(0) = 0: no block adds its cross-attention output); image ->
    answer over the cross-attention blocks alone changes the answer's probability."""
    knockout = get_explainer("intervention.attention_knockout")()
    layers = len(prepared.adapter.decoder_layers())
    exp = knockout.explain(prepared.loaded, prepared, edges=["image->all", "image->answer"],
                           windows=[list(range(layers))], fast_attention=False)
    assert float(exp.maps["prob"][0, 0]) == pytest.approx(_gates_closed_prob(prepared), rel=1e-4)
    assert abs(float(exp.maps["prob_change"][1, 0])) > 0  # the answer's own image flow matters
    assert float(exp.maps["cut_pairs"][0, 0]) > float(exp.maps["cut_pairs"][1, 0]) > 0
    # the default edges, question->image among them: vision tokens are never queried, nothing to cut
    default = knockout.explain(prepared.loaded, prepared, fast_attention=False)
    assert "question->image" in default.meta["empty_edges"]


def test_what_does_not_apply_is_refused_with_the_reason(prepared):
    with pytest.raises(ParamError) as error:
        get_explainer("relevancy.chefer")().explain(prepared.loaded, prepared, through="vision")
    assert "\n" not in str(error.value) and "through='decoder' only" in str(error.value)
    with pytest.raises(MissingInput) as refusal:
        get_explainer("neurons.top_activations")().explain(prepared.loaded, prepared)
    assert str(refusal.value).startswith("neurons.top_activations: mllama: the image enters the decoder through "
                                         "cross-attention")
    with pytest.raises(ParamError) as vision:
        get_explainer("attention.rollout")().explain(prepared.loaded, prepared, through_vision=True)
    assert "cross-attention" in str(vision.value) and "\n" not in str(vision.value)
    with pytest.raises(ParamError) as layers:
        get_explainer("attention.raw")().explain(prepared.loaded, prepared, layers=[0])
    assert "none is a cross-attention block" in str(layers.value)


def test_models_listing_says_what_runs_as_a_loaded_model_does():
    status = family_status("mllama")
    loaded = tiny_loaded("mllama")
    assert status.adapter == "own" and status.tested
    for explainer_id in sample_level_ids():
        declared = status.refusals.get(explainer_id)
        live = get_explainer(explainer_id)().unmet_by_model(loaded)
        assert (declared is None) == (live is None), explainer_id
    assert {"attention.raw", "attention.rollout", "attention.summary", "relevancy.chefer", "relevancy.modality",
            "gradient.gradcam", "lens.logit", "intervention.attention_knockout", "tokens.visual_importance"}.isdisjoint(
        status.refusals)
    assert {"neurons.top_activations", "intervention.activation_patching"} <= set(status.refusals)


def test_logit_lens_reads_the_answer_rows_only(prepared):
    """No residual-stream row holds a patch; at the last layer the lens is the model's own output."""
    exp = get_explainer("lens.logit")().explain(prepared.loaded, prepared)
    assert not [name for name in exp.maps if name.startswith("image")] and "cross-attention" in exp.meta["image_rows"]
    with torch.no_grad():
        logits = prepared.model(**prepared.inputs, use_cache=False).logits[0, prepared.logit_positions]
    own = torch.softmax(logits.double(), -1)[torch.arange(len(prepared.answer.token_ids)), prepared.answer.token_ids]
    assert torch.allclose(torch.as_tensor(exp.maps["answer.prob"])[:, -1].double(), own, atol=1e-5)


@pytest.mark.parametrize("family", ["mllama", "chameleon"])
def test_family_loads_from_its_folder_and_explains(family, tmp_path):
    """Saved with save_pretrained and loaded through the user's path: the command line writes a report
    with the explainers that run, and lists the refused ones with their reasons."""
    folder = tmp_path / family
    model, processor = build_tiny(family)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    loaded = xmllm.load_model(str(folder), device="cpu")
    assert loaded.adapter.kind == "own" and loaded.adapter.model_type == family
    image = tmp_path / "image.png"
    tiny_image(64, 40).save(image)
    out = tmp_path / "run"
    explainers = "attention.raw,attention.summary,attention.rollout,relevancy.chefer,gradient.saliency,lens.logit"
    assert main(["explain", "--model", str(folder), "--image", str(image), "--question", TINY_QUESTION,
                 "--explainers", explainers, "--device", "cpu", "--answer", "red", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "report.html").is_file()
    ran = {"mllama": {"attention.raw", "attention.summary", "attention.rollout", "relevancy.chefer",
                      "gradient.saliency", "lens.logit"},
           "chameleon": {"attention.raw", "attention.summary", "attention.rollout", "relevancy.chefer", "lens.logit"}}[family]
    assert {e["explainer"] for e in manifest["explanations"]} == ran
    assert set(manifest.get("skipped", {})) == set(explainers.split(",")) - ran
    text = json.dumps(manifest.get("skipped", {}))
    if family == "chameleon":
        assert "no gradient reaches the pixels" in text  # saliency's declared refusal


@pytest.mark.parametrize("explainer", ["gradient.saliency", "gradient.gradcam"])
def test_recomputed_blocks_give_the_kept_runs_maps(prepared, explainer):
    """Cross-attention blocks recompute in the backward like any block (their vision states as keyword inputs)."""
    kept = get_explainer(explainer)().explain(prepared.loaded, prepared, recompute=False)
    again = get_explainer(explainer)().explain(prepared.loaded, prepared, recompute=True)
    assert again.params["recompute"] is True
    assert torch.equal(torch.as_tensor(kept.maps["image.answer"]), torch.as_tensor(again.maps["image.answer"]))
    assert float(torch.as_tensor(kept.maps["image.answer"]).abs().sum()) > 0
    with pytest.raises(ParamError) as error:
        get_explainer("relevancy.chefer")().explain(prepared.loaded, prepared, recompute=True)
    assert "recomputes nothing" in str(error.value)
