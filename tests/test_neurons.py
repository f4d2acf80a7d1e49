"""MLP-neuron explainers against computations done by hand on real models.

The references here never use the explainer's hooks: attribution is a forward pre-hook with
``retain_grad`` on the block's own ``mlp.down_proj`` and a plain ``backward``; ablation zeroes the
neurons' *columns of the down projection's weight* (the same function as zeroing their values,
by a different route) before a plain forward; activation probabilities are counted from the
``act_fn`` outputs of each block's MLP.
"""
from __future__ import annotations

import contextlib
import math
import re

import numpy as np
import pytest
import torch


from loaded_models import TINY_QUESTION, tiny_loaded, tiny_prepared
from tiny_models import FAMILIES  # noqa: E402

from xmllm.explainers.prepared import ExplainSample, Prepared, prepare
from xmllm.explainers.demo import DEMO_MODEL_DIR
from xmllm.explainers.demo.model import build_model, build_processor
from xmllm.explainers.demo.samples import generate_samples, to_explain_sample
from xmllm.explainers.explanation import Explanation
from xmllm.explainers.methods.neurons import (
    ModalitySpecific,
    TopActivations,
    ablated_logprobs,
    domain_probabilities,
    neuron_space,
    select_specific,
    specificity_entropy,
)
from xmllm.explainers.forward import answer_ids, logprobs_at
from xmllm.explainers.models import LoadedModel, adapter_for, load_model
from xmllm.explainers.registry import get_explainer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

LOGP_ATOL = 1e-4
"""Hand forwards and the explainer's batched, logits_to_keep forwards differ in summation order only."""


@pytest.fixture(scope="module")
def demo_random() -> LoadedModel:
    """The demo architecture (CLIP tower, projector, Llama decoder) with random weights."""
    processor = build_processor()
    model = build_model(processor.tokenizer).eval()
    return LoadedModel(model, processor, adapter_for(model, processor), spec="demo-random", source="build_model",
                       device=torch.device("cpu"), dtype=torch.float32)


def demo_samples(n: int, seed: int = 5, question_types: list[str] | None = None) -> list[ExplainSample]:
    return [to_explain_sample(s) for s in generate_samples(n, seed, question_types=question_types)]


def down(prep: Prepared, layer: int) -> torch.nn.Module:
    return prep.adapter.decoder_layers()[layer].mlp.down_proj


@torch.no_grad()
def hand_logprob(prep: Prepared) -> float:
    """Sum of the answer tokens' log-probabilities from one plain full forward."""
    logits = prep.model(**dict(prep.inputs)).logits[0].float()
    logp = torch.log_softmax(logits[prep.logit_positions], dim=-1)
    return float(logp[torch.arange(len(prep.answer.token_ids)), answer_ids(prep)].sum())


@contextlib.contextmanager
def zeroed_columns(prep: Prepared, neurons: list[tuple[int, int]]):
    """Zero each (layer, unit)'s column of its down projection's weight, restored on exit."""
    saved = []
    with torch.no_grad():
        for layer, unit in neurons:
            weight = down(prep, layer).weight
            saved.append((weight, unit, weight[:, unit].clone()))
            weight[:, unit] = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, unit, column in reversed(saved):
                weight[:, unit] = column


def parse(label: str) -> tuple[int, int]:
    layer, unit = re.fullmatch(r"L(\d+)\.U(\d+)", label).groups()
    return int(layer), int(unit)


def manual_attribution(prep: Prepared, layer: int) -> np.ndarray:
    """sum over positions of value x d(answer log-prob)/d(value), by retain_grad and backward."""
    store: dict[str, torch.Tensor] = {}

    def keep(_module, args):
        args[0].retain_grad()
        store["x"] = args[0]

    handle = down(prep, layer).register_forward_pre_hook(keep)
    try:
        logits = prep.model(**dict(prep.inputs)).logits[0].float()
        logp = torch.log_softmax(logits[prep.logit_positions], dim=-1)
        logp[torch.arange(len(prep.answer.token_ids)), answer_ids(prep)].sum().backward()
    finally:
        handle.remove()
        prep.model.zero_grad(set_to_none=True)
    x = store["x"]
    return (x[0] * x.grad[0]).sum(0).detach().numpy()


@torch.no_grad()
def neuron_values(prep: Prepared, layer: int) -> torch.Tensor:
    store: dict[str, torch.Tensor] = {}
    handle = down(prep, layer).register_forward_pre_hook(lambda m, a: store.setdefault("x", a[0][0].clone()))
    try:
        prep.model(**dict(prep.inputs))
    finally:
        handle.remove()
    return store["x"]


# --- neurons.top_activations -------------------------------------------------------------------------


