"""Attention knockout and activation patching against forwards intervened by hand.

The knockout reference runs the demo architecture's decoder blocks one by one with a 4-D mask
written here for each block (and, for a window of every block, a 4-D mask handed to the model's
own forward); the patching reference restores activations with hooks written here. Models are the
demo architecture with random weights saved in a temporary folder (real forwards, loaded through
``load_model``) and the tiny models of every family.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch


from tiny_models import FAMILIES, TEST_IMAGE_SIZES, tiny_image
from loaded_models import random_demo_folder, tiny_prepared as shared_tiny_prepared

from xmllm.explainers.prepared import ExplainSample, Prepared, prepare
from xmllm.explainers.demo.samples import generate_samples, make_pair, to_explain_sample
from xmllm.explainers.methods.intervention import (
    ActivationPatching,
    AttentionKnockout,
    Corrupted,
    Patch,
    Patcher,
    restored_share,
    sliding_windows,
)
from xmllm.explainers.masking import question_positions
from xmllm.explainers.models import LoadedModel, load_model
from xmllm.explainers.registry import get_explainer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ATOL = 2e-5
"""Batched and single forwards, eager and sdpa: float32 summation order only."""
TINY_QUESTION = "what colour is the square"


# --- models ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> LoadedModel:
    folder = random_demo_folder(tmp_path_factory.mktemp("intervention"), 0)
    return load_model(folder, device="cpu", dtype="float32", eager_attention=True)


def demo_sample(index: int = 0, question_type: str = "colour") -> ExplainSample:
    return to_explain_sample(generate_samples(index + 1, 0, question_types=[question_type])[index])


@pytest.fixture(scope="module")
def demo_prep(demo) -> Prepared:
    prep = prepare(demo, demo_sample())
    assert len(prep.answer.token_ids) > 1  # a several-token answer: per-token maps are exercised
    return prep


def tiny_prepared(family: str, seed: int = 0) -> Prepared:
    return shared_tiny_prepared(family, TINY_QUESTION, tokens=2, seed=seed)


# --- hand-made references ---------------------------------------------------------------------------


@torch.no_grad()
def plain_logprobs(prep: Prepared, **inputs) -> torch.Tensor:
    logits = prep.model(**{**dict(prep.inputs), **inputs}).logits[0].float()
    logp = torch.log_softmax(logits[prep.logit_positions], dim=-1)
    return logp[torch.arange(len(prep.answer.token_ids)), torch.tensor(prep.answer.token_ids)]


def cut_by_hand(prep: Prepared, src: list[int], dst: list[int]) -> torch.Tensor:
    """(seq, seq): True where a dst query loses a src key (causal pairs only, never the diagonal)."""
    n = prep.seq_len
    cut = torch.zeros(n, n, dtype=torch.bool)
    for q in dst:
        for k in src:
            if k <= q and k != q:
                cut[q, k] = True
    return cut


def float_mask(prep: Prepared, cut: torch.Tensor) -> torch.Tensor:
    """The causal mask minus ``cut``, as the (1, 1, seq, seq) additive mask eager attention adds."""
    allowed = torch.ones(prep.seq_len, prep.seq_len, dtype=torch.bool).tril() & ~cut
    low = torch.finfo(torch.float32).min
    return torch.zeros(1, 1, *allowed.shape).masked_fill(~allowed, low)


@torch.no_grad()
def layer_by_layer(prep: Prepared, masks: list[torch.Tensor]) -> torch.Tensor:
    """Answer log-probs from running the demo's Llama blocks by hand, block i under ``masks[i]``."""
    model = prep.model
    seen = {}
    lm = model.model.language_model
    handle = lm.layers[0].register_forward_pre_hook(lambda _m, args: seen.setdefault("h", args[0].clone()))
    model(**dict(prep.inputs))
    handle.remove()
    hidden = seen["h"]
    position_ids = torch.arange(prep.seq_len)[None]
    rotary = lm.rotary_emb(hidden, position_ids)
    before = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for layer, mask in zip(lm.layers, masks):
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)
    finally:
        model.set_attn_implementation(before)
    logits = model.lm_head(lm.norm(hidden))[0].float()
    logp = torch.log_softmax(logits[prep.logit_positions], dim=-1)
    return logp[torch.arange(len(prep.answer.token_ids)), torch.tensor(prep.answer.token_ids)]


