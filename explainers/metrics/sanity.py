"""The model-parameter randomisation check (Adebayo et al., 2018): a map that survives the
randomisation of the weights it claims to explain explains nothing about them.

The cascade re-initialises decoder blocks from the top down, cumulatively (the top block, then
the top two, ... then all of them), and finally the vision tower as well. At every stage each
explainer explains the *original* answer on the same prepared samples (the target stays fixed,
as in the paper) and its scored map is compared with the map of the intact model by Spearman's
rank correlation. An explainer whose maps keep a mean correlation of at least
:data:`SURVIVAL_THRESHOLD` after the last stage (every decoder block and the vision tower
random) is flagged: its maps follow the input, not the model.

Randomised weights are drawn per parameter from a generator seeded by the check's seed and the
parameter's name, so a block gets the same random weights in every stage that includes it.
Matrices (2-D and up) get Gaussian values of the original tensor's mean and standard deviation;
vectors (norm scales, biases) a random permutation of their own values, which keeps activations
on the scale the rest of the network expects. Token embeddings, projector and LM head are kept.
Every parameter is restored on exit, whatever happens.
"""
from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .maps import primary_image_map
from .stats import mean_interval, spearman

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import Prepared
    from ..models import LoadedModel

SURVIVAL_THRESHOLD = 0.5
"""Mean Spearman correlation with the intact model's maps, after the last stage, at or above
which an explainer is flagged. Adebayo et al. read their cascades by eye; 0.5 means the
randomised model's maps still order the cells much as the trained model's did."""
MAX_DECODER_STAGES = 8
"""Decoder stages at most: deeper decoders are randomised a group of blocks per stage."""
FALLBACK_STD = 0.02
"""Standard deviation for a matrix whose values are all equal (e.g. zero-initialised)."""
VISION_STAGE = "vision tower"
ADEBAYO = "Sanity Checks for Saliency Maps (Adebayo et al., 2018, arXiv 1810.03292)"


@dataclass(frozen=True)
class Stage:
    """One step of the cascade: its label and every module random at that step (cumulative)."""

    name: str
    modules: tuple[torch.nn.Module, ...]


