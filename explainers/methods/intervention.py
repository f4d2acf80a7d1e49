"""Interventions inside the decoder: attention knockout over windows of layers, and activation
patching (causal tracing) between a sample and a corrupted copy of it.

Both act at the adapter's named hook points (``decoder.blocks.{i}``, ``.attn``, ``.mlp``) with
forward hooks, never with forked model code, so one implementation serves every family and both
attention kernels (eager and sdpa). Every number is the answer's probability on the final
sequence (prompt + answer, teacher-forced) from a real forward; many intervened copies share one
batched forward.

Position sets name the parts of the sequence the interventions address:

* ``image``: the image-feature tokens of every image (the adapters' layouts);
* ``question``: the question's own tokens (not the chat template);
* ``answer``: the positions whose logits give the answer tokens (the last prompt token and every
  answer token but the last), where the answer is read;
* ``text``: every prompt text token (template and question);
* ``all``: every position.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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
from xmllm.explainers.masking import question_positions

from ..answering import generate_answer
from ..axes import axis_labels
from ..capture import EAGER, attn_implementations
from xmllm.explainers.prepared import ExplainSample, Prepared, prepare
from ..demo.groundtruth import demo_pair, demo_sample_from
from ..explanation import Explanation
from ..cross_attention import CROSS_ATTN, silence_unattended
from ..hooks import Hooks
from ..models import LoadedModel
from ..params import ExplainerParams, ParamError, param
from ..registry import Citation, Explainer, Need, register
from ..scaleplan import ScalePlan, costs, trials_for, with_batch_size

GROUP = "intervention"

GEVA = Citation(
    "Dissecting Recall of Factual Associations in Auto-Regressive Language Models", 2023, "2304.14767",
    "Geva, Bastings, Filippova, Globerson",
)
ZHANG_FLOW = Citation(
    "Cross-modal Information Flow in Multimodal Large Language Models", 2024, "2411.18620",
    "Zhang, Yadav, Han, Shutova",
)
MENG = Citation("Locating and Editing Factual Associations in GPT", 2022, "2202.05262",
                "Meng, Bau, Andonian, Belinkov")
BASU = Citation(
    "Understanding Information Storage and Transfer in Multi-modal Large Language Models", 2024, "2406.04236",
    "Basu, Grayson, Morrison, Nushi, Feizi, Massiceti",
)
ZHANG_NANDA = Citation("Towards Best Practices of Activation Patching in Language Models: Metrics and Methods",
                       2023, "2309.16042", "Zhang, Nanda")

KERNELS: tuple[str, ...] = (EAGER, "sdpa")
"""Attention kernels whose masks a knockout can edit: a 4-D float (eager) or boolean (sdpa) mask."""
LAYER_POINT = "decoder.blocks.{}"
COMPONENT_POINTS: dict[str, str] = {
    "residual": LAYER_POINT,
    "attn": LAYER_POINT + ".attn",
    "mlp": LAYER_POINT + ".mlp",
}
"""What activation patching restores, by name: the residual stream after block i, or the output
of block i's self-attention or MLP (before it is added to the residual stream)."""
NOISE_SCALE = 3.0
"""Meng et al.'s corruption: Gaussian noise of 3x the standard deviation of the embeddings."""
DEFAULT_EDGES: tuple[str, ...] = ("image->answer", "image->question", "question->answer", "question->image")
"""Flows blocked by default (source -> destination: destination queries lose the source keys).
Which exist depends on the prompt order: with the question before the image (the demo's
template) image->question has nothing to block, with the image first question->image has not."""
DEFAULT_GROUPS: tuple[str, ...] = ("image", "question", "answer")


# --- position sets -----------------------------------------------------------------------------------


def _arange(prep: Prepared) -> torch.Tensor:
    return torch.arange(prep.seq_len, dtype=torch.long)


POSITION_SETS: dict[str, Callable[[Prepared], torch.Tensor]] = {
    "image": lambda prep: prep.image_positions,
    "question": lambda prep: torch.as_tensor(question_positions(prep), dtype=torch.long),
    "answer": lambda prep: prep.logit_positions,
    "text": lambda prep: prep.text_positions,
    "all": _arange,
}


def positions_of(prep: Prepared, name: str) -> torch.Tensor:
    """The sorted sequence positions of the named set (CPU LongTensor)."""
    if name not in POSITION_SETS:
        raise ValueError(f"position set {name!r} must be one of {', '.join(POSITION_SETS)}")
    return torch.unique(POSITION_SETS[name](prep).long().cpu())