# --- attention knockout ------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_knockout_with_an_empty_window_changes_nothing(demo_prep, demo, fast):
    exp = AttentionKnockout().explain(demo, demo_prep, windows=[[]], fast_attention=fast)
    plain = plain_logprobs(demo_prep)
    assert exp.axes["prob_change"] == ("edge", "window") and exp.maps["prob_change"].shape == (4, 1)
    np.testing.assert_array_equal(exp.maps["cut_pairs"], 0)
    np.testing.assert_allclose(exp.maps["prob"], float(plain.sum().exp()), rtol=1e-5)
    np.testing.assert_allclose(exp.maps["prob_change"], 0.0, atol=1e-5)
    np.testing.assert_allclose(exp.maps["logprob_change"], 0.0, atol=ATOL)
    assert exp.meta["window_labels"] == exp.meta["axis_labels"]["window"] == ["none"]


def test_knockout_equals_blocks_run_by_hand_with_their_masks(demo_prep, demo):
    layers = len(demo.adapter.decoder_layers())
    image = demo_prep.image_positions.tolist()
    answer = demo_prep.logit_positions.tolist()
    cut = cut_by_hand(demo_prep, image, answer)
    plain = float_mask(demo_prep, torch.zeros_like(cut))
    torch.testing.assert_close(layer_by_layer(demo_prep, [plain] * layers), plain_logprobs(demo_prep),
                               atol=ATOL, rtol=0)
    window = [1, 2]
    exp = AttentionKnockout().explain(demo, demo_prep, edges=["image->answer"], windows=[window, list(range(layers))])
    masks = [float_mask(demo_prep, cut) if i in window else plain for i in range(layers)]
    by_hand = layer_by_layer(demo_prep, masks)
    original = plain_logprobs(demo_prep)
    np.testing.assert_allclose(exp.maps["logprob_change"][:, 0, 0], (by_hand - original).numpy(), atol=ATOL)
    np.testing.assert_allclose(exp.maps["prob"][0, 0], float(by_hand.double().sum().exp()), rtol=1e-4)
    # every block: the model's own forward takes the 4-D mask as it is
    everywhere = plain_logprobs(demo_prep, attention_mask=float_mask(demo_prep, cut))
    np.testing.assert_allclose(exp.maps["logprob_change"][:, 0, 1], (everywhere - original).numpy(), atol=ATOL)
    assert exp.maps["cut_pairs"][0, 0] == int(cut.sum()) * len(window)
    assert not np.allclose(exp.maps["logprob_change"][:, 0, 0], 0.0, atol=1e-4)  # the cut does something


def test_knockout_edges_follow_the_prompt_order_and_kernels_agree(demo_prep, demo):
    sdpa = AttentionKnockout().explain(demo, demo_prep, window=2)
    eager = AttentionKnockout().explain(demo, demo_prep, window=2, fast_attention=False)
    assert sdpa.meta["kernel"] == "sdpa" and eager.meta["kernel"] == "eager"
    np.testing.assert_allclose(sdpa.maps["logprob_change"], eager.maps["logprob_change"], atol=ATOL)
    np.testing.assert_array_equal(sdpa.maps["cut_pairs"], eager.maps["cut_pairs"])
    layers = len(demo.adapter.decoder_layers())
    assert sdpa.meta["windows"] == sliding_windows(layers, 2, 1) == [[0, 1], [1, 2], [2, 3]]
    image, answer = demo_prep.image_positions.tolist(), demo_prep.logit_positions.tolist()
    question = question_positions(demo_prep)
    assert max(question) < min(image)  # the demo asks before it shows
    edges = sdpa.meta["edge_labels"]
    expected = {
        "image->answer": int(cut_by_hand(demo_prep, image, answer).sum()),
        "question->answer": int(cut_by_hand(demo_prep, question, answer).sum()),
        "question->image": len(question) * len(image),
        "image->question": 0,
    }
    for k, edge in enumerate(edges):
        np.testing.assert_array_equal(sdpa.maps["cut_pairs"][k], expected[edge] * 2)
    assert sdpa.meta["empty_edges"] == ["image->question"]
    assert np.all(sdpa.maps["prob_change"][edges.index("image->question")] == 0.0)