def test_registered_with_citations():
    for eid, arxiv in (("neurons.top_activations", "2308.01544"), ("neurons.modality_specific", "2406.11193")):
        cls = get_explainer(eid)
        assert arxiv in {c.arxiv for c in cls.citations}
    assert get_explainer("neurons.modality_specific").scope == "dataset"


def test_activation_x_gradient_equals_a_manual_hook_computation(demo_random):
    prep = prepare(demo_random, demo_samples(1)[0])
    exp = TopActivations().explain(demo_random, prep, top_k=4, random_draws=2)
    assert exp.axes["attribution"] == ("layer", "unit")
    width = down(prep, 0).in_features
    for layer in range(len(prep.adapter.decoder_layers())):
        manual = manual_attribution(prep, layer)
        ours = exp.maps["attribution"][layer, :width]
        np.testing.assert_allclose(ours, manual, rtol=1e-3, atol=1e-5 * float(np.abs(manual).max()))
    # the top neurons are the largest attributions, in order
    flat = exp.maps["attribution"].reshape(-1)
    np.testing.assert_allclose(exp.maps["top.attribution"], np.sort(flat)[::-1][:4], rtol=1e-6)
    assert exp.scores["logprob"] == pytest.approx(hand_logprob(prep), abs=LOGP_ATOL)


def test_ablating_zero_neurons_leaves_the_logprob_unchanged(demo_random):
    prep = prepare(demo_random, demo_samples(2)[1])
    space = neuron_space(prep.adapter, "test")
    plain = logprobs_at(prep.model, dict(prep.inputs), prep.logit_positions, answer_ids(prep))
    nothing = ablated_logprobs(prep, space, [[]], batch_size=1)
    assert torch.equal(nothing, plain)
    assert float(nothing.sum()) == pytest.approx(hand_logprob(prep), abs=LOGP_ATOL)
    # in a batch next to a real ablation, the untouched row still matches, the other does not
    both = ablated_logprobs(prep, space, [[], [0, 1, 2, 3]], batch_size=2)
    torch.testing.assert_close(both[0], plain[0], atol=2e-5, rtol=0)
    assert not torch.allclose(both[1], plain[0], atol=1e-6)


def test_top_and_random_ablations_equal_zeroed_weight_columns(demo_random):
    prep = prepare(demo_random, demo_samples(3)[2])
    exp = TopActivations().explain(demo_random, prep, top_k=5, random_draws=3, seed=7)
    top = [(n["layer"], n["unit"]) for n in exp.meta["neurons"]]
    base = hand_logprob(prep)
    with zeroed_columns(prep, top):
        assert exp.scores["logprob_top_ablated"] == pytest.approx(hand_logprob(prep), abs=LOGP_ATOL)
    with zeroed_columns(prep, top[:1]):
        assert exp.maps["top.single_drop"][0] == pytest.approx(base - hand_logprob(prep), abs=LOGP_ATOL)
    for draw, labels in enumerate(exp.meta["random_groups"]):
        group = [parse(label) for label in labels]
        assert len(group) == 5 and not set(group) & set(top)
        with zeroed_columns(prep, group):
            assert exp.maps["random_drop"][draw] == pytest.approx(base - hand_logprob(prep), abs=LOGP_ATOL)
    assert exp.scores["drop_top"] == pytest.approx(exp.scores["logprob"] - exp.scores["logprob_top_ablated"],
                                                   abs=1e-9)
    # the same seed draws the same random groups
    again = TopActivations().explain(demo_random, prep, top_k=5, random_draws=3, seed=7)
    assert again.meta["random_groups"] == exp.meta["random_groups"]