def _names(name: str, value: tuple[str, ...] | None, default: Sequence[str]) -> list[str]:
    """A declared list of names (``default`` when None), checked to be non-empty and without repeats."""
    names = list(default) if value is None else list(value)
    if not names:
        raise ParamError(f"parameter {name}=[] must name at least one entry")
    if len(set(names)) != len(names):
        raise ParamError(f"parameter {name}={names!r} names an entry twice")
    return names


def _layers(value: tuple[int, ...] | None, count: int) -> list[int]:
    """Decoder block indices (negative ones count from the end; all when None), sorted and checked
    against the model's depth."""
    if value is None:
        return list(range(count))
    if not value:
        raise ParamError("parameter layers=[] must name at least one decoder block")
    out = [i + count if i < 0 else i for i in value]
    if any(not 0 <= i < count for i in out):
        raise ParamError(f"parameter layers={list(value)!r}: the decoder has blocks 0..{count - 1}")
    return sorted(set(out))


def _hook_point(prep: Prepared, name: str) -> torch.nn.Module:
    points = prep.adapter.hook_points()
    if name not in points:
        raise ValueError(f"{prep.adapter.model_type}: the adapter has no hook point {name!r}")
    return points[name]


def _joint(logp: torch.Tensor) -> torch.Tensor:
    """(batch, T) answer-token log-probabilities -> (batch,) probability of the whole answer."""
    return logp.double().sum(dim=-1).exp()


# --- attention knockout -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    """A flow from the ``src`` set to the ``dst`` set: blocking it stops every ``dst`` query from
    attending to every ``src`` key (a position always keeps itself)."""

    name: str
    src: str
    dst: str

    @classmethod
    def parse(cls, text: Any) -> "Edge":
        src, sep, dst = str(text).partition("->")
        if not sep or src not in POSITION_SETS or dst not in POSITION_SETS or src == dst:
            raise ParamError(
                f"edge {text!r} must read SOURCE->DESTINATION with two different sets of {', '.join(POSITION_SETS)}"
            )
        return cls(f"{src}->{dst}", src, dst)

    def block(self, prep: Prepared) -> torch.Tensor:
        """(seq, positions) boolean: True where the (query, key) pair is cut; keys past the sequence
        are a cross-attending family's vision tokens (``prep.position_count``)."""
        cut = torch.zeros(prep.seq_len, prep.position_count, dtype=torch.bool)
        rows, cols = positions_of(prep, self.dst), positions_of(prep, self.src)
        rows = rows[rows < prep.seq_len]  # cross-attended vision tokens are never queries: nothing reaches them
        if rows.numel() and cols.numel():
            cut[rows[:, None], cols[None, :]] = True
        cut.fill_diagonal_(False)
        return cut


