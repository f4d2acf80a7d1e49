"""Attention weights read during the model's own forward passes and reduced on the spot.

LVLM-Interpret keeps every generation step's full ``output_attentions`` (layers x heads x
seq x seq at prefill, plus one row per layer and head at each later step). The attention
views need far less: the row that produced each answer token, a few block means over the
prompt, and for rollout one running seq x seq product. Forward hooks on the adapter's
``decoder.blocks.{i}.attn`` (and ``vision.blocks.{i}.attn``) points take each call's weights
and keep only that, so nothing of size layers x heads x seq x seq outlives the call.

Two ways to capture the same thing:

* :func:`capture_generate`: during the model's own greedy ``generate`` (the prefill's last
  row, then each decode step's single new row; with the KV cache these rows are exact);
* :func:`capture_forward`: in one teacher-forced forward of a :class:`Prepared` final
  sequence (the rows at ``logit_positions``); the only mode that can roll out the decoder,
  since rollout needs every row of every layer.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from .answering import generate_answer
from xmllm.explainers.prepared import ExplainSample, Prepared, prepare
from .hooks import Hooks
from .memory import accepts_logits_to_keep

if TYPE_CHECKING:  # pragma: no cover
    from .models import LoadedModel

EAGER = "eager"
HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")
RESIDUAL_WEIGHT = 0.5
"""Abnar & Zuidema's residual term: each layer's attention is mixed half and half with I."""

BLOCK_NAMES: tuple[str, ...] = ("text_to_image", "image_to_image", "text_to_text", "image_to_text")
"""Prompt blocks averaged at prefill (query set -> key set), as VL-InterpreT's head summaries."""

SETS: tuple[str, ...] = ("text", "image")
"""The prompt's token sets the blocks are made of, in the order of the mask columns."""

DECODER_ATTN = "decoder.blocks.{}.attn"
VISION_ATTN = "vision.blocks.{}.attn"


# --- eager attention ---------------------------------------------------------------------------


def attn_implementations(config: Any) -> dict[str, Any]:
    """The attention kernel of a config and of each sub-config, in ``set_attn_implementation``'s
    nested-dict form, so that a temporary switch can be undone exactly."""
    found: dict[str, Any] = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            found[key] = attn_implementations(sub)
    return found


def uses_eager(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or any of its sub-configs) runs the eager attention kernel now."""

    def eager(found: Any) -> bool:
        if isinstance(found, dict):
            return any(eager(v) for v in found.values())
        return found == "eager"

    return eager(attn_implementations(model.config))


def _all_eager(found: Mapping[str, Any]) -> bool:
    return all(_all_eager(v) if isinstance(v, Mapping) else v == EAGER for v in found.values())


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with the eager kernel (the only one that returns weights), then restore."""
    before = attn_implementations(model.config)
    if _all_eager(before):
        yield
        return
    if not hasattr(model, "set_attn_implementation"):
        raise RuntimeError(
            f"{type(model).__name__} cannot switch to eager attention at run time: load it with eager_attention=True"
        )
    model.set_attn_implementation(EAGER)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


# --- rollout arithmetic (shared with the explainers) ----------------------------------------------


@dataclass(frozen=True)
class RolloutOptions:
    """How each layer's heads become one matrix in attention rollout."""

    head_fusion: str = "mean"
    discard_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, not {self.head_fusion!r}")
        ratio = self.discard_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"discard_ratio must be a number in [0, 1), not {ratio!r}")


def fuse_heads(weights: torch.Tensor, how: str) -> torch.Tensor:
    """``(..., heads, q, k)`` -> ``(..., q, k)`` in float32 by the mean, max or min over heads (the
    mean accumulates in float32 without a float32 copy of every head)."""
    if how == "mean":
        return weights.mean(dim=-3, dtype=torch.float32)
    if how == "max":
        return weights.amax(dim=-3).float()
    if how == "min":
        return weights.amin(dim=-3).float()
    raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, not {how!r}")


