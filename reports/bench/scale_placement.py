"""Sharded and offloaded runs of ``xmllm bench --scale``, projected from the measured rows.

A model whose weights do not fit one GPU (LLaVA-1.5-13B's 24.9 GiB against a 24 GB card) runs
through accelerate's dispatch (:mod:`xmllm.explainers.models.dispatch`) in one of two ways:

- **sharded** over two GPUs: the decoder blocks split in half, the vision tower and embeddings
  with the first half, the LM head with the second. Each GPU holds its weights, its blocks'
  activations (the row's per-block slope) and, counted on both since the fit cannot split it, the
  fixed part (the line's intercept and the vision tower's activations): an upper bound.
- **offloaded** on one GPU: everything but the decoder blocks stays on it, then as many blocks as
  fit in :data:`FILL` of it beside the activations of the *recomputed* run (an offloaded model
  recomputes by itself: a kept backward would hold every offloaded block's weights to its end)
  and one block in transit;
  the other blocks' weights cross the bus once per forward pass. The time that costs is the bytes
  moved per pass at :data:`HOST_TO_DEVICE` bytes a second, times the passes of one explanation
  (copies batched into one pass share its transfer; a recomputed backward is one more pass).

Only the weights' placement is new here: the activations are the measured rows' projections.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

GIB = 1 << 30
HOST_TO_DEVICE = 25e9
"""Bytes a second from pinned host memory to a GPU over PCIe 4.0 x16 (about 25 GB/s of its nominal
32 in practice); an assumption, stated with every time it gives."""
FILL = 0.9
"""The share of a GPU the offloaded placement fills with weights and activations: transformers'
``device_map="auto"`` leaves a tenth of each GPU free for buffers, and so does this."""
SHARDS = 2
PLACED_GPU = 24
"""The GPU size (GiB) the sharded and offloaded runs are placed on."""


@dataclass(frozen=True)
class Weights:
    """One architecture's weights in bfloat16, split into the decoder blocks and the rest."""

    blocks: int
    block_bytes: int
    head_bytes: int
    """The LM head and the final norm (the last shard holds them)."""
    other_bytes: int
    """Everything else: embeddings, vision tower, projector (the first shard, or resident when offloaded)."""

    @property
    def total(self) -> int:
        return self.blocks * self.block_bytes + self.head_bytes + self.other_bytes


def weights_of(config: Any, processor: Any, dtype: torch.dtype = torch.bfloat16) -> Weights:
    """:class:`Weights` of ``config`` (a :class:`~xmllm.bench.scale_configs.ScaleConfig`), counted
    on the meta device: a block is the difference one decoder block makes."""
    from .scale_configs import skeleton

    size = torch.empty((), dtype=dtype).element_size()
    full = skeleton(config, processor)
    total = sum(p.numel() for p in full.parameters())
    fewer = sum(p.numel() for p in skeleton(config, processor, config.decoder_layers - 1).parameters())
    head = full.get_output_embeddings()
    norm = getattr(full.get_decoder(), "norm", None)
    head_params = sum(p.numel() for m in (head, norm) if m is not None for p in m.parameters())
    block = total - fewer
    other = total - config.decoder_layers * block - head_params
    return Weights(config.decoder_layers, block * size, head_params * size, other * size)


def _parts(row: dict[str, Any], full_vision: int, base_vision: int) -> tuple[float, float]:
    """(fixed activation bytes, bytes per decoder block) of a measured row's projection."""
    settled = row["settled"]
    fixed = settled["intercept"] + row["vision_slope_bytes"] * (full_vision - base_vision)
    return max(0.0, fixed), max(0.0, settled["slope"])


def passes(costs: dict[str, Any], batch: int | None) -> float:
    """Forward passes of one explanation: batched copies share a pass, a recomputed backward adds one."""
    return costs.get("forwards", 0.0) / max(1, batch or 1) + costs.get("recomputed_forwards", 0.0)


