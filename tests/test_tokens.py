"""tokens.visual_importance against plain forwards and a forward with the tokens really cut out.

The reference for dropping takes the decoder's input embeddings (image features written in) from
a plain forward, deletes the dropped rows, and runs the language model on what is left with the
kept tokens' original positions, then the LM head: the sequence without those tokens. The ranking
reference is the ``output_attentions`` of a plain eager forward.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch


from tiny_models import FAMILIES
from loaded_models import random_demo_loaded
from loaded_models import tiny_prepared as shared_tiny_prepared

from xmllm.explainers.answering import generate_answer
from xmllm.explainers.capture import attn_implementations, eager_attention
from xmllm.explainers.prepared import Prepared, prepare
from xmllm.explainers.demo.samples import generate_sample, to_explain_sample
from xmllm.explainers.explanation import Explanation
from xmllm.explainers.models import LoadedModel
from xmllm.explainers.registry import Need, get_explainer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

QUESTION = "what colour is the square"
ATOL = 2e-5
"""Eager, batched forwards against sdpa forwards of a shorter sequence: float32 rounding only."""
EID = "tokens.visual_importance"

def tiny_prepared(family: str, tokens: int = 3) -> Prepared:
    return shared_tiny_prepared(family, QUESTION, tokens)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> LoadedModel:
    """The demo architecture (random weights, real LLaVA code) saved and loaded like a user's folder."""
    return random_demo_loaded(tmp_path_factory.mktemp("demo-arch"))


@pytest.fixture(scope="module")
def demo_prep(demo) -> Prepared:
    sample = to_explain_sample(generate_sample(0, 1))
    answer = generate_answer(demo, sample.images, sample.question, max_new_tokens=3)
    assert len(answer.token_ids) >= 2
    return prepare(demo, sample, answer=answer)


@pytest.fixture(scope="module")
def demo_exp(demo, demo_prep):
    return get_explainer(EID)().explain(demo, demo_prep, steps=4)


def plain_answer_logprobs(prep: Prepared) -> np.ndarray:
    with torch.no_grad():
        return prep.answer_logprobs(prep.forward(use_cache=False).logits)[0].double().numpy()


def cut_out_logprobs(prep: Prepared, drop: list[int]) -> np.ndarray:
    """The answer's log-probabilities on the sequence with positions ``drop`` removed (LLaVA)."""
    model = prep.model
    text = model.model.language_model
    seen: dict = {}
    handle = text.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            prep.forward(use_cache=False)
    finally:
        handle.remove()
    keep = torch.as_tensor([p for p in range(prep.seq_len) if p not in set(drop)])
    with torch.no_grad():
        # an explicit all-ones mask: without one, transformers reads position gaps as packed sequences
        hidden = text(inputs_embeds=seen["inputs_embeds"][:, keep], position_ids=keep[None],
                      attention_mask=torch.ones(1, keep.numel(), dtype=torch.long), use_cache=False)
        logits = model.lm_head(hidden.last_hidden_state)[0]
    where = {int(p): i for i, p in enumerate(keep)}
    rows = torch.as_tensor([where[int(p)] for p in prep.logit_positions])
    logp = torch.log_softmax(logits[rows].double(), dim=-1)
    return logp[range(len(prep.answer.token_ids)), list(prep.answer.token_ids)].numpy()


def drop_set(exp: Explanation, prep: Prepared, order: str, fraction_index: int) -> list[int]:
    """The positions the explainer dropped for ``order`` at that fraction, from its own rank map."""
    count = exp.meta["dropped_counts"][fraction_index]
    rank = exp.maps["image.drop_rank"].reshape(-1)
    grid = prep.layouts[0].main_grid
    ranked = grid.positions[np.argsort(rank, kind="stable")].tolist()
    return ranked[:count] if order == "least_attended_first" else ranked[::-1][:count]


# --- the demo architecture --------------------------------------------------------------------------


