"""The explainer ids the project commits to, before and after each is implemented.

The catalog may only name ids from this list or ids that are registered; an id that
is listed but not yet registered shows as ``planned``.
"""
from __future__ import annotations

KNOWN_EXPLAINER_IDS: tuple[str, ...] = (
    "attention.raw",
    "attention.summary",
    "attention.rollout",
    "relevancy.chefer",
    "relevancy.modality",
    "gradient.saliency",
    "gradient.input_x_gradient",
    "gradient.integrated",
    "gradient.gradcam",
    "perturbation.occlusion",
    "perturbation.text_ablation",
    "causal.minimal_set",
    "lens.logit",
    "intervention.attention_knockout",
    "intervention.activation_patching",
    "neurons.top_activations",
    "neurons.modality_specific",
    "embedding.probe",
    "embedding.projection",
    "tokens.visual_importance",
    "inference.visual_reliance",
    "inference.uncertainty",
    "benchmark.pope",
    "data.counterfactual",
    "training.compare",
    "design.concept_bottleneck",
)
