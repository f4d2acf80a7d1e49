"""Logit lens: what the model would say if it stopped after each decoder block.

The residual stream after block ``l`` is read out through the model's own final norm and LM
head (``adapter.unembed``, which also applies a family's logit cap), exactly as the forward
reads the last block: at the last layer the lens *is* the model's output. Read at the answer
tokens' logit positions it shows at which depth the answer forms (its probability and rank per
layer); read at the image tokens' positions it shows which words each patch's state is closest
to as it climbs the decoder (Neo et al.: object words surface at the object's patches).

The read-out itself (:func:`~xmllm.explainers.readout.pick_layers`,
:func:`~xmllm.explainers.readout.residual_states`) lives in :mod:`xmllm.explainers.readout`, which
the per-layer entropy of ``inference.uncertainty`` reads through as well.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from xmllm.explainers.prepared import Prepared
from ..explanation import Explanation
from ..models import LoadedModel
from ..models.layout import grid_names
from ..params import ExplainerParams, param
from ..readout import LOGIT_LENS, READOUT, pick_layers, residual_states
from ..registry import Citation, Explainer, register

GROUP = "lens"
DEFAULT_TOP_K = 5
"""Vocabulary tokens kept per patch and layer: enough to see a word surface, small in JSON."""
NEO_ET_AL = Citation(
    "Towards Interpreting Visual Information Processing in Vision-Language Models", 2024, "2410.07149",
    "Neo, Ong, Torr, Geva, Krueger, Barez",
)


# --- reading out in chunks ------------------------------------------------------------------------


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
    """The residual stream after every decoder block read out through the model's final norm and LM
    head: each answer token's probability and rank per layer (where the answer forms), and the top
    vocabulary tokens at every image patch per layer (what the patches come to mean; not where the
    decoder cross-attends to the image, Mllama, whose residual stream holds no patch).

    Cost: one teacher-forced forward, then one LM-head read-out per layer of the answer and image
    rows (in chunks the memory budget fits), no backward. The logit lens (nostalgebraist, 2020);
    Neo et al., 2024 (arXiv 2410.07149).
    """

    id = "lens.logit"
    title = "Logit lens over layers at the answer and image-token positions"
    group = GROUP
    cross_attention_ready = True  # where the image is cross-attended, it reads the answer rows only
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
        # where the decoder cross-attends to the image, no residual-stream row belongs to a patch
        in_sequence = prep.adapter.reads_image_through == "sequence"
        grids = grid_names(prep.layouts) if in_sequence else []
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
        if not in_sequence:
            exp.meta["image_rows"] = ("none: the decoder reads the image through cross-attention, so no position of "
                                      "its residual stream holds an image patch")
        return exp


def _token_strings(tokenizer: Any, ids: torch.Tensor) -> Any:
    """``ids`` of any shape as nested lists of token strings (one vocabulary look-up per distinct id)."""
    flat = ids.flatten().tolist()
    distinct = sorted(set(flat))
    table = dict(zip(distinct, tokenizer.convert_ids_to_tokens(distinct)))
    strings = np.array([str(table[i]) for i in flat], dtype=object).reshape(tuple(ids.shape))
    return strings.tolist()