def sharded(row: dict[str, Any], weights: Weights, full_vision: int, base_vision: int, context: int,
            shards: int = SHARDS, gpu_gib: int = PLACED_GPU) -> dict[str, Any]:
    """Each shard's projected peak (bytes) with the blocks split evenly, the first shard holding the
    vision tower and embeddings and the last the LM head."""
    fixed, per_block = _parts(row, full_vision, base_vision)
    counts = [weights.blocks // shards + (1 if i < weights.blocks % shards else 0) for i in range(shards)]
    peaks = []
    for i, count in enumerate(counts):
        held = count * weights.block_bytes + (weights.other_bytes if i == 0 else 0)
        held += weights.head_bytes if i == shards - 1 else 0
        peaks.append(context + held + fixed + per_block * count)
    return {"shards": shards, "gpu_gib": gpu_gib, "blocks": counts, "peaks": peaks,
            "fits": max(peaks) <= gpu_gib * GIB}


def offloaded(row: dict[str, Any], weights: Weights, full_vision: int, base_vision: int, context: int,
              gpu_gib: int = PLACED_GPU, host_to_device: float = HOST_TO_DEVICE) -> dict[str, Any]:
    """The one-GPU placement of ``row`` (a recomputed run, or one without a backward): resident
    blocks, the peak, and the transfer per pass and per explanation."""
    fixed, per_block = _parts(row, full_vision, base_vision)
    always = context + weights.other_bytes + weights.head_bytes + fixed + per_block * weights.blocks
    room = FILL * gpu_gib * GIB - always - weights.block_bytes  # one offloaded block in transit
    resident = max(0, min(weights.blocks, math.floor(room / weights.block_bytes))) if room >= 0 else 0
    moved = (weights.blocks - resident) * weights.block_bytes
    peak = always + (resident + (1 if moved else 0)) * weights.block_bytes
    n = passes(row["costs"], row.get("batch"))
    return {"gpu_gib": gpu_gib, "resident_blocks": resident, "offloaded_blocks": weights.blocks - resident,
            "peak": peak, "fits": room >= 0, "moved_per_pass": moved, "passes": round(n, 2),
            "transfer_seconds": round(n * moved / host_to_device, 1), "host_to_device": host_to_device}


def place(report: dict[str, Any], weights: dict[str, Weights], context: int,
          recomputed_suffix: str) -> list[dict[str, Any]]:
    """Sharded and offloaded placements of every row of a config whose weights do not fit one
    :data:`PLACED_GPU` GB GPU: sharded from the default run, offloaded from the recomputed run (key +
    ``recomputed_suffix``) where the explainer has one (else the default, which has no backward)."""
    base_vision = report["vision_blocks"][0]
    rows = {(r["config"], r.get("key", r["explainer"])): r for r in report["rows"]}
    out = []
    for name, w in weights.items():
        if w.total + context <= PLACED_GPU * GIB:
            continue
        full_vision = report["models"][name]["vision_layers"]
        for (config, key), row in rows.items():
            if config != name or key.endswith(recomputed_suffix) or row.get("projected_bytes") is None:
                continue
            again = rows.get((name, key + recomputed_suffix))
            lean = again if again is not None and again.get("projected_bytes") is not None else row
            out.append({"config": name, "explainer": key,
                        "sharded": sharded(row, w, full_vision, base_vision, context),
                        "offloaded": {**offloaded(lean, w, full_vision, base_vision, context),
                                      "from": lean.get("key", lean["explainer"])}})
    return out


def render_placed(placed: list[dict[str, Any]]) -> tuple[str, list[str], list[list[str]]]:
    """The placements as a title, a table header and its lines (GiB; seconds of transfer)."""
    first = placed[0]
    title = (f"weights that do not fit one {PLACED_GPU} GB GPU, placed (GiB): sharded over {first['sharded']['shards']} x "
                 f"{PLACED_GPU} GB (largest shard), offloaded on one (blocks resident/offloaded, bus transfer per "
                 f"explanation at {first['offloaded']['host_to_device'] / 1e9:.0f} GB/s):")
    table = []
    for p in placed:
        s, o = p["sharded"], p["offloaded"]
        table.append([p["config"], p["explainer"],
                      f"{max(s['peaks']) / GIB:.1f} {'fits' if s['fits'] else 'no'}",
                      f"{o['peak'] / GIB:.1f} {'fits' if o['fits'] else 'no'}",
                      f"{o['resident_blocks']}/{o['offloaded_blocks']}",
                      f"{o['moved_per_pass'] / GIB:.1f} GiB x {o['passes']:g} = {o['transfer_seconds']:g} s"])
    return title, ["config", "explainer", "sharded", "offloaded", "blocks", "transfer"], table