def discard_lowest(attn: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the ``ratio`` fraction of smallest non-zero weights of each row.

    Per row rather than per matrix (vit-explain's variant): a causal row's masked keys are
    already zero and would otherwise make up most of the discarded share.
    """
    if ratio <= 0.0:
        return attn
    nonzero = (attn > 0).sum(dim=-1, keepdim=True)
    drop = torch.floor(nonzero.to(torch.float64) * ratio).to(torch.long)
    zeros = attn.shape[-1] - nonzero
    ranks = torch.argsort(torch.argsort(attn, dim=-1, stable=True), dim=-1, stable=True)
    return attn.masked_fill(ranks < zeros + drop, 0.0)


def rollout_layer(weights: torch.Tensor, options: RolloutOptions) -> torch.Tensor:
    """One layer's rollout factor: fused heads, discarded tail, ``0.5 I + 0.5 A``, rows summing to 1.

    In place on the fused matrix (no identity, no float32 copy of every head), the same float32
    operations in the same order as ``0.5 * A + 0.5 * I`` then a division: off the diagonal the
    identity adds an exact zero."""
    attn = discard_lowest(fuse_heads(weights, options.head_fusion), options.discard_ratio)
    mixed = attn.mul_(RESIDUAL_WEIGHT)
    mixed.diagonal(dim1=-2, dim2=-1).add_(1.0 - RESIDUAL_WEIGHT)
    return mixed.div_(mixed.sum(dim=-1, keepdim=True))


# --- the record --------------------------------------------------------------------------------------


@dataclass
class AttentionRecord:
    """What a capture keeps: small tensors on the CPU, whatever the model's device."""

    source: Literal["generate", "forward"]
    rows: torch.Tensor
    """``(T, layers, heads, seq)``: answer token t's generating row (query at position
    ``query_positions[t]``) over the final sequence's keys; keys after the query are zero."""
    query_positions: torch.Tensor
    """``(T,)``: the positions whose rows these are (the answer tokens' logit positions)."""
    blocks: dict[str, torch.Tensor] = field(default_factory=dict)
    """``name -> (layers, heads)``: mean weight over a prompt block's (query, key) pairs."""
    decoder_rollout: torch.Tensor | None = None
    """``(T, seq)``: the decoder rollout's rows at the query positions (forward capture only)."""
    vision_rollout: torch.Tensor | None = None
    """``(vision batch, tokens, tokens)``: rollout through the vision blocks that feed the projector."""

    @property
    def num_layers(self) -> int:
        return int(self.rows.shape[1])

    @property
    def num_heads(self) -> int:
        return int(self.rows.shape[2])

    def nbytes(self) -> int:
        """Bytes held by the record's tensors: what the capture retains."""
        parts = [self.rows, self.query_positions, *self.blocks.values(), self.decoder_rollout, self.vision_rollout]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


# --- the hooks ---------------------------------------------------------------------------------------


def _weights(output: Any, point: str) -> torch.Tensor:
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if not torch.is_tensor(weights):
        raise ValueError(
            f"{point} returned no attention weights: this module does not expose them (eager attention is on)"
        )
    return weights


class AttentionRecorder:
    """Hooks that reduce each attention call as it happens; use as a context manager.

    ``image_positions`` and ``text_positions`` are the prompt's image-feature and text tokens
    (for the block means); ``query_positions``, when given, are the rows to keep from a single
    full forward, otherwise each call's last row is kept (``generate``: prefill then steps).
    """

    def __init__(
        self,
        loaded: "LoadedModel",
        image_positions: torch.Tensor,
        text_positions: torch.Tensor,
        *,
        query_positions: torch.Tensor | None = None,
        blocks: bool = True,
        rollout: RolloutOptions | None = None,
        vision: RolloutOptions | None = None,
        vision_depth: int | None = None,
    ) -> None:
        if rollout is not None and query_positions is None:
            raise ValueError("decoder rollout needs every row of every layer: use capture_forward")
        self.adapter = loaded.adapter
        self.image_positions = torch.as_tensor(image_positions, dtype=torch.long).cpu()
        self.text_positions = torch.as_tensor(text_positions, dtype=torch.long).cpu()
        self.query_positions = None if query_positions is None else torch.as_tensor(query_positions).long().cpu()
        self.want_blocks = blocks
        self.rollout = rollout
        self.vision = vision
        self.vision_depth = vision_depth
        self._hooks = Hooks()
        self.hook_seconds = 0.0
        """Wall time spent inside the hooks (host side): the capture's own cost on a CPU."""
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        self.rows: dict[int, list[torch.Tensor]] = {}
        self.block_values: dict[str, dict[int, torch.Tensor]] = {}
        self.prompt_len: int | None = None
        self._decoder_product: torch.Tensor | None = None
        self._decoder_next = 0
        self._vision_product: torch.Tensor | None = None
        self._vision_next = 0

    # positions on the weights' device, moved once
    def _pos(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(device)
        return self._on_device[key]

    def _decoder_hook(self, layer: int, point: str):
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            weights = _weights(output, point)
            if weights.shape[0] != 1:
                raise ValueError(f"{point}: the capture reads one sequence, got a batch of {weights.shape[0]}")
            weights = weights[0]  # (heads, q, k)
            calls = self.rows.setdefault(layer, [])
            first = not calls
            if self.query_positions is None:
                calls.append(weights[:, -1, :].to(torch.float32, copy=True))  # a copy: a view pins the call's weights
            else:
                if not first:
                    raise RuntimeError(f"{point} ran twice in a forward capture; capture one forward only")
                calls.append(weights.index_select(1, self._pos("query_positions", weights.device)).float())
            if first:
                if self.prompt_len is None:
                    self.prompt_len = int(weights.shape[-2])
                if self.want_blocks:
                    self._blocks(layer, weights)
            if self.rollout is not None:
                if layer != self._decoder_next:
                    raise RuntimeError(f"decoder blocks ran out of order ({point} after block {self._decoder_next - 1})")
                factor = rollout_layer(weights, self.rollout)
                self._decoder_product = (factor if self._decoder_product is None  # a sharded model: the block's device
                                          else factor @ self._decoder_product.to(factor.device))
                self._decoder_next += 1

        return hook

    def _blocks(self, layer: int, weights: torch.Tensor) -> None:
        """All block means of one square call at once: two indicator matmuls, no gathered copies."""
        size = weights.shape[-1]
        if weights.shape[-2] != size:
            raise RuntimeError(f"block means need a square first call, got {tuple(weights.shape)}")
        masks = self._set_masks(size, weights.device)  # (seq, sets)
        per_row = weights.float() @ masks  # (heads, seq, sets): each row's mass on each key set
        sums = masks.T @ per_row  # (heads, query set, key set)
        counts = masks.sum(0)
        for name in BLOCK_NAMES:
            query, key = (SETS.index(part) for part in name.split("_to_"))
            if counts[query] > 0 and counts[key] > 0:
                mean = sums[:, query, key] / (counts[query] * counts[key])
                self.block_values.setdefault(name, {})[layer] = mean

    def _set_masks(self, size: int, device: torch.device) -> torch.Tensor:
        key = (f"masks{size}", device)
        if key not in self._on_device:
            masks = torch.zeros(size, len(SETS))
            for column, name in enumerate(SETS):
                masks[getattr(self, f"{name}_positions"), column] = 1.0
            self._on_device[key] = masks.to(device)
        return self._on_device[key]

    def start_rollout(self, size: int, device: torch.device) -> None:
        """Begin the decoder rollout from the identity (``R = A_L ... A_1 I``): the running product
        then exists, at its one size, through every block's attention, the first included, so a
        forward's memory does not depend on how many blocks came before."""
        self._decoder_product = torch.eye(size, device=device)

    def _vision_hook(self, layer: int, point: str):
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            if self.vision_depth is not None and layer >= self.vision_depth:
                return
            weights = _weights(output, point)
            if weights.dim() == 3:
                weights = weights.unsqueeze(0)
            if layer == 0:
                self._vision_product, self._vision_next = None, 0  # a new image batch
            if layer != self._vision_next:
                raise RuntimeError(f"vision blocks ran out of order ({point} after block {self._vision_next - 1})")
            factor = rollout_layer(weights, self.vision)
            self._vision_product = (factor if self._vision_product is None  # a sharded model: the block's device
                                    else factor @ self._vision_product.to(factor.device))
            self._vision_next += 1

        return hook

    def _timed(self, hook):
        def timed(*args: Any) -> None:
            start = time.perf_counter()
            try:
                hook(*args)
            finally:
                self.hook_seconds += time.perf_counter() - start

        return timed

    def __enter__(self) -> "AttentionRecorder":
        try:  # a failed registration never reaches __exit__: take off the hooks added so far here
            points = self.adapter.hook_points()
            layers = len(self.adapter.decoder_layers())
            for i in range(layers):
                name = DECODER_ATTN.format(i)
                self._hooks.add(points[name].register_forward_hook(self._timed(self._decoder_hook(i, name))))
            if self.vision is not None:
                for i in range(len(self.adapter.vision_layers())):
                    name = VISION_ATTN.format(i)
                    self._hooks.add(points[name].register_forward_hook(self._timed(self._vision_hook(i, name))))
        except BaseException:
            self._hooks.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.remove()

    # --- results ---------------------------------------------------------------------------

    def _layers(self) -> list[list[torch.Tensor]]:
        count = len(self.adapter.decoder_layers())
        missing = [i for i in range(count) if i not in self.rows]
        if missing:
            raise RuntimeError(f"no attention was captured for decoder blocks {missing}: did the model run?")
        return [self.rows[i] for i in range(count)]

    def _finish(self, source: str, rows: torch.Tensor, queries: torch.Tensor) -> AttentionRecord:
        blocks = {
            name: torch.stack([per_layer[i].cpu() for i in sorted(per_layer)])  # blocks may be on several devices
            for name, per_layer in self.block_values.items()
        }
        vision = None
        if self.vision is not None:
            if self._vision_product is None:
                raise RuntimeError("the vision tower did not run under the capture")
            vision = self._vision_product.cpu()
        decoder = None
        if self._decoder_product is not None:
            decoder = self._decoder_product.index_select(0, queries.to(self._decoder_product.device)).cpu()
        return AttentionRecord(source, rows.cpu(), queries, blocks, decoder, vision)  # type: ignore[arg-type]

    def generated(self, num_tokens: int) -> AttentionRecord:
        """The record of a ``generate`` run, for its first ``num_tokens`` generated tokens."""
        layers = self._layers()
        if self.prompt_len is None:
            raise RuntimeError("no prefill was captured")
        steps = len(layers[0])
        if num_tokens > steps:
            raise ValueError(f"num_tokens={num_tokens} but generate ran only {steps} forward passes")
        first = layers[0][0]
        seq = self.prompt_len + num_tokens
        rows = first.new_zeros((num_tokens, len(layers), first.shape[0], seq))
        for layer, calls in enumerate(layers):
            for step in range(num_tokens):
                row = calls[step]
                end = self.prompt_len + step  # keys up to the query at prompt_len - 1 + step
                if row.shape[-1] > end:
                    raise RuntimeError(f"step {step} of block {layer} sees {row.shape[-1]} keys, more than {end}")
                rows[step, layer, :, end - row.shape[-1] : end] = row.to(rows.device)  # sliding windows keep the tail
        queries = torch.arange(self.prompt_len - 1, self.prompt_len - 1 + num_tokens)
        return self._finish("generate", rows, queries)

    def forwarded(self) -> AttentionRecord:
        """The record of one full forward."""
        layers = self._layers()
        if any(len(calls) != 1 for calls in layers):
            raise RuntimeError("a forward capture must see exactly one call per decoder block")
        home = layers[0][0].device  # blocks of a sharded model are on several devices
        rows = torch.stack([calls[0].to(home) for calls in layers]).permute(2, 0, 1, 3).contiguous()  # (T, L, H, S)
        assert self.query_positions is not None
        return self._finish("forward", rows, self.query_positions)


# --- the two entry points ----------------------------------------------------------------------------


def _prompt_sets(loaded: "LoadedModel", inputs: Any, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    layouts = loaded.adapter.image_layouts(inputs)
    images = torch.cat([l.all_positions for l in layouts]) if layouts else torch.empty(0, dtype=torch.long)
    return images, loaded.adapter.text_positions(inputs, exclude=exclude)


@torch.no_grad()
def capture_generate(
    loaded: "LoadedModel",
    sample: ExplainSample,
    *,
    max_new_tokens: int | None = None,
    blocks: bool = True,
    vision: RolloutOptions | None = None,
    vision_depth: int | None = None,
) -> tuple[Prepared, AttentionRecord]:
    """Answer ``sample`` with the model's own eager greedy ``generate`` and capture on the way.

    Returns the :class:`Prepared` final sequence of that answer (built without another forward)
    and the record, whose rows line up with ``prepared.logit_positions``.
    """
    inputs, _ = loaded.adapter.build_inputs(sample.images, sample.question)
    images, text = _prompt_sets(loaded, inputs)
    recorder = AttentionRecorder(loaded, images, text, blocks=blocks, vision=vision, vision_depth=vision_depth)
    with eager_attention(loaded.model), recorder:
        answer = generate_answer(loaded, sample.images, sample.question, max_new_tokens)
    prepared = prepare(loaded, sample, answer=answer)
    if recorder.prompt_len != int(prepared.answer_positions[0]):
        raise RuntimeError(
            f"generate's prompt has {recorder.prompt_len} tokens but the final sequence puts the answer at "
            f"{int(prepared.answer_positions[0])}"
        )
    return prepared, recorder.generated(len(answer.token_ids))


@torch.no_grad()
def capture_forward(
    prepared: Prepared,
    *,
    blocks: bool = True,
    rollout: RolloutOptions | None = None,
    vision: RolloutOptions | None = None,
    vision_depth: int | None = None,
) -> AttentionRecord:
    """The same capture on ``prepared``'s final sequence, in one teacher-forced forward."""
    recorder = AttentionRecorder(
        prepared.loaded,
        prepared.image_positions,
        prepared.text_positions,
        query_positions=prepared.logit_positions,
        blocks=blocks,
        rollout=rollout,
        vision=vision,
        vision_depth=vision_depth,
    )
    # the capture reads attention, not logits: one row of them instead of (seq x vocabulary)
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(prepared.model) else {}
    if rollout is not None:
        recorder.start_rollout(prepared.seq_len, prepared.inputs["input_ids"].device)
    with eager_attention(prepared.model), recorder:
        prepared.forward(use_cache=False, **keep)
    return recorder.forwarded()


def capture(
    loaded: "LoadedModel", sample: ExplainSample | Prepared, **options: Any
) -> tuple[Prepared, AttentionRecord]:
    """Generate-time capture for a fresh sample, teacher-forced capture for a Prepared one."""
    if isinstance(sample, Prepared):
        return sample, capture_forward(sample, **options)
    return capture_generate(loaded, sample, **options)


def full_attention_bytes(attentions: Sequence[Any]) -> int:
    """Bytes of ``generate(output_attentions=True)``'s per-step, per-layer tensors (LVLM-Interpret's way)."""
    total = 0
    for step in attentions:
        for layer in step if isinstance(step, (list, tuple)) else [step]:
            if torch.is_tensor(layer):
                total += layer.numel() * layer.element_size()
    return total