def cascade(loaded: "LoadedModel", max_decoder_stages: int = MAX_DECODER_STAGES) -> list[Stage]:
    """Decoder blocks from the top down (grouped when there are many), then the vision tower."""
    adapter = loaded.adapter
    blocks = list(adapter.decoder_layers())
    count = len(blocks)
    group = max(1, -(-count // max_decoder_stages))
    stages: list[Stage] = []
    chosen: list[torch.nn.Module] = []
    for top in range(count, 0, -group):
        bottom = max(0, top - group)
        chosen.extend(reversed(blocks[bottom:top]))
        label = f"decoder {bottom}-{count - 1}" if bottom < count - 1 else f"decoder {count - 1}"
        stages.append(Stage(label, tuple(chosen)))
    stages.append(Stage(f"{VISION_STAGE} + all decoder", (*chosen, adapter.vision_tower)))
    return stages


def _random_like(param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    data = param.detach().float().cpu()
    if data.dim() >= 2:
        std = float(data.std()) or FALLBACK_STD
        new = torch.randn(data.shape, generator=generator) * std + float(data.mean())
    else:
        new = data.flatten()[torch.randperm(data.numel(), generator=generator)].reshape(data.shape)
    return new.to(device=param.device, dtype=param.dtype)


@contextlib.contextmanager
def randomised(model: torch.nn.Module, modules: Sequence[torch.nn.Module], seed: int = 0) -> Iterator[None]:
    """Re-initialise every parameter of ``modules`` (see the module docstring); restore on exit."""
    names = {id(p): n for n, p in model.named_parameters()}
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    seen: set[int] = set()
    try:
        with torch.no_grad():
            for module in modules:
                for param in module.parameters():
                    if id(param) in seen:
                        continue
                    seen.add(id(param))
                    name = names.get(id(param), str(len(seen)))
                    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
                    saved.append((param, param.detach().clone()))
                    param.copy_(_random_like(param, generator))
        yield
    finally:
        with torch.no_grad():
            for param, original in saved:
                param.copy_(original)


def explainer_map(loaded: "LoadedModel", prepared: "Prepared", explainer_id: str,
                  params: Mapping[str, Any] | None = None) -> np.ndarray | None:
    """The scored map of one explainer on one prepared sample (None: it gives no image map)."""
    from ..registry import get_explainer

    exp = get_explainer(explainer_id)().explain(loaded, prepared, **dict(params or {}))
    scored = primary_image_map(exp)
    return None if scored is None else scored.values


MapFunction = Callable[["LoadedModel", "Prepared", str, "Mapping[str, Any] | None"], "np.ndarray | None"]
"""``(loaded, prepared, explainer_id, params) -> (rows, cols) map or None``."""


def randomisation_check(loaded: "LoadedModel", prepared: Sequence["Prepared"], explainer_ids: Sequence[str],
                        params: Mapping[str, Mapping[str, Any]] | None = None,
                        originals: Mapping[str, Sequence[np.ndarray | None]] | None = None, seed: int = 0,
                        threshold: float = SURVIVAL_THRESHOLD,
                        progress: Callable[[str], None] | None = None,
                        map_of: MapFunction | None = None) -> dict[str, Any]:
    """Run the cascade on ``prepared`` samples; per explainer and stage the correlations with the
    intact model's maps (``originals``, computed when not given), and whether the maps survive.

    ``progress`` is called with the stage name after each (stage, sample); ``map_of`` makes an
    explainer's map (default :func:`explainer_map`: the registered explainer's scored map)."""
    if any(p.device.type == "meta" for p in loaded.model.parameters()):
        from xmllm import XmllmError

        raise XmllmError("model randomisation check: the model is offloaded (a device map): its weights are "
                         "reloaded at every forward and cannot be randomised in place; run it on a plain load")
    params = params or {}
    explainer_map_of = map_of or explainer_map
    ids = list(explainer_ids)
    if originals is None:
        originals = {eid: [explainer_map_of(loaded, p, eid, params.get(eid)) for p in prepared] for eid in ids}
    stages = cascade(loaded)
    values: dict[str, list[list[float]]] = {eid: [] for eid in ids}
    failures: dict[str, str] = {}
    for stage in stages:
        per_stage: dict[str, list[float]] = {eid: [] for eid in ids}
        with randomised(loaded.model, stage.modules, seed):
            for index, prep in enumerate(prepared):
                for eid in ids:
                    before = originals[eid][index]
                    if before is None:
                        continue
                    try:
                        after = explainer_map_of(loaded, prep, eid, params.get(eid))
                    except (ValueError, RuntimeError) as error:
                        failures.setdefault(eid, f"{stage.name}: {str(error).splitlines()[0]}")
                        continue
                    if after is not None:
                        per_stage[eid].append(spearman(before, after))
                if progress:
                    progress(stage.name)
        for eid in ids:
            values[eid].append(per_stage[eid])
    report: dict[str, Any] = {
        "stages": [s.name for s in stages],
        "threshold": threshold,
        "samples": len(prepared),
        "seed": seed,
        "statistic": "Spearman rank correlation with the intact model's map, per sample",
        "reference": ADEBAYO,
        "explainers": {},
    }
    for eid in ids:
        rows = [{"stage": s.name, **mean_interval(v, seed), "values": [round(x, 6) for x in v]}
                for s, v in zip(stages, values[eid])]
        final = rows[-1]["mean"] if rows else None
        report["explainers"][eid] = {
            "stages": rows,
            "final": final,
            "survives": bool(final is not None and final >= threshold),
            **({"error": failures[eid]} if eid in failures else {}),
        }
    return report