def test_patch_maps_are_each_top_neurons_values_at_the_grid_cells(demo_random):
    prep = prepare(demo_random, demo_samples(1)[0])
    exp = TopActivations().explain(demo_random, prep, top_k=3, random_draws=1)
    grid = prep.layouts[0].main_grid
    assert exp.axes["image"] == ("neuron", "row", "col") and exp.maps["image"].shape == (3, grid.rows, grid.cols)
    assert exp.axes["prompt"] == ("neuron", "prompt_token")
    for j, neuron in enumerate(exp.meta["neurons"]):
        values = neuron_values(prep, neuron["layer"])[:, neuron["unit"]]
        expected = values[grid.positions].reshape(grid.rows, grid.cols).numpy()
        np.testing.assert_allclose(exp.maps["image"][j], expected, atol=1e-5)
        np.testing.assert_allclose(exp.maps["prompt"][j], values[prep.text_positions].numpy(), atol=1e-5)
    assert exp.meta["axis_labels"]["neuron"] == [n["label"] for n in exp.meta["neurons"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_top_activations_on_every_family(family):
    prep = tiny_prepared(family, TINY_QUESTION)
    exp = TopActivations().explain(tiny_loaded(family), prep, top_k=3, random_draws=2)
    layers = len(prep.adapter.decoder_layers())
    assert exp.maps["attribution"].shape == (layers, down(prep, 0).in_features)
    grid = prep.layouts[0].main_grid
    assert exp.maps["image"].shape == (3, grid.rows, grid.cols)
    assert exp.maps["image.attribution"].shape == (3, grid.rows, grid.cols)
    assert all(np.isfinite(v).all() for v in exp.maps.values())
    with zeroed_columns(prep, [(n["layer"], n["unit"]) for n in exp.meta["neurons"]]):
        assert exp.scores["logprob_top_ablated"] == pytest.approx(hand_logprob(prep), abs=LOGP_ATOL)


def test_top_activations_bad_parameters(demo_random):
    prep = prepare(demo_random, demo_samples(1)[0])
    with pytest.raises(ValueError, match="top_k=0"):
        TopActivations().explain(demo_random, prep, top_k=0)
    with pytest.raises(ValueError, match="rank_by='loud'"):
        TopActivations().explain(demo_random, prep, rank_by="loud")
    with pytest.raises(ValueError, match="unknown parameter"):
        TopActivations().explain(demo_random, prep, layer=2)


# --- neurons.modality_specific -----------------------------------------------------------------------


def test_entropy_on_a_synthetic_activation_table():
    """20 tokens (10 image, 10 text) x 4 neurons: image-only, everywhere, never, and half/all."""
    domain = torch.tensor([0] * 10 + [1] * 10)
    table = torch.full((20, 4), -1.0)
    table[:10, 0] = 2.0  # active only on image tokens
    table[:, 1] = 0.5  # active on every token
    table[::2, 3] = 1.0  # image: 5 of 10; text: 5 of 10 ...
    table[10:, 3] = 1.0  # ... text: all 10
    probs = domain_probabilities(table, domain, 2)
    np.testing.assert_array_equal(probs.numpy(), [[1.0, 1.0, 0.0, 0.5], [0.0, 1.0, 0.0, 1.0]])
    entropy = specificity_entropy(probs)
    assert float(entropy[0]) == 0.0  # by construction: one domain only
    assert float(entropy[1]) == pytest.approx(math.log(2))
    assert float(entropy[2]) == pytest.approx(math.log(2))  # never active: no evidence of a domain
    p = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    assert float(entropy[3]) == pytest.approx(float(-(p * p.log()).sum()))
    chosen, candidates = select_specific(probs, entropy, size=2, filter_rate=0.5)
    assert chosen.tolist() == [0, 3] and candidates == 3  # neuron 2 never reaches the filter


def test_modality_probabilities_and_ablation_match_hand_counts(demo_random):
    samples = demo_samples(3, seed=11)
    preps = [prepare(demo_random, s) for s in samples]
    exp = ModalitySpecific().explain(demo_random, preps, accuracy=False, random_draws=2, top_k=6)
    blocks = preps[0].adapter.decoder_layers()
    counts = torch.zeros(2, len(blocks), blocks[0].mlp.down_proj.in_features, dtype=torch.float64)
    tokens = torch.zeros(2, dtype=torch.float64)
    for prep in preps:
        store: dict[int, torch.Tensor] = {}
        handles = [b.mlp.act_fn.register_forward_hook(lambda m, a, out, i=i: store.setdefault(i, out[0]))
                   for i, b in enumerate(blocks)]
        try:
            with torch.no_grad():
                prep.model(**dict(prep.inputs))
        finally:
            for h in handles:
                h.remove()
        for d, positions in enumerate((prep.image_positions, prep.text_positions)):
            tokens[d] += positions.numel()
            for layer, acts in store.items():
                counts[d, layer] += (acts[positions] > 0).sum(0).double()
    expected = counts / tokens[:, None, None]
    assert exp.meta["domains"] == ["image", "text"]
    np.testing.assert_allclose(exp.maps["activation_probability"], expected.numpy(), atol=1e-12)
    np.testing.assert_allclose(exp.maps["entropy"], specificity_entropy(expected.reshape(2, -1)).reshape(
        expected.shape[1:]).numpy(), atol=1e-12)
    groups = exp.meta["axis_labels"]["group"]
    assert groups[:2] == ["none", "specific"] and len(exp.meta["groups"]["specific"]) == 6
    np.testing.assert_array_equal(exp.maps["ablation_drop"][0], 0.0)
    specific = [parse(label) for label in exp.meta["groups"]["specific"]]
    for j, prep in enumerate(preps):
        base = hand_logprob(prep)
        with zeroed_columns(prep, specific):
            assert exp.maps["ablation_drop"][1, j] == pytest.approx(base - hand_logprob(prep), abs=LOGP_ATOL)
    assert exp.scores["drop_specific"] == pytest.approx(float(exp.maps["ablation_drop"][1].mean()))


def test_quantile_threshold_marks_the_top_share_active(demo_random):
    samples = demo_samples(2, seed=12)
    exp = ModalitySpecific().explain(demo_random, samples, threshold="quantile", quantile=0.75, accuracy=False,
                                     random_draws=1)
    assert len(exp.meta["thresholds"]) == len(demo_random.adapter.decoder_layers())
    probs = exp.maps["activation_probability"]
    tokens = np.array([exp.meta["domain_tokens"][d] for d in exp.meta["domains"]], dtype=float)
    overall = float((probs.mean(axis=(1, 2)) * tokens).sum() / tokens.sum())
    assert overall == pytest.approx(0.25, abs=0.05)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "idefics3"])
