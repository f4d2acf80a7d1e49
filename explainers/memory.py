"""A run-level memory budget, and how explainers turn it into batch sizes.

Every explainer that batches copies of the input (occluded images, ablated prompts, IG path
points, knocked-out or patched runs, dropped tokens, the three images of visual reliance) or
holds one big block at a time (the logit lens's read-out) asks this module how many copies fit:
the *budget* is the tensor memory a run may add on top of what is already allocated (the
weights, the inputs), and each explainer estimates what one copy costs from the model's shape
(:class:`ModelShape`): :func:`forward_copy_bytes` for a forward without a graph,
:func:`backward_copy_bytes` for one whose activations are kept for a backward pass,
:func:`recompute_copy_bytes` for one whose blocks are recomputed in the backward instead
(:mod:`xmllm.explainers.recompute`; its cost in forward-equivalents is
:func:`xmllm.explainers.scaleplan.recomputed`). Then :func:`copies_within` gives the batch. An explainer's explicit ``batch_size`` or
``internal_batch_size`` parameter still wins.

The budget is set once per run, not per explainer:

.. code-block:: python

    from xmllm.explainers.memory import memory_budget, parse_memory

    with memory_budget(parse_memory("20GB")):      # or memory_budget("20GB")
        xmllm.explain(model, image, question, ["gradient.integrated"])

Without one, :func:`default_budget` applies: on a GPU what is free when the explainer starts
(``torch.cuda.mem_get_info``) less a reserve for the allocator's fragmentation and the kernels'
workspaces; on a CPU :data:`CPU_BUDGET`, where batching only amortises per-forward costs.

Chunking never changes what is computed, only how many copies share a forward: results equal the
unchunked run's wherever the arithmetic is the same (sums over chunks are exact, and a CPU matrix
product of a different batch size may differ in its last bits; the tests document each case).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .sizes import MemorySizeError, parse_memory  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.prepared import Prepared

CPU_BUDGET = 1 << 30
"""Default budget on a CPU (1 GiB): enough for the full batch on small models, about 7 copies of a
LLaVA-1.5-7B forward at 640 tokens; a CPU run is bound by arithmetic, not by memory."""
CUDA_FREE_SHARE = 0.9
"""Share of the GPU's free memory an explainer may use by default."""
CUDA_RESERVE = 512 << 20
"""Bytes of the free memory left aside besides (cuBLAS workspaces, allocator fragmentation)."""
MAX_COPIES_CPU = 32
"""Most copies per forward on a CPU: on the demo model 32 beats 8 by a fifth (fewer forwards, each
with its fixed Python cost); on the 576-token bench model anything from 4 up costs the same."""
MAX_COPIES_ACCELERATOR = 32
"""Most copies per forward on a GPU (enough to fill one; more only delays the first result)."""
SAFETY = 1.25
"""Factor on every per-copy estimate: the estimates count the large tensors, not every small one."""

_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("xmllm_memory_budget", default=None)
_PLAN: contextvars.ContextVar[tuple[int | None, int | None, str | None]] = contextvars.ContextVar(
    "xmllm_planning", default=(None, None, None))





# --- the budget ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def memory_budget(limit: int | str | None) -> Iterator[int | None]:
    """Within the block every explainer keeps to ``limit`` bytes of tensors on top of what is
    allocated when it starts (a size string is read by :func:`parse_memory`); None: the device's
    default. Nested blocks apply the innermost; threads and asyncio tasks started inside inherit it."""
    value = None if limit is None else parse_memory(limit, "memory budget")
    token = _BUDGET.set(value)
    try:
        yield value
    finally:
        _BUDGET.reset(token)


def explicit_budget() -> int | None:
    """The budget a :func:`memory_budget` block set, or None."""
    return _BUDGET.get()


