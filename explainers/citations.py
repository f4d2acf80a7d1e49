"""Papers that several explainer modules cite, written once (explainer modules do not import
each other, so a citation two of them share lives here)."""
from __future__ import annotations

from .registry import Citation

ZEILER_FERGUS = Citation(
    "Visualizing and Understanding Convolutional Networks", 2013, "1311.2901", "Zeiler, Fergus"
)
"""Occlusion: perturbation.occlusion implements it, causal.minimal_set masks cells the same way."""

MMVP = Citation(
    "Eyes Wide Shut? Exploring the Visual Shortcomings of Multimodal LLMs", 2024, "2401.06209",
    "Tong, Liu, Zhai, Ma, LeCun, Xie",
)
"""MMVP pairs: data.counterfactual edits them, embedding explainers probe what CLIP features miss."""

ALAIN_BENGIO = Citation("Understanding intermediate layers using linear classifier probes", 2016, "1610.01644",
                        "Alain, Bengio")
"""Linear probes: embedding.probe and design's concept bottleneck both fit them."""
LVLM_INTERPRET = Citation(
    "LVLM-Interpret: An Interpretability Tool for Large Vision-Language Models", 2024, "2404.03118",
    "Ben Melech Stan, Aflalo, Yehezkel Rohekar, et al.",
)
