"""Decoding-time views: how sure the model is of its answer, and how much the answer rests on the image.

``inference.uncertainty`` measures the entropy of each answer token's next-token distribution,
from the model's own logits and, through the logit lens (the read-out of
:mod:`xmllm.explainers.readout`), after every decoder block: a distribution that stays flat until
the last layers marks an answer formed late and held loosely (MemVR retraces the image when this
layer-wise uncertainty is high).

``inference.visual_reliance`` scores the same teacher-forced answer with the real image, a blank
image and a noised image (Visual Contrastive Decoding's distortion), one batched forward: the
drop in each answer token's log-probability says how much that token needs the picture, and
VCD's contrastive distribution says whether decoding against the noised image would keep it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from xmllm import MissingInput
from xmllm.explainers.forward import (
    answer_ids,
    batch_size_for,
    eager_unless_fused,
    fused_attention,
    logprobs_at,
    repeat_inputs,
)
from xmllm.explainers.masking import baseline_pixels

from xmllm.explainers.prepared import Prepared
from ..explanation import Explanation
from ..models import LoadedModel
from ..models.errors import AdapterError
from ..params import ExplainerParams, param
from ..readout import (
    LOGIT_LENS,
    READOUT,
    entropy,
    lens_logprobs,
    pick_layers,
    residual_states,
)
from ..registry import Citation, Explainer, register

GROUP = "inference"

MEMVR = Citation(
    "Look Twice Before You Answer: Memory-Space Visual Retracing for Hallucination Mitigation in "
    "Multimodal Large Language Models", 2024, "2410.03577", "Zou et al.",
)
VCD = Citation(
    "Mitigating Object Hallucinations in Large Vision-Language Models through Visual Contrastive Decoding",
    2023, "2311.16922", "Leng, Zhang, Chen, Li, Lu, Miao, Bing",
)

# --- VCD's distortion and contrast (defaults from the paper and its released code) ------------------

DIFFUSION_STEPS = 1000
"""VCD's forward-diffusion schedule has 1000 steps ..."""
BETA_MIN, BETA_MAX = 1e-5, 0.5e-2
"""... with betas sigmoid-spaced between these two values (``sigmoid(linspace(-6, 6))``)."""
SIGMOID_SPAN = 6.0
DEFAULT_NOISE_STEP = 500
"""The diffusion step VCD distorts images to in its experiments (of 0..999)."""
DEFAULT_ALPHA = 1.0
"""VCD's contrast strength: logits (1 + alpha) * real - alpha * distorted."""
DEFAULT_BETA = 0.1
"""VCD's adaptive plausibility cut: only tokens with p >= beta * max p may be chosen."""
BLANKS: tuple[str, ...] = ("mean", "black")
"""A blank image: the image's mean colour everywhere (content gone, brightness kept), or black."""
RELIANCE_THRESHOLD = math.log(2.0)
"""A token relies on the image when losing it (blank or noised) at least halves its probability."""
CONDITIONS: tuple[str, ...] = ("real", "blank", "noised")


def vcd_alpha_bar(step: int) -> float:
    """``prod_{s <= step} (1 - beta_s)`` of VCD's schedule: the signal kept at ``step``."""
    betas = torch.sigmoid(torch.linspace(-SIGMOID_SPAN, SIGMOID_SPAN, DIFFUSION_STEPS)) * (BETA_MAX - BETA_MIN) + BETA_MIN
    return float(torch.cumprod(1.0 - betas, dim=0)[step])


def image_value_mask(prep: Prepared) -> torch.Tensor | None:
    """Where ``pixel_values`` carries picture (a grid cell's pixels), or None to mean everywhere.

    Padding (Idefics3's padded tiles, LLaVA-NeXT's unused patches) stays untouched, so a noised
    input keeps the structure the model reads its image count and masks from.
    """
    try:
        mapping = prep.adapter.pixel_cell_map(prep.inputs)
    except AdapterError:
        return None
    pixels = prep.inputs["pixel_values"]
    if tuple(mapping.shape) != tuple(pixels.shape):
        return None
    return (mapping >= 0).to(pixels.device)


def noised_pixels(prep: Prepared, step: int, seed: int) -> torch.Tensor:
    """VCD's distortion: ``sqrt(a) x + sqrt(1 - a) eps`` on the processed image (``pixel_values``),
    ``a`` from :func:`vcd_alpha_bar`, ``eps`` standard normal from ``seed`` (on the CPU, so the same
    seed gives the same noise on any device)."""
    pixels = prep.inputs["pixel_values"]
    alpha_bar = vcd_alpha_bar(step)
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(tuple(pixels.shape), generator=generator, dtype=torch.float32).to(pixels.device)
    noised = (math.sqrt(alpha_bar) * pixels.float() + math.sqrt(1.0 - alpha_bar) * eps).to(pixels.dtype)
    where = image_value_mask(prep)
    return noised if where is None else torch.where(where, noised, pixels)