def default_budget(device: torch.device | str) -> int:
    """The budget without a :func:`memory_budget` block: on CUDA, :data:`CUDA_FREE_SHARE` of the free
    memory less :data:`CUDA_RESERVE` (at least 1 byte); elsewhere :data:`CPU_BUDGET`."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        return max(1, int(free * CUDA_FREE_SHARE) - CUDA_RESERVE)
    return CPU_BUDGET


def current_budget(device: torch.device | str) -> int:
    """The budget in force: the innermost :func:`memory_budget`, else :func:`default_budget`."""
    explicit = explicit_budget()
    return explicit if explicit is not None else default_budget(device)


def device_type(device: torch.device | str) -> str:
    """The kind of device explainers choose their chunk shapes for: ``device``'s, unless a
    :func:`planning` block says to plan as on another."""
    planned = _PLAN.get()[2]
    return planned or torch.device(device).type


def most_copies(device: torch.device | str) -> int:
    """The cap on copies per forward: :data:`MAX_COPIES_CPU` on a CPU, else :data:`MAX_COPIES_ACCELERATOR`."""
    return MAX_COPIES_CPU if device_type(device) == "cpu" else MAX_COPIES_ACCELERATOR


def copies_within(per_copy: int, device: torch.device | str, *, fixed: int = 0, most: int | None = None) -> int:
    """How many copies of ``per_copy`` bytes fit the budget after ``fixed`` bytes: at least one (an
    explainer cannot run fewer), at most ``most`` (default: the device's cap)."""
    most = most_copies(device) if most is None else most
    room = current_budget(device) - fixed
    fit = int(room // max(1, math.ceil(per_copy * SAFETY))) if room > 0 else 0
    return max(1, min(most, fit))


def fits(per_copy: int, device: torch.device | str, *, copies: int = 1, fixed: int = 0) -> bool:
    """Whether ``copies`` copies (and ``fixed``) fit the budget."""
    return fixed + copies * math.ceil(per_copy * SAFETY) <= current_budget(device)


# --- what a copy costs ------------------------------------------------------------------------------


@contextlib.contextmanager
def planning(decoder: int | None = None, vision: int | None = None, device: str | None = None) -> Iterator[None]:
    """Chunk as if the model had ``decoder`` decoder and ``vision`` vision blocks and ran on a
    ``device`` ("cuda", "cpu"; None: its own). ``xmllm bench --scale`` measures, on a CPU, models cut
    to a few blocks whose explainers must batch as the full model does on a GPU; nothing else
    needs this."""
    token = _PLAN.set((decoder, vision, device))
    try:
        yield
    finally:
        _PLAN.reset(token)


def _ints(value: Any) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in items if isinstance(v, int) and not isinstance(v, bool)]


def _first(config: Any, *names: str, default: int = 0) -> int:
    for name in names:
        values = _ints(getattr(config, name, None))
        if values:
            return max(values)
    return default


@dataclass(frozen=True)
class ModelShape:
    """The numbers per-copy estimates need, read off a model's config (and its own block counts)."""

    decoder_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    vision_patch: int
    vision_temporal: int
    vision_sequence: int | None
    """Tokens one vision attention call sees (a tile); None: every patch of an image at once."""
    dtype_bytes: int

    @classmethod
    def of(cls, loaded: Any) -> ModelShape:
        model, adapter = loaded.model, loaded.adapter
        config = model.config
        text = config.get_text_config()
        vision = getattr(config, "vision_config", None)
        decoder, vision_depth, _ = _PLAN.get()
        try:
            decoder = decoder or len(adapter.decoder_layers())
        except Exception:  # noqa: BLE001 - an adapter without blocks: the config's count
            decoder = decoder or _first(text, "num_hidden_layers", default=1)
        try:
            vision_depth = vision_depth or (len(adapter.vision_layers()) if vision is not None else 0)
        except Exception:  # noqa: BLE001
            vision_depth = vision_depth or _first(vision, "num_hidden_layers", "depth")
        hidden = _first(text, "hidden_size", default=1)
        heads = _first(text, "num_attention_heads", default=1)
        v_hidden = _first(vision, "hidden_size", "embed_dim") if vision is not None else 0
        if vision is not None and getattr(vision, "embed_dim", None):  # Qwen2-VL: hidden_size is the merger's output
            v_hidden = _first(vision, "embed_dim")
        v_inter = _first(vision, "intermediate_size") if vision is not None else 0
        if vision is not None and not v_inter:
            v_inter = int(v_hidden * float(getattr(vision, "mlp_ratio", 4) or 4))
        patch = _first(vision, "patch_size", default=14) if vision is not None else 14
        image = _first(vision, "image_size") if vision is not None else 0
        return cls(
            decoder_layers=int(decoder),
            hidden=hidden,
            intermediate=_first(text, "intermediate_size", default=4 * hidden),
            heads=heads,
            kv_heads=_first(text, "num_key_value_heads", default=heads),
            head_dim=_first(text, "head_dim", default=hidden // max(1, heads)),
            vocab=_first(text, "vocab_size", default=_first(config, "vocab_size", default=1)),
            vision_layers=int(vision_depth),
            vision_hidden=v_hidden,
            vision_intermediate=v_inter,
            vision_heads=_first(vision, "num_attention_heads", "num_heads", default=1) if vision is not None else 1,
            vision_patch=patch,
            vision_temporal=_first(vision, "temporal_patch_size", default=1) if vision is not None else 1,
            vision_sequence=(image // patch) ** 2 if image and patch else None,
            dtype_bytes=torch.empty((), dtype=loaded.dtype).element_size(),
        )

    def vision_tokens(self, pixels: torch.Tensor | None) -> int:
        """Patches the vision tower reads from ``pixel_values`` (every tile and frame)."""
        if pixels is None or not self.vision_layers:
            return 0
        return int(pixels.numel() // max(1, 3 * self.vision_patch ** 2 * self.vision_temporal))


def _attention_bytes(heads: int, queries: int, keys: int, eager: bool, saved: bool) -> int:
    """Eager attention materialises scores, float32 softmax and its cast per head; a fused kernel
    keeps one float32 per query and head (for the backward) or nothing."""
    if eager:
        return heads * queries * keys * (2 * 2 + 4 if not saved else 2 + 4)
    return heads * queries * 4 if saved else 0


def forward_copy_bytes(prep: Prepared, *, eager: bool = False, logit_rows: int | None = None,
                       vocab_rows: int | None = None) -> int:
    """Bytes one more copy adds to a batched forward without a graph: the largest of a decoder
    block's transient tensors, the vision tower's, and the read-out of ``logit_rows`` rows
    (default: the answer's) over the vocabulary in float32; ``eager``: attention weights materialised."""
    shape = ModelShape.of(prep.loaded)
    b, seq = shape.dtype_bytes, prep.seq_len
    rows = len(prep.logit_positions) if logit_rows is None else logit_rows
    decoder = seq * (3 * shape.intermediate + 4 * shape.hidden) * b + \
        _attention_bytes(shape.heads, seq, seq, eager, saved=False)
    tokens = shape.vision_tokens(prep.inputs.get("pixel_values"))
    window = min(tokens, shape.vision_sequence or tokens)
    vision = tokens * (3 * shape.vision_intermediate + 4 * shape.vision_hidden) * b + \
        _attention_bytes(shape.vision_heads, tokens, window, eager, saved=False)
    head = rows * (vocab_rows or shape.vocab) * (b + 4 + 4)
    return max(decoder, vision, head) + 2 * seq * shape.hidden * b


def _kept_blocks(prep: Prepared, eager: bool) -> tuple[ModelShape, int, int, int]:
    """(shape, one decoder block's saved bytes, one vision block's, vision tokens)."""
    shape = ModelShape.of(prep.loaded)
    b, seq = shape.dtype_bytes, prep.seq_len
    per_block = seq * (2 * shape.hidden * 4 + 3 * shape.heads * shape.head_dim * b + 3 * shape.intermediate * b
                       + 2 * shape.hidden * b) + _attention_bytes(shape.heads, seq, seq, eager, saved=True)
    tokens = shape.vision_tokens(prep.inputs.get("pixel_values"))
    per_vision = 0
    if tokens:
        window = min(tokens, shape.vision_sequence or tokens)
        per_vision = tokens * (6 * shape.vision_hidden * b + 3 * shape.vision_intermediate * b) + \
            _attention_bytes(shape.vision_heads, tokens, window, eager, saved=True)
    return shape, per_block, per_vision, tokens


def backward_copy_bytes(prep: Prepared, *, eager: bool = False, through_vision: bool = True) -> int:
    """Bytes one more copy adds to a forward whose activations are kept for a backward pass to the
    inputs (parameters frozen): every decoder block's saved tensors (float32 norm inputs, queries,
    keys and values, attention, three MLP-wide tensors) and, ``through_vision``, the vision tower's."""
    shape, per_block, per_vision, tokens = _kept_blocks(prep, eager)
    total = shape.decoder_layers * per_block
    if through_vision and tokens:
        total += shape.vision_layers * per_vision
    return total + forward_copy_bytes(prep, eager=eager)


def recompute_copy_bytes(prep: Prepared, *, eager: bool = False, through_vision: bool = True) -> int:
    """Bytes one more copy adds to a forward whose blocks are recomputed in the backward
    (:mod:`xmllm.explainers.recompute`): the checkpoints (each block's input hidden state, kept
    from the forward to its backward), plus one block's saved tensors while that block's backward
    runs (the largest block: decoder or, ``through_vision``, vision), plus the forward's transient
    tensors as in :func:`backward_copy_bytes`. The peak of a run is the weights and inputs plus this
    per copy; compare :func:`backward_copy_bytes` for the kept run."""
    shape, per_block, per_vision, tokens = _kept_blocks(prep, eager)
    b = shape.dtype_bytes
    checkpoints = shape.decoder_layers * prep.seq_len * shape.hidden * b
    one_block = per_block
    if through_vision and tokens:
        checkpoints += shape.vision_layers * tokens * shape.vision_hidden * b
        one_block = max(one_block, per_vision)
    return checkpoints + one_block + forward_copy_bytes(prep, eager=eager)


def recompute_saving(prep: Prepared, *, eager: bool = False, through_vision: bool = True) -> float:
    """How many times less one copy keeps with recompute than without (kept / recomputed bytes)."""
    return backward_copy_bytes(prep, eager=eager, through_vision=through_vision) / \
        recompute_copy_bytes(prep, eager=eager, through_vision=through_vision)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` can compute logits for chosen rows only (``logits_to_keep``)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
