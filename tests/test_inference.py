"""inference.uncertainty and inference.visual_reliance against plain forwards on real models.

Entropies are recomputed in float64 from the logits of a plain forward; the blank-image reference
is a separately prepared sample of a blank picture made here with numpy; the noised reference
writes VCD's formula out from the paper's schedule.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image


from tiny_models import FAMILIES
from loaded_models import random_demo_loaded
from loaded_models import tiny_prepared as shared_tiny_prepared

from xmllm.explainers.answering import generate_answer
from xmllm.explainers.prepared import ExplainSample, Prepared, prepare
from xmllm.explainers.demo.samples import generate_sample, to_explain_sample
from xmllm.explainers.explanation import Explanation
from xmllm.explainers.models import LoadedModel
from xmllm.explainers.registry import get_explainer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

QUESTION = "what colour is the square"
ATOL = 2e-5
"""Batched, fused-kernel forwards against a plain one: float32 summation order only."""

def tiny_prepared(family: str, tokens: int = 3) -> Prepared:
    return shared_tiny_prepared(family, QUESTION, tokens)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> LoadedModel:
    """The demo architecture (random weights, real LLaVA code) saved and loaded like a user's folder."""
    return random_demo_loaded(tmp_path_factory.mktemp("demo-arch"))


@pytest.fixture(scope="module")
def demo_prep(demo) -> Prepared:
    sample = to_explain_sample(generate_sample(0, 2))
    answer = generate_answer(demo, sample.images, sample.question, max_new_tokens=3)
    assert len(answer.token_ids) >= 2
    return prepare(demo, sample, answer=answer)


def plain_logprobs(prep: Prepared, **overrides) -> torch.Tensor:
    """(T, vocab) float64 log-probabilities at the logit positions of one plain forward."""
    with torch.no_grad():
        logits = prep.forward(use_cache=False, **overrides).logits[0, prep.logit_positions]
    return torch.log_softmax(logits.double(), dim=-1)


def chosen(logp: torch.Tensor, prep: Prepared) -> np.ndarray:
    return logp[range(len(prep.answer.token_ids)), list(prep.answer.token_ids)].numpy()


# --- inference.uncertainty ------------------------------------------------------------------------------


def test_entropy_equals_a_hand_computation(demo, demo_prep):
    exp = get_explainer("inference.uncertainty")().explain(demo, demo_prep)
    logp = plain_logprobs(demo_prep).numpy()
    p = np.exp(logp)
    expected = np.array([-sum(pi * li for pi, li in zip(row_p, row_l) if pi > 0) for row_p, row_l in zip(p, logp)])
    assert exp.axes["entropy"] == ("answer_token",)
    np.testing.assert_allclose(exp.maps["entropy"], expected, atol=1e-5)
    second = np.sort(p, axis=-1)[:, -2]
    np.testing.assert_allclose(exp.maps["margin"], p.max(-1) - second, atol=1e-6)
    np.testing.assert_allclose(exp.maps["logprob"], chosen(torch.as_tensor(logp), demo_prep), atol=1e-5)
    assert exp.scores["entropy_mean"] == pytest.approx(expected.mean(), abs=1e-5)
    assert exp.scores["entropy_max"] == pytest.approx(expected.max(), abs=1e-5)
    vocab = logp.shape[-1]
    assert exp.meta["vocab_size"] == vocab and exp.meta["unit"] == "nats"
    assert exp.scores["entropy_normalised_mean"] == pytest.approx(expected.mean() / math.log(vocab), abs=1e-6)
    answer_logp = chosen(torch.as_tensor(logp), demo_prep)
    assert exp.scores["perplexity"] == pytest.approx(math.exp(-answer_logp.mean()), rel=1e-5)
    assert 0.0 <= exp.maps["entropy"].min() and exp.maps["entropy"].max() <= math.log(vocab) + 1e-6