def test_knockout_bad_parameters_are_one_line_errors(demo_prep, demo):
    for params, fragment in (({"edges": ["image->image"]}, "SOURCE->DESTINATION"), ({"edges": "image->answer"}, "list"),
                             ({"window": 9}, "only 4 blocks"), ({"windows": [[7]]}, "blocks 0..3"),
                             ({"window": 2, "windows": [[0]]}, "not both"), ({"heads": 1}, "unknown parameter")):
        with pytest.raises(ValueError, match=fragment) as info:
            AttentionKnockout().explain(demo, demo_prep, **params)
        assert "\n" not in str(info.value)


# --- activation patching -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_pair_run(demo, demo_prep):
    return ActivationPatching().explain(demo, demo_prep, groups=["image", "question", "answer", "all"])


def test_patching_everything_restores_all_and_the_question_nothing(demo_pair_run, demo_prep):
    exp = demo_pair_run
    assert exp.axes["restored"] == ("component", "layer", "group")
    comps, groups = exp.meta["component_labels"], exp.meta["group_labels"]
    assert exp.meta["corruption"]["kind"] == "pair" and exp.meta["corruption"]["edit"]
    assert exp.meta["layers"] == list(range(len(demo_prep.adapter.decoder_layers())))
    residual, last = exp.maps["restored"][comps.index("residual")], len(exp.meta["layers"]) - 1
    np.testing.assert_allclose(residual[:, groups.index("all")], 1.0, atol=1e-4)
    np.testing.assert_allclose(residual[last, groups.index("answer")], 1.0, atol=1e-4)
    np.testing.assert_allclose(exp.maps["restored"][:, :, groups.index("question")], 0.0, atol=1e-4)
    assert exp.scores["gap"] != 0.0
    np.testing.assert_allclose(exp.maps["prob"][comps.index("residual"), :, groups.index("all")],
                               exp.scores["prob_clean"], rtol=1e-4)


@torch.no_grad()
def test_patching_equals_restoring_by_hand(demo_pair_run, demo_prep, demo):
    """The MLP output of block 1 at the image tokens, restored with a hook written here."""
    pair = to_explain_sample(make_pair(generate_samples(1, 0, question_types=["colour"])[0]))
    corrupted = prepare(demo, pair, answer=demo_prep.answer)
    mlp = demo.model.model.language_model.layers[1].mlp
    image = demo_prep.image_positions
    kept = {}

    def keep(_m, _a, out):
        kept["clean"] = out[0, image].clone()

    handle = mlp.register_forward_hook(keep)
    clean = plain_logprobs(demo_prep)
    handle.remove()

    def restore(_m, _a, out):
        out = out.clone()
        out[0, image] = kept["clean"]
        return out

    handle = mlp.register_forward_hook(restore)
    patched = plain_logprobs(demo_prep, **dict(corrupted.inputs))
    handle.remove()
    corrupt = plain_logprobs(demo_prep, **dict(corrupted.inputs))
    p = [float(x.double().sum().exp()) for x in (clean, corrupt, patched)]
    expected = (p[2] - p[1]) / (p[0] - p[1])
    exp = demo_pair_run
    comps, groups = exp.meta["component_labels"], exp.meta["group_labels"]
    got = exp.maps["restored"][comps.index("mlp"), 1, groups.index("image")]
    assert got == pytest.approx(expected, abs=1e-3 * max(1.0, abs(expected)))
    assert exp.scores["prob_corrupt"] == pytest.approx(p[1], rel=1e-4)


