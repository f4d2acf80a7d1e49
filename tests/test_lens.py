"""lens.logit against the model's own outputs on real forwards.

References come from plain forwards: the logits the model returns, and for intermediate layers the
hidden states transformers returns (``output_hidden_states``) pushed through the model's norm and
LM head by hand, never through the explainer's hooks or ``adapter.unembed``.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch


from tiny_models import FAMILIES
from loaded_models import random_demo_loaded
from loaded_models import tiny_prepared as shared_tiny_prepared

from xmllm.explainers.answering import Answer, generate_answer
from xmllm.explainers.prepared import Prepared, prepare
from xmllm.explainers.demo.samples import generate_sample, to_explain_sample
from xmllm.explainers.explanation import Explanation
from xmllm.explainers.models import LoadedModel
from xmllm.explainers.registry import get_explainer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

QUESTION = "what colour is the square"
ATOL = 1e-5
"""Subset-of-rows matmuls against the full forward's: float32 summation order only."""

def tiny_prepared(family: str, tokens: int = 3) -> Prepared:
    return shared_tiny_prepared(family, QUESTION, tokens)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> LoadedModel:
    """The demo architecture (random weights, real LLaVA code) saved and loaded like a user's folder."""
    return random_demo_loaded(tmp_path_factory.mktemp("demo-arch"))


@pytest.fixture(scope="module")
def demo_prep(demo) -> Prepared:
    """The demo model's own greedy answer (several tokens) on a demo-world sample."""
    sample = to_explain_sample(generate_sample(0, 0))
    answer = generate_answer(demo, sample.images, sample.question, max_new_tokens=3)
    assert len(answer.token_ids) >= 2
    return prepare(demo, sample, answer=answer)