def test_layer_entropy_follows_the_lens(demo, demo_prep):
    exp = get_explainer("inference.uncertainty")().explain(demo, demo_prep)
    L = len(demo.adapter.decoder_layers())
    assert exp.axes["entropy.lens"] == ("answer_token", "layer")
    assert exp.maps["entropy.lens"].shape == (len(demo_prep.answer.token_ids), L)
    np.testing.assert_allclose(exp.maps["entropy.lens"][:, -1], exp.maps["entropy"], atol=1e-5)
    model = demo.model
    with torch.no_grad():  # block 0's output from transformers, through the norm and head by hand
        hidden = demo_prep.forward(use_cache=False, output_hidden_states=True).hidden_states[1][0, demo_prep.logit_positions]
        logp = torch.log_softmax(model.lm_head(model.model.language_model.norm(hidden)).double(), -1)
    expected = -(logp.exp() * logp).sum(-1).numpy()
    np.testing.assert_allclose(exp.maps["entropy.lens"][:, 0], expected, atol=1e-5)
    assert not np.allclose(exp.maps["entropy.lens"][:, 0], exp.maps["entropy.lens"][:, -1])
    sub = get_explainer("inference.uncertainty")().explain(demo, demo_prep, layers=[-1])
    assert sub.params == {"layers": [L - 1]}
    np.testing.assert_allclose(sub.maps["entropy.lens"][:, 0], exp.maps["entropy.lens"][:, -1], atol=1e-6)


# --- inference.visual_reliance ---------------------------------------------------------------------------


def blank_like(image: Image.Image) -> Image.Image:
    """The image's mean colour everywhere, computed here."""
    mean = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
    return Image.new("RGB", image.size, tuple(int(round(v)) for v in mean))