def vcd_logits(real: torch.Tensor, distorted: torch.Tensor, alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """VCD's contrastive logits ``(1 + alpha) real - alpha distorted`` and its plausible set
    (``real >= log beta + max real``, i.e. ``p >= beta * max p``), both ``(..., vocab)``."""
    contrast = (1.0 + alpha) * real - alpha * distorted
    plausible = real >= math.log(beta) + real.max(dim=-1, keepdim=True).values
    return contrast, plausible


# --- the explainers ------------------------------------------------------------------------------------


@register
class Uncertainty(Explainer):
    """Entropy (nats) of each answer token's next-token distribution from the model's logits, its
    top-1/top-2 margin, and the same entropy after every decoder block through the logit lens: how
    sure the model is, and how deep in the network it became sure.

    Cost: one teacher-forced forward and one LM-head read-out per layer of the answer rows, no
    backward. MemVR, 2024 (arXiv 2410.03577); the logit lens (nostalgebraist, 2020).
    """

    id = "inference.uncertainty"
    title = "Answer uncertainty: per-token entropy, and per layer through the logit lens"
    group = GROUP
    citations = (MEMVR, LOGIT_LENS)
    summary = (
        "Entropy (nats) of each answer token's next-token distribution from the model's logits, its "
        "top-1/top-2 margin, and the same entropy after every decoder block through the logit lens: "
        "how sure the model is, and how deep in the network it became sure."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        layers: tuple[int, ...] | None = param(None, "decoder blocks read through the logit lens (negative from the end); "
                                                     "null reads all")

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        prep = sample
        picked = pick_layers(params.layers, len(prep.adapter.decoder_layers()))
        states, logits = residual_states(prep, prep.logit_positions, picked)
        ids = answer_ids(prep)
        logp = torch.log_softmax(logits.cpu(), dim=-1)
        T, vocab = ids.numel(), int(logp.shape[-1])
        token_entropy = entropy(logp)
        top2 = logp.topk(min(2, vocab), dim=-1).values.exp()
        margin = top2[:, 0] - (top2[:, 1] if vocab > 1 else 0.0)
        answer_logp = logp[torch.arange(T), ids]
        per_layer = torch.stack([entropy(lp.cpu()) for lp in lens_logprobs(prep, states)], dim=1)  # (T, L)

        exp = Explanation(self.id, {**params.as_dict(), "layers": picked}, prep.target())
        exp.add("entropy", token_entropy, ("answer_token",))
        exp.add("entropy.lens", per_layer, ("answer_token", "layer"))
        exp.add("margin", margin, ("answer_token",))
        exp.add("logprob", answer_logp, ("answer_token",))
        max_entropy = math.log(vocab)
        exp.scores.update({
            "entropy_mean": float(token_entropy.mean()),
            "entropy_max": float(token_entropy.max()),
            "entropy_normalised_mean": float(token_entropy.mean()) / max_entropy if vocab > 1 else 0.0,
            "margin_min": float(margin.min()),
            "logprob_answer": float(answer_logp.sum()),
            "perplexity": float(torch.exp(-answer_logp.mean())),
        })
        exp.meta.update({
            "unit": "nats",
            "vocab_size": vocab,
            "max_entropy": max_entropy,
            "layers": picked,
            "lens_readout": READOUT,
            "margin": "probability of the top token minus that of the runner-up, from the model's logits",
            "model_type": prep.adapter.model_type,
        })
        return exp


@register
class VisualReliance(Explainer):
    """Each answer token's teacher-forced log-probability with the real image, a blank image and VCD's
    diffusion-noised image: how much the token needs the picture, and whether it survives VCD's
    contrastive decoding.

    Cost: three forwards of the final sequence (one batched forward where the budget fits), no
    backward. VCD, 2023 (arXiv 2311.16922).
    """

    id = "inference.visual_reliance"
    title = "Visual reliance: the answer with the real, a blank and a noised image (VCD-style)"
    group = GROUP
    citations = (VCD,)
    summary = (
        "Each answer token's log-probability, teacher-forced on the same answer, with the real image, a "
        "blank image and VCD's diffusion-noised image, in one batched forward; the drop says how much the "
        "token needs the picture, and VCD's contrastive distribution whether it survives contrastive decoding."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        blank: str = param("mean", "the blank image: the image's mean colour everywhere, or black", choices=BLANKS)
        noise_step: int = param(DEFAULT_NOISE_STEP, "VCD diffusion step the noised image is distorted to",
                                low=0, high=DIFFUSION_STEPS - 1)
        seed: int = param(0, "seed of the diffusion noise")
        alpha: float = param(DEFAULT_ALPHA, "VCD's contrast strength: (1 + alpha) real - alpha noised logits", low=0.0)
        beta: float = param(DEFAULT_BETA, "VCD's plausibility cut: only tokens with p >= beta * max p may be chosen",
                            low=0.0, low_open=True, high=1.0)
        threshold: float = param(RELIANCE_THRESHOLD, "log-probability drop above which a token relies on the image",
                                 low=0.0)
        fast_attention: bool = param(True, "run the three forwards with the fused attention kernel")

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        blank, step, seed = params.blank, params.noise_step, params.seed
        alpha, beta, threshold, fast_attention = params.alpha, params.beta, params.threshold, params.fast_attention
        prep = sample
        if "pixel_values" not in prep.inputs or not prep.layouts:
            raise MissingInput(f"sample {prep.sample.id!r} has no image: visual reliance needs one")
        pixels = prep.inputs["pixel_values"]
        variants = torch.cat([pixels, baseline_pixels(prep, blank, seed), noised_pixels(prep, step, seed)], dim=0)
        ids = answer_ids(prep)
        # the three conditions share one forward where the memory budget allows, else go in chunks
        chunk = batch_size_for(prep, None, eager=eager_unless_fused(prep, fast_attention), most=len(CONDITIONS))
        rows = pixels.shape[0]
        parts = []
        with fused_attention(prep.model, fast_attention), torch.inference_mode():
            for start in range(0, len(CONDITIONS), chunk):
                count = min(chunk, len(CONDITIONS) - start)
                batch = repeat_inputs(dict(prep.inputs), count)
                batch["pixel_values"] = variants[start * rows : (start + count) * rows]
                parts.append(logprobs_at(prep.model, batch, prep.logit_positions, None).cpu())
        logp = torch.cat(parts)  # (3, T, vocab)
        T = ids.numel()
        chosen = logp[:, torch.arange(T), ids]  # (3, T)
        real, blank_lp, noised = chosen
        drops = {"blank": real - blank_lp, "noised": real - noised}
        contrast, plausible = vcd_logits(logp[0], logp[2], alpha, beta)
        vcd_logp = torch.log_softmax(contrast.masked_fill(~plausible, float("-inf")), dim=-1)
        vcd_choice = vcd_logp.argmax(dim=-1)
        answer_vcd = torch.log_softmax(contrast, dim=-1)[torch.arange(T), ids]
        in_set = plausible[torch.arange(T), ids]
        reliant = torch.maximum(drops["blank"], drops["noised"]) > threshold

        exp = Explanation(self.id, params.as_dict(), prep.target())
        for name, values in zip(CONDITIONS, (real, blank_lp, noised)):
            exp.add(f"logprob.{name}", values, ("answer_token",))
        for name, values in drops.items():
            exp.add(f"drop.{name}", values, ("answer_token",))
        exp.add("reliant", reliant.to(torch.float32), ("answer_token",))
        exp.add("vcd.logprob", answer_vcd, ("answer_token",))
        exp.add("vcd.plausible", in_set.to(torch.float32), ("answer_token",))
        exp.add("vcd.agrees", (vcd_choice == ids).to(torch.float32), ("answer_token",))
        exp.scores.update({
            "logprob_answer": float(real.sum()),
            "logprob_answer_blank": float(blank_lp.sum()),
            "logprob_answer_noised": float(noised.sum()),
            "mean_drop_blank": float(drops["blank"].mean()),
            "mean_drop_noised": float(drops["noised"].mean()),
            "reliant_share_blank": float((drops["blank"] > threshold).double().mean()),
            "reliant_share_noised": float((drops["noised"] > threshold).double().mean()),
            "reliant_share": float(reliant.double().mean()),
            "vcd_agreement": float((vcd_choice == ids).double().mean()),
        })
        tokenizer = prep.loaded.processor.tokenizer
        exp.meta.update({
            "conditions": list(CONDITIONS),
            "sign": "drop = log p(answer | real image) - log p(answer | blank or noised image); positive: the image helped",
            "reliant": "a token relies on the image when its largest drop (blank or noised) exceeds the threshold",
            "noise": "VCD: sqrt(a) x + sqrt(1 - a) N(0, 1) on the processed pixel values, a = alpha_bar(noise_step)",
            "alpha_bar": vcd_alpha_bar(step),
            "vcd": "(1 + alpha) logits(real) - alpha logits(noised), restricted to p(real) >= beta * max p(real)",
            "vcd_tokens": tokenizer.convert_ids_to_tokens(vcd_choice.tolist()),
            "model_type": prep.adapter.model_type,
        })
        return exp