def default_window(layers: int) -> int:
    """Layers per knockout window: a quarter of the decoder, at least two (or all there are)."""
    return min(layers, max(2, layers // 4))


def sliding_windows(layers: int, size: int, stride: int) -> list[list[int]]:
    """Windows of ``size`` consecutive blocks, every ``stride`` blocks, the last flush with the end."""
    size = min(size, layers)
    starts = list(range(0, layers - size + 1, stride))
    if starts[-1] != layers - size:
        starts.append(layers - size)
    return [list(range(s, s + size)) for s in starts]


def window_label(window: Sequence[int]) -> str:
    """``"3-5"`` for a run of blocks, ``"1,4"`` otherwise, ``"none"`` for no block."""
    if not window:
        return "none"
    if list(window) == list(range(window[0], window[-1] + 1)):
        return f"{window[0]}-{window[-1]}" if len(window) > 1 else str(window[0])
    return ",".join(map(str, window))


def _explicit_windows(value: tuple[tuple[int, ...], ...], layers: int) -> list[list[int]]:
    """Each window's blocks, sorted without repeats, checked against the model's depth."""
    out = [sorted(set(window)) for window in value]
    if any(not 0 <= i < layers for window in out for i in window):
        raise ParamError(f"parameter windows={[list(w) for w in value]!r}: the decoder has blocks 0..{layers - 1}")
    return out


class Knockout:
    """Pre-hooks on every decoder self-attention that cut chosen (query, key) pairs per batch row.

    The module's own mask is edited wherever it comes from (causal, sliding window, prefix or
    bidirectional image blocks, padding): a float mask gets the dtype's minimum, a boolean mask
    False, and a missing one (sdpa's causal shortcut) is built as the causal mask first.
    ``plan`` holds, per batch row, the (seq, positions) cut and the set of blocks it applies to;
    ``cut_pairs`` counts, per row, the pairs that were allowed and got cut.

    A cross-attention block (Mllama) attends only to the image: its mask is edited the same way over
    its keys (the plan's columns past the sequence), and a query left with no key gets no output
    (:func:`~xmllm.explainers.cross_attention.silence_unattended`).
    """

    def __init__(self, prep: Prepared) -> None:
        self.prep = prep
        self.layers = len(prep.adapter.decoder_layers())
        self.plan: list[tuple[torch.Tensor, frozenset[int]]] = []
        self.cut_pairs: list[int] = []

    @contextmanager
    def hooked(self) -> Iterator["Knockout"]:
        points = self.prep.adapter.hook_points()
        seq = self.prep.seq_len
        with Hooks() as hooks:
            for i in range(self.layers):
                cross = points.get(CROSS_ATTN.format(i))
                if cross is not None:  # its keys are the vision tokens, after the sequence
                    hooks.add(cross.register_forward_pre_hook(self._hook(i, slice(seq, None)), with_kwargs=True))
                    hooks.add(cross.register_forward_hook(silence_unattended, with_kwargs=True))
                    continue
                module = _hook_point(self.prep, f"{LAYER_POINT.format(i)}.attn")
                hooks.add(module.register_forward_pre_hook(self._hook(i, slice(0, seq)), with_kwargs=True))
            yield self

    def _kernel(self, module: torch.nn.Module) -> str:
        config = getattr(module, "config", None)
        kernel = getattr(config, "_attn_implementation", None) or attn_implementations(self.prep.model.config)[""]
        if kernel not in KERNELS:
            raise MissingInput(f"attention knockout edits eager or sdpa masks; this model runs {kernel!r} attention")
        return kernel

    def _hook(self, layer: int, keys: slice):
        """Pre-hook editing the mask of block ``layer``, whose keys are the plan's columns ``keys``."""

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            rows = [(k, cut[:, keys]) for k, (cut, layers) in enumerate(self.plan) if layer in layers]
            if not rows:
                return args, kwargs
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            batch, seq = int(hidden.shape[0]), int(hidden.shape[1])
            if batch != len(self.plan):
                raise RuntimeError(f"knockout plan has {len(self.plan)} rows, the forward {batch}")
            if "attention_mask" not in kwargs:
                raise ValueError(f"{type(module).__name__} is not called with attention_mask=...; cannot knock out")
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = self._edit(module, kwargs["attention_mask"], rows, batch, seq, hidden.device)
            return args, kwargs

        return hook

    def _edit(self, module: torch.nn.Module, mask: Any, rows: list[tuple[int, torch.Tensor]], batch: int, seq: int,
              device: torch.device) -> torch.Tensor:
        kernel = self._kernel(module)
        keys = int(rows[0][1].shape[-1])  # the sequence, or a cross-attention block's vision tokens
        cut = torch.zeros(batch, 1, seq, keys, dtype=torch.bool, device=device)
        for k, pairs in rows:
            cut[k, 0] = pairs.to(device)
        if mask is None and keys == seq:  # sdpa's causal shortcut: the causal mask, made explicit
            allowed = torch.ones(seq, seq, dtype=torch.bool, device=device)
            if getattr(module, "is_causal", True):
                allowed = allowed.tril()
            mask = allowed.expand(batch, 1, seq, seq)
            if kernel == EAGER:
                dtype = self.prep.loaded.dtype
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        if not torch.is_tensor(mask) or mask.dim() != 4 or tuple(mask.shape[-2:]) != (seq, keys):
            raise ValueError(f"attention knockout needs a 4-D attention mask of {seq} queries over {keys} keys, got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        mask = mask.expand(batch, 1, seq, keys)
        if mask.dtype == torch.bool:
            allowed = mask
            edited = mask & ~cut
        else:
            low = torch.finfo(mask.dtype).min
            allowed = mask > low / 2
            edited = mask.masked_fill(cut, low)
        removed = allowed & cut
        for k, _ in rows:
            self.cut_pairs[k] += int(removed[k].sum())
        return edited

    def logprobs(self, plan: list[tuple[torch.Tensor, frozenset[int]]]) -> tuple[torch.Tensor, list[int]]:
        """Answer-token log-probabilities (rows, T) of one batched forward with ``plan``."""
        self.plan, self.cut_pairs = plan, [0] * len(plan)
        try:
            inputs = repeat_inputs(dict(self.prep.inputs), len(plan))
            with torch.inference_mode():
                logp = logprobs_at(self.prep.model, inputs, self.prep.logit_positions, answer_ids(self.prep))
            return logp.cpu(), list(self.cut_pairs)
        finally:
            self.plan = []


@register
class AttentionKnockout(Explainer):
    """The change in the answer's probability when attention from one part of the sequence to another
    (image->answer, question->answer, ...) is cut in a window of consecutive decoder blocks, the
    window sliding over the depth: where the image's information flows in.

    Cost: one forward per edge and window (four edges times about three quarters of the depth at the
    defaults) plus the unperturbed one, batched, no backward. Geva et al., 2023 (arXiv 2304.14767);
    Zhang et al., 2024 (arXiv 2411.18620).
    """

    id = "intervention.attention_knockout"
    model_needs = frozenset({"decoder_attention"})  # it edits every block's attention mask
    cross_attention_ready = True  # a cross-attention block's image flow is cut at its output
    title = "Attention knockout between image, question and answer over windows of layers"
    group = GROUP
    citations = (GEVA, ZHANG_FLOW)
    summary = (
        "Cut the attention from one part of the sequence to another (image->answer, image->question, "
        "question->answer, ...) in a window of k consecutive decoder layers, sliding over the depth, "
        "and measure how the answer's probability changes: where the image's information flows in."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        edges: tuple[str, ...] | None = param(None, "flows to block, each SOURCE->DESTINATION over image, question, "
                                                    "answer, text, all (null: the four image/question flows)")
        window: int | None = param(None, "blocks per sliding window (null: a quarter of the decoder, at least two)",
                                   low=1)
        stride: int = param(1, "blocks between sliding windows' starts", low=1)
        windows: tuple[tuple[int, ...], ...] | None = param(None, "explicit windows, each a list of decoder blocks "
                                                                  "(possibly empty), instead of window", low=0)
        batch_size: int | None = param(None, "knocked-out copies per forward (null: as many as the device's budget "
                                             "fits)", low=1)
        fast_attention: bool = param(True, "run the forwards with the fused (sdpa) attention kernel")

    @classmethod
    def scale_plan(cls, prep: Prepared, full_layers: int) -> ScalePlan:
        """One-block windows: every knocked-out copy is one forward's row whatever its window, so the
        peak is one batched forward's; the cost counts the default windows at full depth."""
        copies = batch_size_for(prep, None)
        edges = len(DEFAULT_EDGES)
        size = default_window(full_layers)
        plans = edges * len(sliding_windows(full_layers, size, 1))
        copies = min(copies, plans)
        return ScalePlan({}, f"one-block windows instead of {size}-block ones (the peak is one forward's: {copies} "
                         "copies)", copies, trials_for(copies),
                         lambda p, b: {"windows": [[0]] * math.ceil(b / edges), "batch_size": b}, cost=costs(1 + plans))

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        edges, window, windows, fast_attention = params.edges, params.window, params.windows, params.fast_attention
        if edges is not None and not edges:
            raise ParamError(f"{self.id}: parameter edges=[] must be a non-empty list like ['image->answer']")
        try:
            parsed = [Edge.parse(e) for e in (DEFAULT_EDGES if edges is None else edges)]
        except ParamError as error:
            raise ParamError(f"{self.id}: parameter edges: {error}") from None
        if len({e.name for e in parsed}) != len(parsed):
            raise ParamError(f"{self.id}: parameter edges={list(edges or [])!r} names an edge twice")
        prep = sample
        knock = Knockout(prep)
        layers = knock.layers
        if windows is not None:
            if window is not None:
                raise ParamError(f"{self.id}: give either window (a size) or windows (explicit lists of blocks), "
                                 "not both")
            spans = _explicit_windows(windows, layers)
            size = None
        else:
            size = default_window(layers) if window is None else window
            if size > layers:
                raise ParamError(f"{self.id}: parameter window={size}: the decoder has only {layers} blocks")
            spans = sliding_windows(layers, size, params.stride)
        batch_size = batch_size_for(prep, params.batch_size, eager=eager_unless_fused(prep, fast_attention))
        cuts = [e.block(prep) for e in parsed]
        plan = [(cuts[e], frozenset(w)) for e in range(len(parsed)) for w in spans]
        with fused_attention(prep.model, fast_attention):
            with knock.hooked():
                original, _ = knock.logprobs([(cuts[0], frozenset())])
                chunks, pairs = [], []
                for start in range(0, len(plan), batch_size):
                    logp, cut = knock.logprobs(plan[start : start + batch_size])
                    chunks.append(logp)
                    pairs.extend(cut)
            kernel = attn_implementations(prep.model.config)[""]
        tokens = len(prep.answer.token_ids)
        knocked = torch.cat(chunks) if chunks else torch.empty(0, tokens)
        if knocked.numel():  # a knockout that cuts nothing is the unperturbed forward, exactly (its batched
            knocked[torch.tensor(pairs) == 0] = original[0]  # rerun would differ in the last bits by batch size)
        shape = (len(parsed), len(spans))
        base = float(_joint(original)[0])
        prob = _joint(knocked).reshape(shape) if knocked.numel() else torch.zeros(shape, dtype=torch.float64)
        change = (prob - base) / base if base > 0 else torch.zeros(shape, dtype=torch.float64)
        per_token = (knocked - original).reshape(*shape, tokens).permute(2, 0, 1)
        cut_pairs = torch.tensor(pairs, dtype=torch.float64).reshape(shape)

        exp = Explanation(
            self.id,
            {**params.as_dict(), "edges": [e.name for e in parsed], "window": size,
             "stride": params.stride if windows is None else None, "windows": spans, "batch_size": batch_size},
            prep.target(),
        )
        exp.add("prob_change", change, ("edge", "window"))
        exp.add("prob", prob, ("edge", "window"))
        exp.add("logprob_change", per_token, ("answer_token", "edge", "window"))
        exp.add("cut_pairs", cut_pairs, ("edge", "window"))
        exp.scores.update({"prob_answer": base, "windows": float(len(spans)), "edges": float(len(parsed)),
                           "forwards": float(1 + -(-len(plan) // batch_size))})
        if len(plan):
            worst = int(torch.argmin(change.flatten()))
            e, w = divmod(worst, len(spans))
            exp.scores["max_drop"] = float(-change.flatten()[worst])
            exp.meta["strongest"] = {"edge": parsed[e].name, "window": window_label(spans[w])}
        exp.meta.update({
            **axis_labels({"edge": [e.name for e in parsed], "window": [window_label(w) for w in spans]}),
            "windows": spans,
            "edges": {e.name: {"source": e.src, "destination": e.dst,
                               "source_tokens": int(positions_of(prep, e.src).numel()),
                               "destination_tokens": int(positions_of(prep, e.dst).numel())} for e in parsed},
            "empty_edges": [e.name for k, e in enumerate(parsed) if spans and not bool(cut_pairs[k].any())],
            "kernel": kernel,
            "prob_change": "(p(answer | knockout) - p(answer)) / p(answer); p is the whole answer's probability",
            "cut_pairs": "attention (query, key) pairs the model allowed and the knockout cut, summed over the "
                         "window's blocks (heads not counted); 0 means the edge does not exist in this prompt",
            "answer_logprobs": original[0].tolist(),
        })
        return exp


# --- activation patching ------------------------------------------------------------------------------


CORRUPTIONS: tuple[str, ...] = ("auto", "pair", "noise")
"""How the corrupted run differs from the clean one: a counterfactual input of the same token
count (given, or the demo world's pair), or Gaussian noise on the image tokens' embeddings
entering the decoder; ``auto`` takes a counterfactual where there is one, noise otherwise."""


@dataclass
class Corrupted:
    """The corrupted run: its inputs, and noise to add to block 0's input at ``positions``."""

    kind: str
    inputs: dict[str, Any]
    noise: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    info: dict[str, Any] | None = None


@dataclass(frozen=True)
class Patch:
    """Restore the clean output of hook point ``point`` at ``positions`` (a sorted LongTensor)."""

    point: str
    positions: torch.Tensor


class Patcher:
    """Clean activations captured once, then restored into batched corrupted runs.

    Each batch row follows its own list of :class:`Patch` es; an empty list is the plain corrupted
    run. ``point`` names an adapter hook point whose (first) output is replaced.
    """

    def __init__(self, prep: Prepared, corrupted: Corrupted, points: Sequence[str], positions: torch.Tensor) -> None:
        self.prep = prep
        self.corrupted = corrupted
        self.points = list(dict.fromkeys(points))
        self.kept = torch.unique(positions.long().cpu())
        self.clean: dict[str, torch.Tensor] = {}
        self.rows: list[list[Patch]] = []

    # -- hooks --
    @staticmethod
    def _first(output: Any) -> torch.Tensor:
        return output[0] if isinstance(output, tuple) else output

    @staticmethod
    def _replace_first(output: Any, tensor: torch.Tensor) -> Any:
        return (tensor, *output[1:]) if isinstance(output, tuple) else tensor

    def _capture(self, point: str):
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            value = self._first(output)
            self.clean[point] = value[0].index_select(0, self.kept.to(value.device)).detach().clone()

        return hook

    def _restore(self, point: str):
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
            todo = [(k, p) for k, patches in enumerate(self.rows) for p in patches if p.point == point]
            if not todo:
                return output
            value = self._first(output).clone()
            clean = self.clean[point].to(value.dtype)
            for k, patch in todo:
                where = torch.searchsorted(self.kept, patch.positions)
                value[k, patch.positions.to(value.device)] = clean[where.to(clean.device)]
            return self._replace_first(output, value)

        return hook

    def _noise(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        noise, positions = self.corrupted.noise, self.corrupted.positions
        assert noise is not None and positions is not None
        if args:
            hidden = args[0].clone()
            hidden[:, positions.to(hidden.device)] += noise.to(hidden)
            return (hidden, *args[1:]), kwargs
        hidden = kwargs["hidden_states"].clone()
        hidden[:, positions.to(hidden.device)] += noise.to(hidden)
        return args, {**kwargs, "hidden_states": hidden}

    @contextmanager
    def _hooks(self, make: Callable[[str], Callable], noise: bool) -> Iterator[None]:
        with Hooks() as hooks:
            for p in self.points:
                hooks.add(_hook_point(self.prep, p).register_forward_hook(make(p)))
            if noise and self.corrupted.noise is not None:
                first = _hook_point(self.prep, LAYER_POINT.format(0))
                hooks.add(first.register_forward_pre_hook(self._noise, with_kwargs=True))
            yield

    # -- runs --
    @torch.inference_mode()
    def capture_clean(self) -> torch.Tensor:
        """The clean run (answer-token log-probabilities, (T,)), keeping every point's output."""
        with self._hooks(self._capture, noise=False):
            logp = logprobs_at(self.prep.model, dict(self.prep.inputs), self.prep.logit_positions, answer_ids(self.prep))
        return logp[0].cpu()

    @torch.inference_mode()
    def logprobs(self, rows: list[list[Patch]], batch_size: int) -> torch.Tensor:
        """(len(rows), T) answer-token log-probabilities of the corrupted run with each row's patches."""
        if not self.clean and any(rows):
            raise RuntimeError("capture_clean() must run before restoring activations")
        chunks = []
        with self._hooks(self._restore, noise=True):
            for start in range(0, len(rows), batch_size):
                self.rows = rows[start : start + batch_size]
                try:
                    inputs = repeat_inputs(self.corrupted.inputs, len(self.rows))
                    chunks.append(logprobs_at(self.prep.model, inputs, self.prep.logit_positions,
                                              answer_ids(self.prep)).cpu())
                finally:
                    self.rows = []
        return torch.cat(chunks) if chunks else torch.empty(0, len(self.prep.answer.token_ids))


def restored_share(clean: torch.Tensor, corrupt: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
    """Share of the clean answer probability that patching brings back:
    ``(p_patched - p_corrupt) / (p_clean - p_corrupt)``, per row of ``patched`` (rows, T)."""
    p_clean, p_corrupt = _joint(clean[None])[0], _joint(corrupt[None])[0]
    gap = p_clean - p_corrupt
    if float(gap) == 0.0:
        raise MissingInput("the corrupted run gives the answer the same probability as the clean run: nothing to "
                           "restore")
    return (_joint(patched) - p_corrupt) / gap


def pair_corruption(prep: Prepared, counterfactual: ExplainSample | Prepared) -> Corrupted:
    """The counterfactual's prompt with the clean answer appended: same length, same image slots."""
    other = counterfactual.sample if isinstance(counterfactual, Prepared) else counterfactual
    if not isinstance(other, ExplainSample):
        raise ParamError(f"parameter counterfactual must be an ExplainSample, not {type(counterfactual).__name__}")
    cf = prepare(prep.loaded, other, answer=prep.answer)
    if cf.seq_len != prep.seq_len:
        raise ParamError(
            f"counterfactual {other.id!r} has {cf.seq_len} tokens with the answer, the sample {prep.seq_len}: "
            "patching needs the same token count"
        )
    if not torch.equal(cf.image_positions, prep.image_positions):
        raise ParamError(f"counterfactual {other.id!r} puts its image tokens at other positions than the sample")
    own = generate_answer(prep.loaded, other.images, other.question)
    info = {"id": other.id, "question": other.question, "expected": other.expected,
            "edit": (other.extra or {}).get("edit"), "answer": own.text}
    return Corrupted("pair", dict(cf.inputs), info=info)


@torch.inference_mode()
def noise_corruption(prep: Prepared, scale: float, seed: int) -> Corrupted:
    """Gaussian noise on the image tokens entering the first decoder block, the same draw in every
    corrupted run. Its standard deviation is ``scale`` times that of every token's embedding there
    (Meng et al. take the embeddings' spread, not the subject's: a model whose image features are
    still near zero, early in training, is corrupted as much as any other)."""
    positions = prep.image_positions
    if positions.numel() == 0:
        raise MissingInput(f"sample {prep.sample.id!r} has no image tokens to corrupt with noise")
    seen: dict[str, torch.Tensor] = {}

    def grab(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["all"] = hidden[0].float().cpu()

    with Hooks() as hooks:
        hooks.add(_hook_point(prep, LAYER_POINT.format(0)).register_forward_pre_hook(grab, with_kwargs=True))
        logprobs_at(prep.model, dict(prep.inputs), prep.logit_positions[-1:], None)
    std = float(seen["all"].std())
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((positions.numel(), seen["all"].shape[-1]), generator=generator) * (scale * std)
    info = {"scale": scale, "embedding_std": std, "seed": seed, "tokens": int(positions.numel())}
    return Corrupted("noise", dict(prep.inputs), noise=noise, positions=positions, info=info)


def corruption_for(prep: Prepared, kind: str, counterfactual: Any, noise_scale: float, seed: int,
                   pair_seed: int) -> Corrupted:
    """The corrupted run the parameters ask for (see :data:`CORRUPTIONS`)."""
    if kind not in CORRUPTIONS:
        raise ParamError(f"parameter corruption={kind!r} must be one of {', '.join(CORRUPTIONS)}")
    if kind in ("auto", "pair"):
        partner = counterfactual
        if partner is None:
            partner = demo_pair(prep.sample, pair_seed)
        if partner is not None:
            return pair_corruption(prep, partner)
        if kind == "pair":
            raise MissingInput(
                f"sample {prep.sample.id!r} has no counterfactual: pass counterfactual=ExplainSample(...) with the "
                "same token count, use a demo-world sample, or corruption='noise'"
            )
    elif counterfactual is not None:
        raise ParamError("parameter counterfactual is given but corruption='noise' ignores it")
    return noise_corruption(prep, noise_scale, seed)


@register
class ActivationPatching(Explainer):
    """Causal tracing: the share of the clean answer's probability that comes back when the clean
    run's residual stream, attention output or MLP output is restored, one layer and token group
    (image, question, answer) at a time, into a corrupted run (the counterfactual pair, or noise).

    Cost: one clean forward, one corrupted one, and one per component, layer and group (9 per block
    at the defaults), batched, no backward. Meng et al., 2022 (arXiv 2202.05262); Basu et al., 2024
    (arXiv 2406.04236); Zhang and Nanda, 2023 (arXiv 2309.16042).
    """

    id = "intervention.activation_patching"
    title = "Activation patching (causal tracing) per layer, component and token group"
    group = GROUP
    model_needs = frozenset({"image_tokens"})  # it patches token groups, image tokens among them, block by block
    needs = frozenset({Need.PAIR})
    citations = (MENG, BASU, ZHANG_NANDA)
    summary = (
        "Run a corrupted input (the sample's counterfactual, or noise on the image tokens), restore the "
        "clean run's residual stream, attention output or MLP output at one layer for one token group "
        "(image, question, answer positions), and measure the share of the clean answer's probability "
        "that comes back."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        counterfactual: Any = param(None, "the corrupted input: an ExplainSample of the same token count (null: the "
                                          "demo world's pair, if any)", cli=False)
        corruption: str = param("auto", "a counterfactual pair, noise on the image tokens, or auto (pair where there "
                                        "is one)", choices=CORRUPTIONS)
        components: tuple[str, ...] | None = param(None, "what is restored: residual stream, attention or MLP output "
                                                         "(null: all three)", choices=tuple(COMPONENT_POINTS))
        groups: tuple[str, ...] | None = param(None, "token groups restored one at a time (null: image, question, "
                                                     "answer)", choices=tuple(POSITION_SETS))
        layers: tuple[int, ...] | None = param(None, "decoder blocks patched (negative from the end); null patches all")
        noise_scale: float = param(NOISE_SCALE, "noise corruption's std in embedding stds (Meng et al.: 3)",
                                   low=0.0, low_open=True)
        seed: int = param(0, "seed of the noise corruption")
        pair_seed: int = param(0, "seed of the demo world's counterfactual pair (when none is given)")
        batch_size: int | None = param(None, "patched copies per forward (null: as many as the device's budget fits)",
                                       low=1)
        fast_attention: bool = param(True, "run the forwards with the fused attention kernel")

    @classmethod
    def scale_plan(cls, prep: Prepared, full_layers: int) -> ScalePlan:
        """Noise corruption (the bench's sample has no counterfactual image at that size); every patched
        copy is one forward's row, so the peak is one batched forward's."""
        copies = batch_size_for(prep, None)
        rows = 3 * 3 * full_layers + 1  # components x groups per block, and the plain corrupted run
        copies = min(copies, rows)
        return ScalePlan({"corruption": "noise"}, f"noise corruption (no counterfactual image at this size); the "
                         f"peak is one forward's: {copies} copies", copies, trials_for(copies), with_batch_size,
                         cost=costs(2 + rows))

    def unmet(self, model: LoadedModel, sample: ExplainSample, params: Params) -> str | None:
        if params.corruption == "pair" and params.counterfactual is None and demo_sample_from(sample) is None:
            return ("corruption='pair' needs a counterfactual sample (counterfactual=...) or demo-world ground "
                    "truth; use corruption='auto' or 'noise'")
        return None

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        counterfactual, seed, pair_seed = params.counterfactual, params.seed, params.pair_seed
        noise_scale, fast_attention = params.noise_scale, params.fast_attention
        comps = _names("components", params.components, tuple(COMPONENT_POINTS))
        names = _names("groups", params.groups, DEFAULT_GROUPS)
        prep = sample
        picked = _layers(params.layers, len(prep.adapter.decoder_layers()))
        batch_size = batch_size_for(prep, params.batch_size, eager=eager_unless_fused(prep, fast_attention))
        sets = {g: positions_of(prep, g) for g in names}
        with fused_attention(prep.model, fast_attention):
            corrupted = corruption_for(prep, params.corruption, counterfactual, noise_scale, seed, pair_seed)
            points = [COMPONENT_POINTS[c].format(i) for c in comps for i in picked]
            patcher = Patcher(prep, corrupted, points, torch.cat(list(sets.values())))
            clean = patcher.capture_clean()
            rows = [[Patch(COMPONENT_POINTS[c].format(i), sets[g])] for c in comps for i in picked for g in names]
            runs = patcher.logprobs([[], *rows], batch_size)  # row 0: the plain corrupted run
        corrupt, patched = runs[0], runs[1:]
        shape = (len(comps), len(picked), len(names))
        share = restored_share(clean, corrupt, patched).reshape(shape)
        prob = _joint(patched).reshape(shape)
        p_clean, p_corrupt = float(_joint(clean[None])[0]), float(_joint(corrupt[None])[0])

        exp = Explanation(
            self.id,
            {**params.as_dict(cli_only=True), "corruption": corrupted.kind, "components": comps, "groups": names,
             "layers": picked, "noise_scale": noise_scale if corrupted.kind == "noise" else None,
             "seed": seed if corrupted.kind == "noise" else None,
             "pair_seed": pair_seed if corrupted.kind == "pair" and counterfactual is None else None,
             "counterfactual": (corrupted.info or {}).get("id") if corrupted.kind == "pair" else None,
             "batch_size": batch_size},
            prep.target(),
        )
        exp.add("restored", share, ("component", "layer", "group"))
        exp.add("prob", prob, ("component", "layer", "group"))
        best = int(torch.argmax(share.flatten())) if share.numel() else 0
        c, rest = divmod(best, len(picked) * len(names))
        i, g = divmod(rest, len(names))
        exp.scores.update({"prob_clean": p_clean, "prob_corrupt": p_corrupt, "gap": p_clean - p_corrupt,
                           "max_restored": float(share.flatten()[best]),
                           "forwards": float(1 + -(-(len(rows) + 1) // batch_size))})
        exp.meta.update({
            **axis_labels({"component": comps, "layer": picked, "group": names}),
            "corruption": {"kind": corrupted.kind, **(corrupted.info or {})},
            "group_tokens": {g: int(p.numel()) for g, p in sets.items()},
            "strongest": {"component": comps[c], "layer": picked[i], "group": names[g]},
            "restored": "(p_patched - p_corrupt) / (p_clean - p_corrupt) of the clean answer (all its tokens)",
            "components": {"residual": "residual stream after the block", "attn": "self-attention output",
                           "mlp": "MLP output"},
            "answer_logprobs": {"clean": clean.tolist(), "corrupt": corrupt.tolist()},
        })
        return exp


__all__ = [
    "COMPONENT_POINTS",
    "DEFAULT_EDGES",
    "POSITION_SETS",
    "ActivationPatching",
    "AttentionKnockout",
    "Corrupted",
    "Edge",
    "Knockout",
    "Patch",
    "Patcher",
    "default_window",
    "noise_corruption",
    "pair_corruption",
    "positions_of",
    "restored_share",
    "sliding_windows",
    "window_label",
]