def vcd_noised(pixels: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """Leng et al.'s q(x_t | x_0) with their schedule: 1000 sigmoid-spaced betas in [1e-5, 5e-3]."""
    betas = [1e-5 + (5e-3 - 1e-5) / (1 + math.exp(-(-6 + 12 * i / 999))) for i in range(1000)]
    alpha_bar = float(np.prod([1 - b for b in betas[: step + 1]]))
    eps = torch.randn(tuple(pixels.shape), generator=torch.Generator().manual_seed(seed))
    return math.sqrt(alpha_bar) * pixels + math.sqrt(1 - alpha_bar) * eps


def test_real_blank_and_noised_log_probs_equal_plain_forwards(demo, demo_prep):
    exp = get_explainer("inference.visual_reliance")().explain(demo, demo_prep, seed=3)
    real = chosen(plain_logprobs(demo_prep), demo_prep)
    with torch.no_grad():
        prepared_real = demo_prep.answer_logprobs(demo_prep.forward().logits)[0].numpy()
    np.testing.assert_allclose(exp.maps["logprob.real"], prepared_real, atol=ATOL)
    np.testing.assert_allclose(exp.maps["logprob.real"], np.log(demo_prep.answer.probs), atol=1e-4)  # generate's
    sample = demo_prep.sample
    blank = prepare(demo, ExplainSample([blank_like(sample.images[0])], sample.question), answer=demo_prep.answer)
    np.testing.assert_allclose(exp.maps["logprob.blank"], chosen(plain_logprobs(blank), blank), atol=ATOL)
    noised = vcd_noised(demo_prep.inputs["pixel_values"], 500, 3)  # the demo's CLIP grid covers every pixel
    np.testing.assert_allclose(exp.maps["logprob.noised"], chosen(plain_logprobs(demo_prep, pixel_values=noised), demo_prep),
                               atol=ATOL)
    np.testing.assert_allclose(exp.maps["drop.blank"], real - exp.maps["logprob.blank"], atol=ATOL)
    np.testing.assert_allclose(exp.maps["drop.noised"], real - exp.maps["logprob.noised"], atol=ATOL)
    assert not np.allclose(exp.maps["drop.blank"], 0.0, atol=1e-4)  # the image really changed
    assert exp.scores["mean_drop_blank"] == pytest.approx(float(exp.maps["drop.blank"].mean()), abs=1e-6)
    for name in ("logprob.real", "drop.blank", "vcd.logprob", "reliant"):
        assert exp.axes[name] == ("answer_token",)


def test_vcd_contrast_and_reliance_by_hand(demo, demo_prep):
    exp = get_explainer("inference.visual_reliance")().explain(demo, demo_prep, alpha=0.5, beta=0.2, threshold=0.01)
    real = plain_logprobs(demo_prep)
    noised = plain_logprobs(demo_prep, pixel_values=vcd_noised(demo_prep.inputs["pixel_values"], 500, 0))
    # log-softmax shifts cancel in the contrast up to a constant, so log-probs work as logits
    contrast = torch.log_softmax(1.5 * real - 0.5 * noised, dim=-1)
    np.testing.assert_allclose(exp.maps["vcd.logprob"], chosen(contrast, demo_prep), atol=1e-4)
    plausible = real >= math.log(0.2) + real.max(-1, keepdim=True).values
    vcd_choice = (1.5 * real - 0.5 * noised).masked_fill(~plausible, -np.inf).argmax(-1).numpy()
    np.testing.assert_array_equal(exp.maps["vcd.agrees"], (vcd_choice == np.array(demo_prep.answer.token_ids)))
    drops = np.maximum(exp.maps["drop.blank"], exp.maps["drop.noised"])
    np.testing.assert_array_equal(exp.maps["reliant"], drops > 0.01)
    assert exp.scores["reliant_share"] == pytest.approx(float((drops > 0.01).mean()))


def test_reliance_is_reproducible_and_seeded(demo, demo_prep, tmp_path):
    reliance = get_explainer("inference.visual_reliance")()
    a = reliance.explain(demo, demo_prep, seed=1)
    b = reliance.explain(demo, demo_prep, seed=1)
    c = reliance.explain(demo, demo_prep, seed=2)
    np.testing.assert_array_equal(a.maps["logprob.noised"], b.maps["logprob.noised"])
    assert not np.array_equal(a.maps["logprob.noised"], c.maps["logprob.noised"])
    quiet = reliance.explain(demo, demo_prep, noise_step=0)  # alpha_bar ~ 1: almost the real image
    np.testing.assert_allclose(quiet.maps["logprob.noised"], quiet.maps["logprob.real"], atol=5e-3)
    a.save(tmp_path / "reliance")
    back = Explanation.load(tmp_path / "reliance")
    assert back.scores == a.scores and back.params == a.params
    for bad, match in (({"blank": "white"}, "blank"), ({"noise_step": 1000}, "noise_step"), ({"beta": 0.0}, "beta"),
                       ({"alpha": -1}, "alpha"), ({"gamma": 1}, "unknown parameter")):
        with pytest.raises(ValueError, match=match):
            reliance.explain(demo, demo_prep, **bad)


# --- every family -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family(family):
    prep = tiny_prepared(family)
    T = len(prep.answer.token_ids)
    uncertainty = get_explainer("inference.uncertainty")().explain(prep.loaded, prep)
    logp = plain_logprobs(prep)
    np.testing.assert_allclose(uncertainty.maps["entropy"], -(logp.exp() * logp).sum(-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(uncertainty.maps["entropy.lens"][:, -1], uncertainty.maps["entropy"], atol=1e-5)
    assert uncertainty.maps["entropy.lens"].shape == (T, len(prep.adapter.decoder_layers()))
    reliance = get_explainer("inference.visual_reliance")().explain(prep.loaded, prep, blank="black")
    np.testing.assert_allclose(reliance.maps["logprob.real"], chosen(logp, prep), atol=ATOL)
    black = prepare(prep.loaded, ExplainSample([Image.new("RGB", prep.sample.images[0].size)], QUESTION),
                    answer=prep.answer)
    np.testing.assert_allclose(reliance.maps["logprob.blank"], chosen(plain_logprobs(black), black), atol=ATOL)
    for exp in (uncertainty, reliance):
        for name, arr in exp.maps.items():
            assert np.isfinite(arr).all() and arr.shape[0] == T, name
    assert get_explainer("inference.visual_reliance").citations[0].arxiv == "2311.16922"