def test_dropping_nothing_is_the_full_forward(demo_exp, demo_prep):
    full = plain_answer_logprobs(demo_prep)
    assert demo_exp.axes["curve"] == ("order", "fraction")
    assert demo_exp.axes["curve.logprob"] == ("answer_token", "order", "fraction")
    assert demo_exp.maps["curve"].shape == (3, 5) and demo_exp.meta["fractions"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for o in range(3):
        np.testing.assert_allclose(demo_exp.maps["curve.logprob"][:, o, 0], full, atol=ATOL)
    assert demo_exp.scores["prob_full"] == pytest.approx(float(np.exp(full.sum())), rel=1e-4)
    assert demo_exp.meta["dropped_counts"] == [0, 16, 32, 48, 64]  # the demo's 8 x 8 grid


def test_dropping_equals_cutting_the_tokens_out(demo_exp, demo_prep):
    image = demo_prep.image_positions.tolist()
    for order, f in (("least_attended_first", 1), ("most_attended_first", 2), ("least_attended_first", 3)):
        drop = drop_set(demo_exp, demo_prep, order, f)
        o = demo_exp.meta["orders"].index(order)
        expected = cut_out_logprobs(demo_prep, drop)
        np.testing.assert_allclose(demo_exp.maps["curve.logprob"][:, o, f], expected, atol=ATOL)
    everything = cut_out_logprobs(demo_prep, image)
    for o in range(3):
        np.testing.assert_allclose(demo_exp.maps["curve.logprob"][:, o, -1], everything, atol=ATOL)
    assert not np.allclose(everything, plain_answer_logprobs(demo_prep), atol=1e-3)  # the image mattered


def test_ranking_is_the_attention_tokens_receive(demo_exp, demo_prep):
    with eager_attention(demo_prep.model), torch.no_grad():
        attentions = demo_prep.forward(use_cache=False, output_attentions=True).attentions
    layer = demo_exp.params["rank_layer"]
    assert layer == 1  # FastV: K = 2, ranked by the layer before
    received = attentions[layer][0].mean(0)[demo_prep.logit_positions].mean(0).double()
    grid = demo_prep.layouts[0].main_grid
    np.testing.assert_allclose(demo_exp.maps["image.attention"], received[grid.positions].reshape(8, 8).numpy(),
                               atol=1e-6)
    rank = demo_exp.maps["image.drop_rank"].reshape(-1)
    order = np.argsort(rank)
    assert np.all(np.diff(received[grid.positions].numpy()[order]) >= 0)  # least attended dropped first
    assert sorted(rank.tolist()) == list(range(64))


def test_auc_and_layers(demo, demo_prep, demo_exp, tmp_path):
    for i, order in enumerate(demo_exp.meta["orders"]):
        expected = np.trapezoid(demo_exp.maps["curve"][i], demo_exp.maps["fractions"])
        assert demo_exp.scores[f"auc_{order}"] == pytest.approx(expected, rel=1e-9)
    later = get_explainer(EID)().explain(demo, demo_prep, steps=4, from_layer=2)
    assert later.params["from_layer"] == 2
    np.testing.assert_allclose(later.maps["curve"][:, 0], demo_exp.maps["curve"][:, 0], rtol=1e-5)
    assert not np.allclose(later.maps["curve"][:, -1], demo_exp.maps["curve"][:, -1], rtol=1e-4)  # blocks 0-1 saw them
    assert not np.allclose(later.maps["curve"][:, -1], later.maps["curve"][:, 0], rtol=1e-4)  # and 2-3 did not
    demo_exp.save(tmp_path / "tokens")
    back = Explanation.load(tmp_path / "tokens")
    assert back.axes == demo_exp.axes and back.scores == demo_exp.scores
    for bad, match in (({"steps": 0}, "steps"), ({"from_layer": 9}, "from_layer"), ({"rank_layer": -9}, "rank_layer"),
                       ({"k": 2}, "unknown parameter")):
        with pytest.raises(ValueError, match=match):
            get_explainer(EID)().explain(demo, demo_prep, **bad)


def test_random_order_is_seeded(demo, demo_prep):
    a = get_explainer(EID)().explain(demo, demo_prep, steps=2, seed=5)
    b = get_explainer(EID)().explain(demo, demo_prep, steps=2, seed=5)
    np.testing.assert_array_equal(a.maps["curve"], b.maps["curve"])
    assert a.scores["auc_random"] == b.scores["auc_random"]


# --- every family -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family(family):
    prep = tiny_prepared(family)
    cls = get_explainer(EID)
    assert cls.needs == frozenset({Need.ATTENTION}) and cls.citations[0].arxiv == "2403.06764"
    before = attn_implementations(prep.model.config)
    exp = cls().explain(prep.loaded, prep, steps=2)
    assert attn_implementations(prep.model.config) == before  # the kernel is restored
    full = plain_answer_logprobs(prep)
    T = len(prep.answer.token_ids)
    assert exp.maps["curve.logprob"].shape == (T, 3, 3)
    for o in range(3):
        np.testing.assert_allclose(exp.maps["curve.logprob"][:, o, 0], full, atol=ATOL)
    np.testing.assert_allclose(exp.maps["curve.logprob"][:, 0, -1], exp.maps["curve.logprob"][:, 1, -1], atol=ATOL)
    assert not np.allclose(exp.maps["curve.logprob"][:, 0, -1], full, atol=1e-6)  # dropping changed the forward
    assert exp.meta["dropped_counts"][-1] == prep.image_positions.numel()
    grids = {g.name: g for layout in prep.layouts for g in layout.grids}
    for name, arr in exp.image_maps().items():
        grid = prep.layouts[0].main_grid if name.split(".")[0] == "image" else grids[name.split(".")[1]]
        assert arr.shape == (grid.rows, grid.cols) and np.isfinite(arr).all(), name
    if family == "llava":  # a Llama decoder fed inputs_embeds: the cut-out reference applies
        np.testing.assert_allclose(exp.maps["curve.logprob"][:, 0, -1],
                                   cut_out_logprobs(prep, prep.image_positions.tolist()), atol=ATOL)