def test_question_type_domains_with_accuracy_on_tiny_models(family, tmp_path):
    loaded = tiny_loaded(family)
    samples = demo_samples(3, seed=2, question_types=["colour", "count", "presence"])
    exp = ModalitySpecific().explain(loaded, samples, domains="question_type", accuracy=True, max_new_tokens=2,
                                     random_draws=1, top_k=4)
    exp.save(tmp_path / "specific")
    back = Explanation.load(tmp_path / "specific")
    assert back.meta == exp.meta and back.scores == exp.scores
    np.testing.assert_array_equal(back.maps["ablation_drop"], exp.maps["ablation_drop"])
    assert exp.meta["domains"] == ["colour", "count", "presence"]
    layers = len(loaded.adapter.decoder_layers())
    assert exp.maps["activation_probability"].shape[:2] == (3, layers)
    groups = exp.meta["axis_labels"]["group"]
    assert exp.maps["ablation_drop"].shape == (len(groups), 3)
    assert exp.maps["ablation_drop.by_domain"].shape == (len(groups), 3)
    assert exp.axes["ablation_drop.by_domain"] == ("group", "domain")
    assert ((exp.maps["accuracy"] >= 0) & (exp.maps["accuracy"] <= 1)).all()
    assert exp.maps["specific_count"].sum() == 4


def test_modality_specific_bad_input(demo_random):
    bare = ExplainSample(demo_samples(1)[0].images, "What colour is the circle?", id="bare")
    with pytest.raises(ValueError, match=r"sample 'bare' has no extra\['question_type'\]"):
        ModalitySpecific().explain(demo_random, [bare], domains="question_type", accuracy=False)
    with pytest.raises(ValueError, match="non-empty list of samples"):
        ModalitySpecific().explain(demo_random, bare)
    with pytest.raises(ValueError, match="domains='layers'"):
        ModalitySpecific().explain(demo_random, [bare], domains="layers")
    with pytest.raises(ValueError, match="accuracy=True but sample 'bare'"):
        ModalitySpecific().explain(demo_random, [bare], accuracy=True)


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="trained demo weights not present")
def test_trained_demo_top_neurons_matter_more_than_random_ones():
    """On the trained demo model, zeroing the 10 neurons with the largest activation x gradient
    costs the answer more than zeroing 10 random neurons, on every sample."""
    loaded = load_model(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    for sample in demo_samples(3, seed=30):
        exp = TopActivations().explain(loaded, sample, top_k=10, random_draws=8)
        assert exp.scores["drop_top"] > float(exp.maps["random_drop"].max()), exp.scores


@pytest.mark.parametrize("k", [1, 3, 7])
def test_the_running_top_over_layers_equals_one_stable_sort_of_every_neuron(k):
    """neurons.top_activations keeps only the best k columns as the backward visits each layer
    (last layer first); with ties everywhere, that is still a stable descending sort of all keys."""
    from xmllm.explainers.methods.neurons import _RunningTop

    gen = torch.Generator().manual_seed(k)
    widths, seq = [5, 3, 6, 4], 7
    keys = [torch.randint(-2, 3, (w,), generator=gen).float() for w in widths]  # many ties
    values = [torch.randn(seq, w, generator=gen) for w in widths]
    offsets = np.cumsum([0, *widths[:-1]]).tolist()
    running = _RunningTop(k)
    for layer in reversed(range(len(widths))):
        running.offer(offsets[layer], keys[layer], values[layer], 2 * values[layer])
    expected = torch.argsort(torch.cat(keys), descending=True, stable=True)[:k]
    assert running.flats.tolist() == expected.tolist()
    columns = torch.cat(values, dim=1)[:, expected].T
    assert torch.equal(running.values, columns) and torch.equal(running.attributions, 2 * columns)
