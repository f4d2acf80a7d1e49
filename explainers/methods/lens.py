"""Logit lens: what the model would say if it stopped after each decoder block.

The residual stream after block ``l`` is read out through the model's own final norm and LM
head (``adapter.unembed``, which also applies a family's logit cap), exactly as the forward
reads the last block: at the last layer the lens *is* the model's output. Read at the answer
tokens' logit positions it shows at which depth the answer forms (its probability and rank per
layer); read at the image tokens' positions it shows which words each patch's state is closest
to as it climbs the decoder (Neo et al.: object words surface at the object's patches).

The helpers here (:func:`pick_layers`, :func:`residual_states`, :func:`lens_logprobs`,
:func:`entropy`) are shared with :mod:`xmllm.explainers.methods.inference` (per-layer entropy).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..context import Prepared
from ..explanation import Explanation
from ..hooks import Hooks
from ..memory import accepts_logits_to_keep
from ..models import LoadedModel
from ..params import ExplainerParams, param
from ..registry import Citation, Explainer, register
from ..models.layout import grid_names

FAMILY = "lens"
DEFAULT_TOP_K = 5
"""Vocabulary tokens kept per patch and layer: enough to see a word surface, small in JSON."""
BLOCK_POINT = "decoder.blocks.{}"
READOUT = "final norm + LM head (+ the family's logit cap) on the residual stream after each decoder block"

LOGIT_LENS = Citation("interpreting GPT: the logit lens", 2020, None, "nostalgebraist")
NEO_ET_AL = Citation(
    "Towards Interpreting Visual Information Processing in Vision-Language Models", 2024, "2410.07149",
    "Neo, Ong, Torr, Geva, Krueger, Barez",
)


# --- shared with inference.uncertainty ---------------------------------------------------------------


def pick_layers(layers: Any, count: int, owner: str | None = None) -> list[int]:
    """Decoder block indices (negative ones count from the end), or all when None; checked against
    the model's depth (a declared ``tuple[int, ...]`` parameter is already a list of integers; a raw
    value from a caller that did not declare it is checked here too). ``owner`` (an explainer id)
    prefixes the error."""
    prefix = f"{owner}: " if owner else ""
    if layers is None:
        return list(range(count))
    if isinstance(layers, (int, str, bool)) or not all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in layers
    ):
        raise ValueError(f"{prefix}parameter layers={layers!r} must be a list of decoder block indices or None")
    picked = [int(i) + count if i < 0 else int(i) for i in layers]
    if not picked or any(not 0 <= i < count for i in picked):
        raise ValueError(f"{prefix}parameter layers={list(layers)!r}: the decoder has blocks 0..{count - 1}")
    return picked


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.inference_mode()
def residual_states(prep: Prepared, positions: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One teacher-forced forward of the final sequence.

    Returns the residual stream after each block in ``layers`` at ``positions``,
    ``(len(layers), P, hidden)`` in the model's dtype and device, and the model's own logits at
    those positions ``(P, vocab)`` in float32. Only the picked rows are kept per block.
    """
    points = prep.adapter.hook_points()
    pos = positions.to(prep.loaded.device)
    kept: dict[int, torch.Tensor] = {}

    def keep(index: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            kept[index] = _block_output(output)[0].index_select(0, pos).detach()

        return hook

    rows_only = accepts_logits_to_keep(prep.model)  # logits of the kept rows only, not (seq x vocabulary)
    with Hooks() as hooks:
        for i in layers:
            hooks.add(points[BLOCK_POINT.format(i)].register_forward_hook(keep(i)))
        out = prep.forward(use_cache=False, **({"logits_to_keep": pos} if rows_only else {}))
    missing = [i for i in layers if i not in kept]
    if missing:
        raise RuntimeError(f"decoder blocks {missing} did not run in the forward")
    logits = (out.logits[0] if rows_only else out.logits[0].index_select(0, pos)).float()
    return torch.stack([kept[i] for i in layers]), logits


@torch.inference_mode()
def lens_logprobs(prep: Prepared, states: torch.Tensor) -> Iterator[torch.Tensor]:
    """Per layer of ``states`` ``(L, P, hidden)``: the lens's log-probabilities ``(P, vocab)``.

    One layer at a time, so only one ``P x vocab`` block is alive whatever the depth.
    """
    for layer_states in states:
        yield torch.log_softmax(prep.adapter.unembed(layer_states).float(), dim=-1)


def lens_rows(prep: Prepared, rows: int) -> int:
    """Rows read out at once: as many (rows x vocabulary) blocks as the memory budget fits, at most ``rows``."""
    from ..memory import ModelShape, copies_within

    shape = ModelShape.of(prep.loaded)
    per_row = shape.vocab * (shape.dtype_bytes + 4 + 4)  # LM head output, its float32 copy, log-softmax
    return copies_within(per_row, prep.loaded.device, most=max(1, rows))


@torch.inference_mode()
def lens_summaries(prep: Prepared, states: torch.Tensor, token_ids: torch.Tensor,
                   k: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer of ``states`` ``(L, P, hidden)``, what the logit lens keeps of its log-probabilities,
    on the CPU: the top ``k`` values and ids ``(P, k)``, every row's log-probability of each answer
    token ``(P, T)``, and the rank of answer token t in row t for the first T rows ``(T,)``.

    Rows are read out in chunks that fit the memory budget (:func:`lens_rows`), so no
    ``P x vocabulary`` block is ever whole, however long the sequence or large the vocabulary."""
    total, answers = int(states.shape[1]), int(token_ids.numel())
    step = lens_rows(prep, total)
    for layer_states in states:
        values, top, at_answer, ranks = [], [], [], []
        for start in range(0, total, step):
            logp = torch.log_softmax(prep.adapter.unembed(layer_states[start : start + step]).float(), dim=-1)
            chunk_values, chunk_top = logp.topk(k, dim=-1)
            values.append(chunk_values.cpu())
            top.append(chunk_top.cpu())
            at_answer.append(logp[:, token_ids.to(logp.device)].cpu())
            if start < answers:
                ids = token_ids[start : min(answers, start + step)]
                ranks.append(ranks_of(logp[: ids.numel()], ids).cpu())
            del logp
        yield torch.cat(values), torch.cat(top), torch.cat(at_answer), torch.cat(ranks)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats over the last axis of log-probabilities (0 log 0 counts as 0)."""
    probs = logprobs.exp()
    return -torch.where(probs > 0, probs * logprobs, torch.zeros_like(probs)).sum(-1)


def ranks_of(logprobs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """How many vocabulary entries score strictly higher than ``token_ids[i]`` in row i (0 = top)."""
    chosen = logprobs.gather(-1, token_ids[:, None].to(logprobs.device))
    return (logprobs > chosen).sum(-1)


def settle_layer(ranks: np.ndarray, layers: Sequence[int]) -> int | None:
    """The first picked layer from which the token stays the lens's top prediction, or None."""
    settled = None
    for rank, layer in zip(ranks[::-1], list(layers)[::-1]):
        if rank != 0:
            break
        settled = layer
    return settled


# --- the explainer -------------------------------------------------------------------------------------


@register
class LogitLens(Explainer):
    id = "lens.logit"
    title = "Logit lens over layers at the answer and image-token positions"
    family = FAMILY
    citations = (LOGIT_LENS, NEO_ET_AL)
    summary = (
        "The residual stream after every decoder block, read out through the model's final norm and "
        "LM head: each answer token's probability and rank per layer (where the answer forms), and the "
        "top vocabulary tokens at every image patch per layer (what the patches come to mean)."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        layers: tuple[int, ...] | None = param(None, "decoder blocks to read, negative from the end (null: all)")
        top_k: int = param(DEFAULT_TOP_K, "vocabulary tokens kept per answer token, patch and layer", low=1)

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        top_k = params.top_k
        prep = sample
        picked = pick_layers(params.layers, len(prep.adapter.decoder_layers()), self.id)
        grids = grid_names(prep.layouts)
        answer_rows = prep.logit_positions
        positions = torch.cat([answer_rows, *[grid.positions for _, grid in grids]])
        states, logits = residual_states(prep, positions, picked)
        ids = torch.as_tensor(prep.answer.token_ids, dtype=torch.long)
        T, L = ids.numel(), len(picked)
        k = min(top_k, int(logits.shape[-1]))
        del logits  # only its width is needed: (rows x vocabulary) floats need not stay alive

        answer_prob = torch.empty(T, L, dtype=torch.float64)
        answer_rank = np.empty((T, L), dtype=np.int64)
        answer_top = torch.empty(T, L, k, dtype=torch.long)
        answer_top_prob = torch.empty(T, L, k, dtype=torch.float64)
        cells = {name: torch.empty(L, grid.size, k, dtype=torch.long) for name, grid in grids}
        cell_top_prob = {name: torch.empty(L, grid.size, dtype=torch.float64) for name, grid in grids}
        cell_answer_prob = {name: torch.empty(T, L, grid.size, dtype=torch.float64) for name, grid in grids}

        for li, (values, top, at_answer, ranks) in enumerate(lens_summaries(prep, states, ids, k)):
            answer_prob[:, li] = at_answer[torch.arange(T), torch.arange(T)].double().exp()
            answer_rank[:, li] = ranks.numpy()
            answer_top[:, li], answer_top_prob[:, li] = top[:T], values[:T].double().exp()
            start = T
            for name, grid in grids:
                block = slice(start, start + grid.size)
                start += grid.size
                cells[name][li] = top[block]
                cell_top_prob[name][li] = values[block, 0].double().exp()
                cell_answer_prob[name][:, li] = at_answer[block].T.double().exp()

        tokenizer = prep.loaded.processor.tokenizer
        exp = Explanation(self.id, {"layers": picked, "top_k": k}, prep.target())
        exp.add("answer.prob", answer_prob, ("answer_token", "layer"))
        exp.add("answer.rank", answer_rank, ("answer_token", "layer"))
        exp.add("answer.top_prob", answer_top_prob[..., 0], ("answer_token", "layer"))
        image_top_k: dict[str, Any] = {}
        for name, grid in grids:
            shape = (L, grid.rows, grid.cols)
            exp.add(f"{name}.top_prob", cell_top_prob[name].reshape(shape), ("layer", "row", "col"))
            exp.add(f"{name}.answer_prob", cell_answer_prob[name].reshape(T, *shape),
                    ("answer_token", "layer", "row", "col"))
            top_ids = cells[name].reshape(*shape, k)
            image_top_k[name] = {"ids": top_ids.tolist(), "tokens": _token_strings(tokenizer, top_ids)}
        settles = [settle_layer(answer_rank[t], picked) for t in range(T)]
        settled = [s for s in settles if s is not None]
        exp.scores.update({
            "answer_prob_last_layer": float(answer_prob[:, -1].log().sum().exp()),
            "settled_share": len(settled) / T,
        })
        if settled:
            exp.scores["settle_layer_mean"] = float(np.mean(settled))
        exp.meta.update({
            "layers": picked,
            "readout": READOUT,
            "rank": "vocabulary entries scoring strictly higher than the answer token (0 = the lens's top choice)",
            "settle_layer": settles,
            "answer_top_k": {
                "ids": answer_top.tolist(),
                "tokens": _token_strings(tokenizer, answer_top),
                "probs": answer_top_prob.tolist(),
            },
            "image_top_k": image_top_k,
            "image_top_k_axes": ["layer", "row", "col", "k"],
            "answer_top_k_axes": ["answer_token", "layer", "k"],
            "model_type": prep.adapter.model_type,
        })
        return exp


def _token_strings(tokenizer: Any, ids: torch.Tensor) -> Any:
    """``ids`` of any shape as nested lists of token strings (one vocabulary look-up per distinct id)."""
    flat = ids.flatten().tolist()
    distinct = sorted(set(flat))
    table = dict(zip(distinct, tokenizer.convert_ids_to_tokens(distinct)))
    strings = np.array([str(table[i]) for i in flat], dtype=object).reshape(tuple(ids.shape))
    return strings.tolist()
