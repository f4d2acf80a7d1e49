"""Visual-token importance: the answer's probability as image tokens are dropped, FastV-style.

FastV ranks image tokens by the attention they receive (heads averaged, in the layer before its
pruning layer) and drops the least attended. Here the answer is teacher-forced and its probability
traced as a growing fraction of image tokens is dropped, least attended first and most attended
first (plus a random order as the baseline both should bracket); the area under each curve sums
it up. A redundant visual stream keeps the answer up when the least attended go; a model whose
attention points at what it uses loses it fast when the most attended go.

"Dropping" is real: a forward pre-hook on every decoder attention module (``decoder.blocks.{i}.attn``)
removes the dropped positions from the keys of every query (a token keeps only its own diagonal, so
no softmax row is empty), from ``from_layer`` on. From layer 0 this is exactly the forward of the
sequence with those tokens cut out (other tokens keep their positions), which the tests check; from
FastV's layer K it is its pruning after layer K. Needs the materialised 4-D masks of the eager kernel,
switched on for the forwards and restored after.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from xmllm import MissingInput
from xmllm.explainers.forward import (
    answer_ids,
    batch_size_for,
    logprobs_at,
    repeat_inputs,
)

from ..capture import capture_forward, eager_attention
from ..cross_attention import CROSS_ATTN, attention_blocks, attention_rows, silence_unattended
from xmllm.explainers.prepared import Prepared
from ..explanation import Explanation
from ..hooks import Hooks
from ..models import LoadedModel
from ..models.layout import grid_names
from ..params import ExplainerParams, ParamError, param
from ..registry import Citation, Explainer, Need, register
from ..scaleplan import ScalePlan, costs, trials_for

GROUP = "tokens"
ORDERS: tuple[str, ...] = ("least_attended_first", "most_attended_first", "random")
DEFAULT_STEPS = 10
"""Fractions 0, 0.1, ..., 1 of the image tokens dropped."""
FASTV_RANK_LAYER = 1
"""FastV prunes after layer K = 2, ranking tokens by the attention of the layer before (index 1);
the default ``rank_layer`` (the last block in a one-block decoder)."""
ATTN_POINT = "decoder.blocks.{}.attn"

FASTV = Citation(
    "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large "
    "Vision-Language Models", 2024, "2403.06764", "Chen, Zhao, Lin, Bai, Lin, Zhou, Chang",
)


# --- dropping tokens from attention ------------------------------------------------------------------


def block_keys(mask: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """A 4-D attention mask ``(B or 1, 1, Q, K)`` with the keys ``drop`` ``(B, K)`` marks removed for
    every query but their own (additive masks get the dtype's minimum, boolean ones False)."""
    batch, q_len, k_len = drop.shape[0], mask.shape[-2], mask.shape[-1]
    if drop.shape[-1] != k_len or q_len != k_len:
        raise RuntimeError(f"cannot drop keys from a {tuple(mask.shape)} attention mask (no cache, full sequence expected)")
    drop = drop.to(mask.device)
    own = torch.eye(q_len, dtype=torch.bool, device=mask.device)
    blocked = drop[:, None, None, :] & ~own[None, None]
    mask = mask.expand(batch, *mask.shape[1:])
    if mask.dtype == torch.bool:
        return mask & ~blocked
    return mask.masked_fill(blocked, torch.finfo(mask.dtype).min)


def _four_d(prep: Prepared, mask: Any) -> torch.Tensor:
    if not torch.is_tensor(mask) or mask.dim() != 4:
        raise RuntimeError(f"{prep.adapter.model_type}: decoder attention got no 4-D mask to drop tokens from "
                           f"({type(mask).__name__}); run under eager attention")
    return mask


@contextmanager
def dropped_tokens(prep: Prepared, drop: torch.Tensor, from_layer: int = 0) -> Iterator[None]:
    """Within the block, decoder layers ``from_layer`` on attend to no position ``drop`` marks.

    ``drop`` is ``(batch, positions)`` bool, one row per copy in the batch: the sequence, then a
    cross-attending family's vision tokens (``prep.position_count``), which its cross-attention
    blocks lose as keys (a query left with none gets no cross-attention output: a row with every key
    masked would attend to all alike). Forwards must run with the eager kernel (see
    :func:`eager_attention`), whose masks are 4-D tensors at every layer.
    """
    points = prep.adapter.hook_points()
    count = len(prep.adapter.decoder_layers())
    seq = prep.seq_len
    own, vision = drop[:, :seq], drop[:, seq:]

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return args, {**kwargs, "attention_mask": block_keys(_four_d(prep, kwargs.get("attention_mask")), own)}

    def cross_pre(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        mask = _four_d(prep, kwargs.get("attention_mask"))
        mask = mask.expand(vision.shape[0], *mask.shape[1:])
        blocked = vision.to(mask.device)[:, None, None, :]
        return args, {**kwargs, "attention_mask": mask.masked_fill(blocked, torch.finfo(mask.dtype).min)}

    with Hooks() as hooks:
        for i in range(from_layer, count):
            cross = points.get(CROSS_ATTN.format(i))
            if cross is not None:
                hooks.add(cross.register_forward_pre_hook(cross_pre, with_kwargs=True))
                hooks.add(cross.register_forward_hook(silence_unattended, with_kwargs=True))
            else:
                hooks.add(points[ATTN_POINT.format(i)].register_forward_pre_hook(pre, with_kwargs=True))
        yield


def dropped_logprobs(prep: Prepared, drop_sets: Sequence[torch.Tensor], from_layer: int, batch_size: int) -> torch.Tensor:
    """``(len(drop_sets), T)``: the answer tokens' log-probabilities with each set of positions
    dropped, ``batch_size`` copies per forward, under the eager kernel."""
    ids = answer_ids(prep)
    inputs = dict(prep.inputs)
    rows = []
    with eager_attention(prep.model), torch.inference_mode():
        for start in range(0, len(drop_sets), batch_size):
            chunk = drop_sets[start : start + batch_size]
            drop = torch.zeros(len(chunk), prep.position_count, dtype=torch.bool)
            for row, positions in enumerate(chunk):
                drop[row, positions] = True
            with dropped_tokens(prep, drop, from_layer):
                rows.append(logprobs_at(prep.model, repeat_inputs(inputs, len(chunk)), prep.logit_positions, ids).cpu())
    return torch.cat(rows) if rows else torch.empty(0, ids.numel())


# --- ranking -------------------------------------------------------------------------------------------


def attention_received(prep: Prepared, rank_layer: int) -> torch.Tensor:
    """Per image position (``prep.image_positions`` order): the attention the answer tokens'
    generating rows give it at ``rank_layer``, heads and answer tokens averaged (FastV's score); a
    cross-attention block's where the decoder cross-attends to the image."""
    if prep.adapter.reads_image_through == "cross_attention":
        blocks, rows = attention_rows(prep, VisualTokenImportance.id)
        (index,) = [i for i, (block, kind) in enumerate(blocks) if block == rank_layer and kind == "cross"]
        return rows[index].mean(dim=1).mean(dim=0).index_select(0, prep.image_positions - prep.seq_len).double()
    record = capture_forward(prep, blocks=False)
    rows = record.rows[:, rank_layer].mean(dim=1).mean(dim=0)  # (seq,)
    return rows.index_select(0, prep.image_positions).double()


def drop_orders(scores: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Indices into the image positions, in each order of dropping (ties broken by position)."""
    least = torch.as_tensor(np.lexsort((np.arange(scores.numel()), scores.numpy())), dtype=torch.long)
    most = torch.as_tensor(np.lexsort((np.arange(scores.numel()), -scores.numpy())), dtype=torch.long)
    shuffled = torch.as_tensor(np.random.default_rng(seed).permutation(scores.numel()), dtype=torch.long)
    return {"least_attended_first": least, "most_attended_first": most, "random": shuffled}


def _layer_index(name: str, value: int, count: int) -> int:
    """A decoder block index (negative ones count from the end) checked against the model's depth."""
    index = value + count if value < 0 else value
    if not 0 <= index < count:
        raise ParamError(f"parameter {name}={value!r}: the decoder has blocks 0..{count - 1}")
    return index


# --- the explainer ------------------------------------------------------------------------------------


@register
class VisualTokenImportance(Explainer):
    """The teacher-forced answer's probability as a growing fraction of image tokens is dropped from
    attention (least attended first, most attended first, at random; FastV's attention ranking),
    and the area under each curve.

    Cost: one forward with attention weights to rank, then one forward per distinct dropped set
    (up to 3 x steps - 1: 29 at the defaults), batched under the eager kernel, no backward. FastV, 2024
    (arXiv 2403.06764).
    """

    id = "tokens.visual_importance"
    title = "Visual-token importance: answer probability as image tokens are dropped (FastV-style)"
    group = GROUP
    needs = frozenset({Need.ATTENTION})
    citations = (FASTV,)
    summary = (
        "Rank image tokens by the attention they receive (FastV), then drop a growing fraction of them "
        "from attention, least attended first, most attended first and at random, and trace the "
        "teacher-forced answer's probability: curves over the fraction dropped and the area under each."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        steps: int = param(DEFAULT_STEPS, "fractions of the image tokens dropped: 0, 1/steps, ..., 1", low=1)
        rank_layer: int | None = param(None, "decoder block whose attention ranks the image tokens, negative from the "
                                             "end (null: FastV's block 1, or the last block of a shallower decoder)")
        from_layer: int = param(0, "first decoder block the dropped tokens are removed from (negative from the end)")
        seed: int = param(0, "seed of the random dropping order")
        batch_size: int | None = param(None, "dropped copies per forward (null: as many as the device's budget fits)",
                                       low=1)

    cross_attention_ready = True  # the vision tokens are dropped from the cross-attention's keys

    @staticmethod
    def _rank_layer(prep: Prepared, value: int | None, count: int) -> int:
        """The block whose attention ranks: FastV's block 1 (or the last of a shallower decoder); where
        the decoder cross-attends to the image, a cross-attention block (by default the first)."""
        crossing = [block for block, kind, _, _ in attention_blocks(prep) if kind == "cross"]
        if not crossing:
            return _layer_index("rank_layer", min(FASTV_RANK_LAYER, count - 1) if value is None else value, count)
        if value is None:
            return crossing[0]
        index = _layer_index("rank_layer", value, count)
        if index not in crossing:
            raise ParamError(f"parameter rank_layer={value!r}: {prep.adapter.model_type} reads the image in its "
                             f"cross-attention blocks {crossing}, which rank the image tokens")
        return index

    @classmethod
    def scale_plan(cls, prep: Prepared, full_layers: int) -> ScalePlan:
        """Fewer steps than the defaults, never fewer dropped sets than a batch: every set is one row of
        a batched eager forward, so the peak is one forward's; the cost counts the default steps."""
        copies = batch_size_for(prep, None, eager=True)
        sets = 3 * (DEFAULT_STEPS + 1) - 4  # three orders; none and all dropped are shared
        copies = min(copies, sets)
        return ScalePlan({}, f"fewer steps than {DEFAULT_STEPS} (the peak is one forward's: {copies} copies)",
                         copies, trials_for(copies),
                         lambda p, b: {"steps": min(DEFAULT_STEPS, max(2, math.ceil((b + 4) / 3))), "batch_size": b},
                         cost=costs(1 + sets))

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        steps, seed = params.steps, params.seed
        prep = sample
        count = len(prep.adapter.decoder_layers())
        rank_layer = self._rank_layer(prep, params.rank_layer, count)
        from_layer = _layer_index("from_layer", params.from_layer, count)
        batch_size = batch_size_for(prep, params.batch_size, eager=True)  # dropped tokens need the eager kernel
        image = prep.image_positions
        if image.numel() == 0:
            raise MissingInput(f"sample {prep.sample.id!r} has no image tokens to drop")

        scores = attention_received(prep, rank_layer)
        orders = drop_orders(scores, seed)
        fractions = np.linspace(0.0, 1.0, steps + 1)
        counts = [int(round(f * image.numel())) for f in fractions]
        unique: dict[tuple[int, ...], int] = {}
        plan: list[list[int]] = []
        for name in ORDERS:
            row = []
            for k in counts:
                key = tuple(sorted(image[orders[name][:k]].tolist()))
                row.append(unique.setdefault(key, len(unique)))
            plan.append(row)
        sets = [torch.as_tensor(key, dtype=torch.long) for key in unique]
        logp = dropped_logprobs(prep, sets, from_layer, batch_size).double()  # (sets, T)
        table = torch.stack([logp[row] for row in map(torch.as_tensor, plan)])  # (orders, fractions, T)
        probs = table.sum(-1).exp()

        exp = Explanation(
            self.id,
            {**params.as_dict(), "rank_layer": rank_layer, "from_layer": from_layer, "batch_size": batch_size},
            prep.target(),
        )
        exp.add("curve", probs, ("order", "fraction"))
        exp.add("curve.logprob", table.permute(2, 0, 1), ("answer_token", "order", "fraction"))
        exp.add("fractions", fractions, ("fraction",))
        exp.add("dropped", np.asarray(counts, dtype=np.int64), ("fraction",))
        rank = torch.empty(image.numel(), dtype=torch.float64)
        rank[orders["least_attended_first"]] = torch.arange(image.numel(), dtype=torch.float64)
        index_of = torch.full((prep.position_count,), -1, dtype=torch.long)
        index_of[image] = torch.arange(image.numel())
        for name, grid in grid_names(prep.layouts):
            where = index_of[grid.positions]
            exp.add(f"{name}.attention", scores[where].reshape(grid.rows, grid.cols), ("row", "col"))
            exp.add(f"{name}.drop_rank", rank[where].reshape(grid.rows, grid.cols), ("row", "col"))
        for i, name in enumerate(ORDERS):
            exp.scores[f"auc_{name}"] = float(np.trapezoid(probs[i].numpy(), fractions))
        exp.scores.update({
            "prob_full": float(probs[0, 0]),
            "prob_none": float(probs[0, -1]),
            "image_tokens": float(image.numel()),
            "forwards": float(1 + -(-len(sets) // batch_size)),
        })
        exp.meta.update({
            "orders": list(ORDERS),
            "fractions": fractions.tolist(),
            "dropped_counts": counts,
            "ranking": (f"attention received at decoder block {rank_layer} from the answer tokens' generating rows, "
                        "heads and answer tokens averaged"
                        + (" (its cross-attention)" if prep.adapter.reads_image_through == "cross_attention" else "")),
            "dropping": (f"removed from the keys of every query (own diagonal kept) in decoder blocks {from_layer}.."
                         f"{count - 1}, positions of the other tokens unchanged"),
            "image_positions": "every image-feature token of every image (grids and extra tokens)",
            "curve": "probability of the whole teacher-forced answer (product over its tokens)",
            "model_type": prep.adapter.model_type,
        })
        return exp