def test_patching_nothing_restores_nothing_and_noise_is_seeded(demo_prep, demo):
    corrupted = Corrupted("pair", dict(prepare(demo, to_explain_sample(make_pair(
        generate_samples(1, 0, question_types=["colour"])[0])), answer=demo_prep.answer).inputs))
    everything = torch.arange(demo_prep.seq_len)
    patcher = Patcher(demo_prep, corrupted, ["decoder.blocks.2"], everything)
    clean = patcher.capture_clean()
    runs = patcher.logprobs([[], [], [Patch("decoder.blocks.2", everything)]], batch_size=3)
    shares = restored_share(clean, runs[0], runs)
    assert float(shares[0]) == 0.0 and float(shares[1]) == 0.0
    # patching every position's block output gives the later blocks the clean run's input: the answer's
    # log-probabilities come back up to float32 rounding (the clean run has batch 1, these batch 3, and the
    # last bits of a CPU matmul depend on the batch); the share divides by the clean-corrupt gap, so its
    # tolerance is that rounding scaled by the gap
    torch.testing.assert_close(runs[2], clean, atol=2e-5, rtol=0)
    p_clean, p_corrupt = float(clean.double().sum().exp()), float(runs[0].double().sum().exp())
    assert float(shares[2]) == pytest.approx(1.0, abs=1e-4 * p_clean / abs(p_clean - p_corrupt))
    first = ActivationPatching().explain(demo, demo_prep, corruption="noise", components=["residual"], seed=3)
    again = ActivationPatching().explain(demo, demo_prep, corruption="noise", components=["residual"], seed=3)
    other = ActivationPatching().explain(demo, demo_prep, corruption="noise", components=["residual"], seed=4)
    np.testing.assert_array_equal(first.maps["restored"], again.maps["restored"])
    assert first.scores["prob_corrupt"] != other.scores["prob_corrupt"]
    assert first.meta["corruption"]["kind"] == "noise" and first.params["seed"] == 3


def test_patching_bad_counterfactuals_are_one_line_errors(demo_prep, demo):
    longer = ExplainSample(demo_prep.sample.images, "What colour is the big square?", id="longer")
    for params, fragment in (({"counterfactual": longer}, "same token count"),
                             ({"corruption": "pair", "counterfactual": None, "pair_seed": "x"}, "integer"),
                             ({"groups": ["nowhere"]}, "groups"), ({"components": []}, "components"),
                             ({"layers": [4]}, "blocks 0..3")):
        with pytest.raises(ValueError, match=fragment) as info:
            ActivationPatching().explain(demo, demo_prep, **params)
        assert "\n" not in str(info.value)
    plain = ExplainSample(demo_prep.sample.images, demo_prep.sample.question, id="no-truth")
    with pytest.raises(ValueError, match="needs a counterfactual sample"):
        ActivationPatching().explain(demo, prepare(demo, plain, answer=demo_prep.answer), corruption="pair")


# --- every family ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_interventions_run_on_every_family(family):
    prep = tiny_prepared(family)
    loaded = prep.loaded
    layers = len(loaded.adapter.decoder_layers())
    knock = get_explainer("intervention.attention_knockout")().explain(loaded, prep)
    assert knock.maps["prob_change"].shape == (4, len(knock.meta["windows"]))
    assert np.isfinite(knock.maps["logprob_change"]).all()
    edge = knock.meta["edge_labels"].index("image->answer")
    assert (knock.maps["cut_pairs"][edge] > 0).all()
    eager = AttentionKnockout().explain(loaded, prep, windows=[[], list(range(layers))], fast_attention=False)
    sdpa = AttentionKnockout().explain(loaded, prep, windows=[[], list(range(layers))], fast_attention=True)
    np.testing.assert_allclose(eager.maps["logprob_change"], sdpa.maps["logprob_change"], atol=ATOL)
    np.testing.assert_allclose(eager.maps["logprob_change"][..., 0], 0.0, atol=ATOL)
    plain = plain_logprobs(prep)
    np.testing.assert_allclose(eager.maps["prob"][:, 0], float(plain.double().sum().exp()), rtol=1e-4)

    # another image and another word of the same token count: the tiny Gemma 3's image features are
    # still zero at initialisation, so only the word reaches its decoder
    other = ExplainSample([tiny_image(*TEST_IMAGE_SIZES[family], seed=1)], "what colour is the circle", id="other")
    patch = get_explainer("intervention.activation_patching")().explain(loaded, prep, counterfactual=other,
                                                                         groups=["image", "answer", "all"])
    assert patch.maps["restored"].shape == (3, layers, 3) and patch.meta["corruption"]["kind"] == "pair"
    np.testing.assert_allclose(patch.maps["restored"][0, :, 2], 1.0, atol=1e-3)
    noise = ActivationPatching().explain(loaded, prep, components=["residual"], groups=["all"])
    assert noise.meta["corruption"]["kind"] == "noise"
    np.testing.assert_allclose(noise.maps["restored"][0, :, 0], 1.0, atol=1e-3)
