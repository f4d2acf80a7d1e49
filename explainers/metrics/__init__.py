"""Faithfulness and localisation metrics for explanations, registered by name (Quantus-style).

``registered_metrics()`` lists them with their metadata; ``MetricInputs`` carries one sample's
ground truth and model; ``faithfulness_of`` gives one map's deletion and insertion areas on its
own sample (what every report shows); :mod:`.sanity` runs the model-randomisation check.
"""
from __future__ import annotations

from .base import IMAGE_MAP, Metric, get_metric, register_metric, registered_metrics
from xmllm.explainers.metrics.inputs import MetricInputs
from .curves import DEFAULT_BASELINE, DEFAULT_STEPS, CurveRunner, area_under
from .faithfulness import faithfulness_many, faithfulness_of, unmaskable
from .localisation import pointing_game, relevance_mass, relevance_rank
from .maps import RANDOM, MetricError, ScoredMap, primary_image_map, random_map
from .truth import MIN_COVER, CellTruth, cell_truth

__all__ = [
    "IMAGE_MAP", "Metric", "MetricError", "get_metric", "register_metric", "registered_metrics", "MetricInputs",
    "DEFAULT_BASELINE", "DEFAULT_STEPS", "CurveRunner", "area_under", "faithfulness_many", "faithfulness_of", "unmaskable",
    "pointing_game", "relevance_mass", "relevance_rank", "RANDOM", "ScoredMap", "primary_image_map", "random_map",
    "MIN_COVER", "CellTruth", "cell_truth",
]