def real_logprobs(prep: Prepared, positions: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = prep.forward(use_cache=False).logits[0]
    return torch.log_softmax(logits[positions].double(), dim=-1)


def hand_lens(prep: Prepared, layer: int, positions: torch.Tensor) -> torch.Tensor:
    """Block ``layer``'s output from transformers' hidden states, through the norm and head by hand."""
    model = prep.model
    with torch.no_grad():
        hidden = prep.forward(use_cache=False, output_hidden_states=True).hidden_states[layer + 1][0, positions]
        text = model.get_decoder() if hasattr(model, "get_decoder") else model.model.language_model
        logits = model.lm_head(text.norm(hidden))
    return torch.log_softmax(logits.double(), dim=-1)


# --- the demo architecture --------------------------------------------------------------------------


def test_last_layer_is_the_models_output(demo, demo_prep):
    exp = get_explainer("lens.logit")().explain(demo, demo_prep)
    ids = list(demo_prep.answer.token_ids)
    T, L = len(ids), len(demo.adapter.decoder_layers())
    assert exp.axes["answer.prob"] == ("answer_token", "layer") and exp.maps["answer.prob"].shape == (T, L)
    real = real_logprobs(demo_prep, demo_prep.logit_positions)
    np.testing.assert_allclose(exp.maps["answer.prob"][:, -1], real[range(T), ids].exp().numpy(), atol=ATOL)
    np.testing.assert_allclose(exp.maps["answer.prob"][:, -1], demo_prep.answer.probs, atol=1e-4)  # generate's
    grid = demo_prep.layouts[0].main_grid
    at_image = real_logprobs(demo_prep, grid.positions)
    assert exp.axes["image.top_prob"] == ("layer", "row", "col")
    np.testing.assert_allclose(exp.maps["image.top_prob"][-1],
                               at_image.max(-1).values.exp().reshape(grid.rows, grid.cols).numpy(), atol=ATOL)
    assert exp.axes["image.answer_prob"] == ("answer_token", "layer", "row", "col")
    expected = at_image[:, ids].T.exp().reshape(T, grid.rows, grid.cols).numpy()
    np.testing.assert_allclose(exp.maps["image.answer_prob"][:, -1], expected, atol=ATOL)
    top = np.array(exp.meta["image_top_k"]["image"]["ids"])  # (L, rows, cols, k)
    assert top.shape == (L, grid.rows, grid.cols, exp.params["top_k"])
    np.testing.assert_array_equal(top[-1, ..., 0], at_image.argmax(-1).reshape(grid.rows, grid.cols).numpy())


def test_intermediate_layers_equal_hidden_states_through_norm_and_head(demo, demo_prep):
    exp = get_explainer("lens.logit")().explain(demo, demo_prep, top_k=3)
    ids = list(demo_prep.answer.token_ids)
    grid = demo_prep.layouts[0].main_grid
    for layer in range(len(demo.adapter.decoder_layers()) - 1):
        ref = hand_lens(demo_prep, layer, demo_prep.logit_positions)
        np.testing.assert_allclose(exp.maps["answer.prob"][:, layer], ref[range(len(ids)), ids].exp().numpy(), atol=ATOL)
        rank = (ref > ref[range(len(ids)), ids][:, None]).sum(-1).numpy()
        np.testing.assert_array_equal(exp.maps["answer.rank"][:, layer], rank)
        cells = hand_lens(demo_prep, layer, grid.positions)
        values, top = cells.topk(3, dim=-1)
        np.testing.assert_allclose(exp.maps["image.top_prob"][layer],
                                   values[:, 0].exp().reshape(grid.rows, grid.cols).numpy(), atol=ATOL)
        np.testing.assert_array_equal(np.array(exp.meta["image_top_k"]["image"]["ids"])[layer],
                                      top.reshape(grid.rows, grid.cols, 3).numpy())
    # layers really differ: the lens is not the last layer repeated
    assert not np.allclose(exp.maps["answer.prob"][:, 0], exp.maps["answer.prob"][:, -1])


def test_greedy_answer_ranks_first_at_the_last_layer(demo, demo_prep):
    exp = get_explainer("lens.logit")().explain(demo, demo_prep)
    assert (exp.maps["answer.rank"][:, -1] == 0).all()
    assert exp.maps["answer.rank"].dtype.kind == "i"
    top_tokens = exp.meta["answer_top_k"]["tokens"]
    assert [row[-1][0] for row in top_tokens] == list(demo_prep.answer.tokens)
    assert exp.scores["settled_share"] == 1.0
    # a forced non-greedy answer does not rank first
    runner_up = int(real_logprobs(demo_prep, demo_prep.logit_positions[:1])[0].topk(2).indices[1])
    tok = demo.processor.tokenizer
    forced = Answer(tok.decode([runner_up]), (runner_up,), tuple(tok.convert_ids_to_tokens([runner_up])), (0.0,))
    other = prepare(demo, demo_prep.sample, answer=forced)
    exp2 = get_explainer("lens.logit")().explain(demo, other)
    assert exp2.maps["answer.rank"][0, -1] == 1


def test_token_strings_match_ids_and_params(demo, demo_prep, tmp_path):
    lens = get_explainer("lens.logit")()
    exp = lens.explain(demo, demo_prep, layers=[0, -1], top_k=2)
    last = len(demo.adapter.decoder_layers()) - 1
    assert exp.params == {"layers": [0, last], "top_k": 2} and exp.maps["image.top_prob"].shape[0] == 2
    tok = demo.processor.tokenizer
    ids = np.array(exp.meta["image_top_k"]["image"]["ids"])
    strings = np.array(exp.meta["image_top_k"]["image"]["tokens"], dtype=object)
    assert ids.shape == strings.shape
    flat = ids.reshape(-1).tolist()
    assert strings.reshape(-1).tolist() == tok.convert_ids_to_tokens(flat)
    exp.save(tmp_path / "lens")
    back = Explanation.load(tmp_path / "lens")
    assert back.axes == exp.axes and back.meta == exp.meta and back.scores == exp.scores
    for name, values in exp.maps.items():
        np.testing.assert_array_equal(back.maps[name], values)
    for bad, match in (({"layers": [99]}, "layers"), ({"layers": 2}, "layers"), ({"top_k": 0}, "top_k"),
                       ({"head": 1}, "unknown parameter")):
        with pytest.raises(ValueError, match=match):
            lens.explain(demo, demo_prep, **bad)


# --- every family -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_last_layer_and_grids(family):
    prep = tiny_prepared(family)
    cls = get_explainer("lens.logit")
    assert cls.citations and any(c.arxiv == "2410.07149" for c in cls.citations)
    exp = cls().explain(prep.loaded, prep)
    ids = list(prep.answer.token_ids)
    real = real_logprobs(prep, prep.logit_positions)
    np.testing.assert_allclose(exp.maps["answer.prob"][:, -1], real[range(len(ids)), ids].exp().numpy(), atol=ATOL)
    grids = {g.name: g for layout in prep.layouts for g in layout.grids}
    main = prep.layouts[0].main_grid
    L = len(prep.adapter.decoder_layers())
    image_maps = exp.image_maps()
    assert "image.top_prob" in image_maps and "image.answer_prob" in image_maps
    for name, arr in image_maps.items():
        grid = main if name.split(".")[0] == "image" else grids[name.split(".")[1]]
        assert arr.shape[-2:] == (grid.rows, grid.cols) and arr.shape[-3] == L, name
        assert np.isfinite(arr).all() and ((arr >= 0) & (arr <= 1)).all(), name
    at_main = real_logprobs(prep, main.positions).max(-1).values.exp().reshape(main.rows, main.cols)
    np.testing.assert_allclose(exp.maps["image.top_prob"][-1], at_main.numpy(), atol=ATOL)


def test_a_capped_family_is_read_out_with_its_cap():
    """PaliGemma's forward caps logits when the text config says so; the lens must cap them too."""
    prep = tiny_prepared("paligemma", tokens=2)
    text = prep.model.config.get_text_config()
    before = real_logprobs(prep, prep.logit_positions)
    text.final_logit_softcapping = 0.05
    try:
        capped = real_logprobs(prep, prep.logit_positions)
        assert not torch.allclose(capped, before)  # the cap really changes the model's output
        exp = get_explainer("lens.logit")().explain(prep.loaded, prep)
        ids = list(prep.answer.token_ids)
        np.testing.assert_allclose(exp.maps["answer.prob"][:, -1], capped[range(len(ids)), ids].exp().numpy(),
                                   atol=ATOL)
    finally:
        del text.final_logit_softcapping
    assert prep.adapter.final_logit_softcap() is None
