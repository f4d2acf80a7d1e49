"""Relevancy propagation (Chefer et al. 2021, rules 5-6), exact on the final sequence, per answer token.

The computation behind the relevancy explainers (:mod:`xmllm.explainers.methods.relevancy`), kept
in the core so that the bench (``xmllm.bench.relevancy``) and the tests call it without an explainer.

For self-attention, Chefer et al. average the positive part of gradient x attention over heads,
``A_bar = E_h[(dy/dA * A)^+]`` (rule 5), and accumulate ``R <- R + A_bar . R`` from ``R = I``,
layer by layer (rule 6). LVLM-Interpret applies this while generating with the KV cache, so each
step's rows keep the gradients of earlier steps: an approximation. Here every answer token is
explained on the *final* teacher-forced sequence: one forward keeps every block's attention
weights in the graph (forward hooks on ``decoder.blocks.{i}.attn``), then each answer token k
gets its own gradients ``d y_k / d A_l`` (y_k its log-prob or logit at ``logit_positions[k]``).

Only the needed row of R is computed. With ``R = (I + A_L) ... (I + A_1)`` (layers applied
first to last), row p is ``e_p (I + A_L) ... (I + A_1)``: start from ``v = e_p`` and apply
``v <- v + v A_l`` from the last layer down to the first, ``O(L n^2)`` per token instead of the
``O(L n^3)`` full product. The backward pass produces ``dy/dA_l`` in that same order (last layer
first), so each layer's gradient is folded into the row as it appears (see :class:`_RowStream`):
per answer token the cost is one backward pass, which no exact per-token gradient method can
avoid. That backward runs through an attention kernel of our own (:class:`_RowAttention`,
registered with transformers for the decoder during the forward) that computes what eager
attention computes but skips, in its backward, the blocks that are exactly zero (keys no query
row of a block attends to, rows with no gradient) and the first layer's gradients below the
attention weights; a family whose eager kernel differs runs eager attention with tensor hooks
instead, with the same results. With ``recompute`` (:mod:`xmllm.explainers.recompute`) every
block is recomputed in each backward pass and the forward keeps no attention weights: each layer's
are formed again inside its block's backward, folded into the row with their gradient and
dropped, so no two layers' ``n x n`` attentions are alive at once. The map read is ``R - I``: the identity is the token's own self
term, not a relevance of any input to it.

Normalisation (the paper's eqs. 8-9, ``R_bar = (R - I) / rowsum(R - I) + I``) is applied only
where the paper applies it: to a self-attention relevancy that is combined with another
modality's. In a decoder-only model image and text tokens share one self-attention stack, so the
decoder relevancy is not normalised (rules 5-6 only). Through the vision tower (``through`` =
``"vision"`` or ``"both"``), the vision blocks' relevancy ``R_vis`` is normalised before it
carries decoder relevancy from each image token back to the patches, as ``R_bar^{qq}`` is in the
paper's encoder-decoder rule (eq. 10), so that every image token hands its relevancy on in full
whatever the size of its vision row. A zero row sum is left unscaled (as in the authors' code).
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from xmllm.explainers.prepared import Prepared, score_tokens

from .capture import attn_implementations, eager_attention
from .hooks import Hooks
from .models.errors import AdapterError
from .params import ParamError
from .recompute import recomputed_blocks, recomputing

DEFAULT_TARGET = "logit"
"""Chosen by measurement (``xmllm evaluate --demo 500``, both targets, paired over the same 500
questions): pointing game logit 0.780 [0.744, 0.816] vs log-prob 0.798 [0.762, 0.832] and
deletion area 0.198 [0.179, 0.220] vs 0.209 [0.187, 0.232] do not separate them (paired
differences +0.018 [-0.008, 0.044] and +0.011 [-0.005, 0.025], both intervals holding 0);
insertion favours the logit (paired -0.018 [-0.032, -0.004]), relevance mass the log-prob. The
tie goes to the logit for scale: on confident answers (p >= 0.9998 for 6 of 10 demo answers) the
log-prob's gradients, and so its maps, shrink to about 1e-6, near float32 noise; the logit's do
not, and it is what LVLM-Interpret explains."""
DEFAULT_THROUGH = "decoder"
DEFAULT_BATCH = 1
"""Answer-token targets per backward call. One (the default) streams each layer's gradient into
the row as the backward produces it; more go through one ``is_grads_batched`` (vmap) call that
returns every layer's gradients for the whole batch at once. On a CPU the batched call took about
2x more CPU time per target (measured on the 576-token bench model); on a GPU, where a small
model's backward is bound by kernel launches, a batch may pay off (not measured here)."""

NORMALISATION = (
    "decoder relevancy: rules 5-6 without normalisation (one self-attention stack over image and "
    "text); vision relevancy: normalised R_bar = (R - I) / rowsum(R - I) + I (eqs. 8-9) before it "
    "carries each image token's relevancy back to the patches (eq. 10)"
)


from .relevancy_capture import (  # noqa: F401  (the hook names, re-exported)
    ATTN_SUFFIX,
    DECODER_ATTN_PREFIX,
    VISION_ATTN_PREFIX,
    _attention_modules,
    _capture,
    _embeddings_require_grad,
    _Seen,
    _single_weights,
)

# --- the computation -------------------------------------------------------------------------------


@dataclass
class Relevancy:
    """Relevancy over decoder positions for every answer token and for the whole answer."""

    prepared: Prepared
    target: str
    through: str
    decoder: torch.Tensor
    """(T, n): row ``logit_positions[k]`` of the decoder's ``R - I``, one row per answer token."""
    decoder_answer: torch.Tensor
    """(n,): the same for the whole answer (target: the sum of the per-token targets)."""
    image: torch.Tensor
    """(T, n): what the image maps show at image positions: the decoder rows, or with ``through``
    = vision/both the vision-tower relevancy pooled onto the grid cells each patch feeds."""
    image_answer: torch.Tensor
    targets: torch.Tensor
    """(T,): the target values (log-probs or logits) of the answer tokens."""
    timings: dict[str, float] = field(default_factory=dict)
    backward_calls: int = 0
    batch: int = DEFAULT_BATCH
    kernel: str = "eager autograd"
    """How the decoder's attention gradients were taken (the same numbers either way)."""

    def shares(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., 2): image and text shares of decoder ``rows`` (NaN where both are zero)."""
        image = rows[..., self.prepared.image_positions.to(rows.device)].sum(-1)
        text = rows[..., self.prepared.text_positions.to(rows.device)].sum(-1)
        both = torch.stack([image, text], dim=-1)
        total = both.sum(-1, keepdim=True)
        return torch.where(total > 0, both / total.clamp_min(torch.finfo(both.dtype).tiny), torch.nan)


def _abar(grad: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Rule 5: mean over heads of the positive part of gradient x attention, in float32.

    ``grad`` is (c, B, H, q, k) for c targets, ``weights`` (B, H, q, k); returns (c, B, q, k).
    """
    owned = grad.dtype == torch.float32 and grad.is_contiguous()  # autograd's fresh buffer: reuse it
    product = grad.mul_(weights.detach()) if owned else grad.float() * weights.detach().float()
    return product.clamp_min_(0).mean(dim=2)


def _rows(start: torch.Tensor, abars: list[torch.Tensor | None]) -> torch.Tensor:
    """``start @ ((I + A_L) ... (I + A_1) - I)`` for rows ``start`` (..., n), per-layer (..., n, n).

    Accumulates the off-identity part ``d`` directly (``v = start + d``, ``d <- d + v A_l`` from
    the last layer to the first) so that no ``v - start`` cancellation loses float32 digits.
    """
    delta = torch.zeros_like(start)
    for abar in reversed(abars):
        if abar is not None:
            delta = delta + ((start + delta).unsqueeze(-2) @ abar).squeeze(-2)
    return delta


def _row_sums(abars: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """Row sums of ``R - I``: ``((I + A_L) ... (I + A_1) - I) @ 1`` as a column recursion, first layer first."""
    ones = torch.ones_like(like)
    delta = torch.zeros_like(like)
    for abar in abars:
        if abar is not None:
            delta = delta + (abar @ (ones + delta).unsqueeze(-1)).squeeze(-1)
    return delta


ROW_BLOCK_FLOATS = 1 << 19
"""Gradient x attention entries handled at once on a CPU (2 MiB of float32): a block of query rows
that stays in cache while it is multiplied, clamped and reduced into the row. Smaller blocks skip
more of the causal triangle but pay more per-block overhead; 1-4 MiB measured alike on the
576-image-token bench model (CPU time, one thread), 128 KiB and 16 MiB slower."""


ROW_PRODUCTS = 3
"""float32 (heads x keys) tensors one query row of a block holds at once in the kernel's backward
(gradient x attention, its float32 weights, the softmax gradient)."""


def _row_step(device: torch.device, heads: int, keys: int) -> int:
    """Query rows per block: cache-sized on a CPU; on an accelerator all at once (no per-block syncs)
    unless the memory budget fits fewer (each row costs a few float32 (heads x keys) products)."""
    from .memory import copies_within, device_type

    if device_type(device) == "cpu":
        return max(1, ROW_BLOCK_FLOATS // (heads * keys))
    return copies_within(ROW_PRODUCTS * 4 * heads * keys, device, most=1 << 62)


class _RowStream:
    """Rule 5 and the row recursion done inside the backward pass, one layer at a time.

    The backward pass produces ``dy/dA_l`` last layer first (layer l's gradient needs every layer
    above it), which is the order the row recursion ``v <- v + v A_bar_l`` runs in. So each layer's
    gradient x attention is folded into the row while it is fresh, in blocks of query rows (rows
    where ``v`` is zero are skipped: at the last layer all but one), and neither all layers'
    gradients nor any ``A_bar`` is kept. The blocks come from tensor hooks on eager attention
    weights (:class:`_EagerTaps`) or from the attention kernel's own backward (:class:`_RowAttention`).
    """

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.start: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None
        self.expected = layers - 1
        self._v: torch.Tensor | None = None
        self._acc: torch.Tensor | None = None

    def begin(self, start: torch.Tensor) -> None:
        self.start, self.delta, self.expected = start, torch.zeros_like(start), self.layers - 1

    def open(self, layer: int) -> None:
        if layer != self.expected or self.start is None or self.delta is None:
            raise RuntimeError(f"relevancy: layer {layer}'s attention gradient came out of order")
        self.expected -= 1
        self._v = self.start + self.delta
        self._acc = torch.zeros_like(self._v)

    def fold(self, first: int, product: torch.Tensor) -> None:
        """Add ``sum_h v[rows] (dy/dA ⊙ A)^+`` for the (heads, rows, keys) ``product`` of query rows
        ``first..``; keys past ``product``'s last column get nothing (their attention is zero)."""
        heads, rows, keys = product.shape
        block = self._v[first : first + rows]
        if not bool(block.any()):
            return
        product = product.float().clamp_min(0)  # (heads, rows, keys): sum over heads and rows in one product
        self._acc[:keys] += block.repeat(heads) @ product.reshape(-1, keys)

    def shut(self, heads: int) -> None:
        self.delta += self._acc / heads
        self._v = self._acc = None

    def row(self) -> torch.Tensor:
        if self.expected != -1 or self.delta is None:
            raise RuntimeError(f"relevancy: the backward pass stopped before layer {self.expected}")
        return self.delta


class _EagerTaps:
    """Tensor hooks on eager attention weights that hand each layer's gradient to a :class:`_RowStream`;
    they live as long as ``hooks``'s block."""

    def __init__(self, stream: _RowStream, weights: list[torch.Tensor], hooks: Hooks) -> None:
        self.stream = stream
        self.weights = [w.detach() for w in weights]
        for layer, w in enumerate(weights):
            hooks.add(w.register_hook(self._hook(layer)))

    def _hook(self, layer: int):
        def hook(grad: torch.Tensor) -> None:
            _fold_layer(self.stream, layer, grad, self.weights[layer])

        return hook


def _fold_layer(stream: _RowStream, layer: int, grad: torch.Tensor, weights: torch.Tensor) -> None:
    """Fold one layer's ``dy/dA ⊙ A`` (both (1, heads, n, n)) into the row, a block of query rows at a time."""
    stream.open(layer)
    weights, grad = weights[0], grad[0]
    heads, queries, keys = grad.shape
    step = _row_step(grad.device, heads, keys)
    for first in range(0, queries, step):
        rows = slice(first, first + step)
        stream.fold(first, grad[:, rows].float() * weights[:, rows].float())
    stream.shut(heads)


class _RecomputedTaps:
    """The eager taps when the blocks are recomputed: the forward's attention weights are not kept;
    each layer's gradient is folded with the weights its block's recomputation produced moments
    before in the same backward pass, and those are dropped once folded, so at most one layer's
    attention is alive at a time."""

    def __init__(self, stream: _RowStream, names: list[str]) -> None:
        self.stream = stream
        self.layer = {name: i for i, name in enumerate(names)}
        self.latest: dict[str, torch.Tensor] = {}
        self.inputs: list[Any] = []
        """Gradient edges of the decoder's input: the backward passes end there, having run every
        block's backward in full (ending at the first layer's attention weights would leave some of
        the first block's recomputed tensors unread, and alive, after each pass)."""

    def recomputed(self, name: str, weights: torch.Tensor) -> None:
        self.latest[name] = weights.detach()

    def tap(self, name: str, weights: torch.Tensor, hooks: Hooks) -> None:
        hooks.add(weights.register_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            self.fold(name, grad)

        return hook

    def fold(self, name: str, grad: torch.Tensor) -> None:
        weights = self.latest.pop(name, None)
        if weights is None:
            raise RuntimeError(f"relevancy: {name}'s attention was not recomputed before its gradient")
        _fold_layer(self.stream, self.layer[name], grad, weights)


# --- the attention kernel with the row in its backward ----------------------------------------------
#
# Autograd's backward through eager attention works on full n x n matrices. Registered as an
# attention implementation for the decoder during the relevancy forward, the kernel below computes
# the same forward (the same operations as ``eager_attention_forward``) and a backward that skips
# what is exactly zero: key columns past the last key a block of query rows attends to (the causal
# triangle, or whatever the mask allows), query rows whose output gradient is zero (at the last layer
# all but the answer token's), and at the first layer everything but the gradient the row needs.
# It folds ``dy/dA ⊙ A`` into the row block by block on the way.

ROW_ATTENTION = "xmllm_relevancy_rows"
"""Name of the kernel in transformers' attention registries (masks as for eager attention)."""
CHANGES_THE_MATH: tuple[str, ...] = ("softcap", "s_aux", "sinks", "head_mask")
"""Attention keyword arguments that, when set, make a family's eager kernel differ from the plain
one; a layer called with one of them runs its own eager kernel (and the explainer the eager path)."""


@dataclass
class _RowKernel:
    """What the kernel needs during one relevancy forward and its backward passes."""

    stream: _RowStream
    layers: dict[int, int]
    """``id(module)`` -> decoder block index of the decoder attention modules."""
    anchor: torch.Tensor
    """A scalar every kernel call takes as input: the gradient of a target with respect to it runs
    the backward through every decoder block and no further."""
    ran: set[int] = field(default_factory=set)


_ACTIVE: contextvars.ContextVar[_RowKernel | None] = contextvars.ContextVar("xmllm_row_kernel", default=None)
_OPEN: list[_RowKernel] = []
"""Kernels whose context is open: a block recomputed in a backward pass may run on the autograd
engine's own thread (an accelerator's), where the context variable is not set."""


class _RowAttention(torch.autograd.Function):
    """softmax(Q K^T * scaling + mask) V, with the weights as a second, non-differentiable output."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                anchor: torch.Tensor, scaling: float, kernel: _RowKernel, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if mask is not None:
            scores = scores + mask
        weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(weights, value)
        # The last key each query row attends to (-1: none): every column past it is exactly zero.
        attended = weights[0].ne(0).any(dim=0)
        last = attended.shape[-1] - 1 - attended.flip(-1).to(torch.uint8).argmax(dim=-1)
        reach = torch.where(attended.any(dim=-1), last, -1)
        ctx.save_for_backward(query, key, value, weights, reach)
        ctx.scaling, ctx.kernel, ctx.layer, ctx.anchor = scaling, kernel, layer, (anchor.dtype, anchor.device)
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)
        return out, weights

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor | None, _d_weights: Any) -> tuple[Any, ...]:
        query, key, value, weights, reach = ctx.saved_tensors
        stream, layer = ctx.kernel.stream, ctx.layer
        stream.open(layer)
        heads, queries = query.shape[1], query.shape[2]
        first_layer = layer == 0  # nothing below it is asked for: only the row's gradient is needed
        grads = not first_layer and any(ctx.needs_input_grad[:3])
        d_query = torch.zeros_like(query) if grads else None
        d_key = torch.zeros_like(key) if grads else None
        d_value = torch.zeros_like(value) if grads else None
        if d_out is not None:
            live = d_out[0].ne(0).any(dim=-1).any(dim=0)  # query rows with a gradient
            key_s, query_s = key[0] * ctx.scaling, query[0] * ctx.scaling
            step = _row_step(query.device, heads, key.shape[-2])
            for first in range(0, queries, step):
                rows = slice(first, first + step)
                if not bool(live[rows].any()):
                    continue
                keys = int(reach[rows].max()) + 1
                if keys <= 0:
                    continue
                attn, grad_out = weights[0, :, rows, :keys], d_out[0, :, rows]
                product = torch.matmul(grad_out, value[0, :, :keys].transpose(1, 2))  # dy/dA
                exact = attn.float()  # float32 products, as eager attention's softmax and the taps use
                product = product.mul_(exact) if product.dtype == torch.float32 else product.float().mul_(exact)
                stream.fold(first, product)
                if not grads:
                    continue
                # softmax backward: dS = A ⊙ (dA - sum_k A dA) = P - A * rowsum(P)
                d_scores = torch.addcmul(product, exact, product.sum(dim=-1, keepdim=True), value=-1).to(query.dtype)
                d_query[0, :, rows] = torch.matmul(d_scores, key_s[:, :keys])
                d_key[0, :, :keys] += torch.matmul(d_scores.transpose(1, 2), query_s[:, rows])
                d_value[0, :, :keys] += torch.matmul(attn.transpose(1, 2), grad_out)
        stream.shut(heads)
        dtype, device = ctx.anchor
        return d_query, d_key, d_value, None, torch.zeros((), dtype=dtype, device=device), None, None, None


def _own_eager(module: torch.nn.Module) -> Any:
    """The eager kernel of the module's own modelling file (what ``eager`` would run)."""
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if own is None:
        raise RuntimeError(f"relevancy: {type(module).__name__}'s modelling file has no eager_attention_forward")
    return own


def _repeat_heads(states: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query keys or values repeated to one per query head (``repeat_kv``)."""
    if groups == 1:
        return states
    batch, heads, seq, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, seq, dim).reshape(batch, heads * groups, seq, dim)


def _row_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The registered attention function: :class:`_RowAttention` for the decoder blocks being
    explained, the module's own eager kernel for anything else."""
    kernel = _ACTIVE.get()
    if kernel is None and recomputing() is not None and _OPEN:
        kernel = _OPEN[-1]
    layer = None if kernel is None else kernel.layers.get(id(module))
    plain = (
        layer is not None and query.shape[0] == 1 and query.shape[1] % key.shape[1] == 0
        and not (module.training and dropout) and all(kwargs.get(name) is None for name in CHANGES_THE_MATH)
        and (attention_mask is None or not attention_mask.requires_grad)
    )
    if not plain:
        return _own_eager(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    out, weights = _RowAttention.apply(query, key, value, attention_mask, kernel.anchor, scaling, kernel, layer)
    kernel.ran.add(layer)
    return out.transpose(1, 2).contiguous(), weights


def _register_row_attention() -> bool:
    """Register the kernel (and eager masks for it) with transformers; False where it cannot be."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
    except ImportError:
        return False
    AttentionInterface.register(ROW_ATTENTION, _row_attention)
    AttentionMaskInterface.register(ROW_ATTENTION, eager_mask)
    return True


_ROW_ATTENTION_REGISTERED = _register_row_attention()


def _config_path(config: Any, target: Any) -> list[str] | None:
    """Sub-config keys from ``config`` down to the ``target`` config object ([] for itself)."""
    if config is target:
        return []
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            path = _config_path(sub, target)
            if path is not None:
                return [key, *path]
    return None


@contextlib.contextmanager
def _row_kernel(prepared: Prepared, modules: list[tuple[str, torch.nn.Module]]) -> Iterator[_RowKernel | None]:
    """Run the decoder's attention through :class:`_RowAttention` (the vision tower stays eager);
    yields None where the model cannot switch its decoder's kernel."""
    model = prepared.model
    config = getattr(modules[0][1], "config", None) if modules else None
    path = _config_path(model.config, config) if config is not None else None
    if not _ROW_ATTENTION_REGISTERED or path is None or not hasattr(model, "set_attn_implementation"):
        yield None
        return
    request: Any = ROW_ATTENTION
    for key in reversed(path):
        request = {key: request}
    before = attn_implementations(model.config)
    device = prepared.inputs["input_ids"].device
    kernel = _RowKernel(_RowStream(len(modules)), {id(m): i for i, (_, m) in enumerate(modules)},
                        torch.zeros((), device=device, requires_grad=True))
    try:
        model.set_attn_implementation(request)
    except (ValueError, KeyError, ImportError, NotImplementedError):
        model.set_attn_implementation(before)
        yield None
        return
    token = _ACTIVE.set(kernel)
    _OPEN.append(kernel)
    try:
        yield kernel
    finally:
        _OPEN.remove(kernel)
        _ACTIVE.reset(token)
        model.set_attn_implementation(before)


def _vision_token_map(explainer: str, prepared: Prepared, weights: list[torch.Tensor]) -> torch.Tensor:
    """(B, n_v): the decoder position each vision token feeds (-1: none), checked against the blocks."""
    try:
        token_map = prepared.adapter.vision_token_map(prepared.inputs)
    except (AdapterError, AttributeError, NotImplementedError) as error:
        raise ParamError(
            f"{explainer}: through the vision tower needs the adapter's vision-token map: {error}"
        ) from None
    token_map = torch.as_tensor(token_map).to(device=weights[0].device, dtype=torch.long)
    views, _heads, queries, keys = weights[0].shape
    if token_map.shape != (views, queries) or queries != keys:
        raise ParamError(
            f"{explainer}: {prepared.adapter.model_type}'s vision blocks attend over {tuple(weights[0].shape)} but its "
            f"vision-token map has shape {tuple(token_map.shape)}; through='decoder' works for every model"
        )
    return token_map


def _vision_rows(rows: torch.Tensor | None, abars: list[torch.Tensor | None], token_map: torch.Tensor,
                 seq_len: int, count: int) -> torch.Tensor:
    """Relevancy of the patches feeding each decoder position, through the normalised vision R.

    ``rows`` (count, n) are decoder rows whose image-token entries are handed back to the vision
    tokens feeding them (split evenly where several feed one position), and the result is
    ``w @ R_bar`` with ``R_bar = D^-1 (R - I) + I``, ``D`` the row sums of ``R - I``: that is
    ``(w/d) @ (R - I) + w``, all by row and column recursions. ``rows`` None (``through="vision"``)
    gives each image token a weight of 1 and reads ``w @ (R_bar - I)``: there the identity would
    add the same constant to every patch, as the class token's own column is left out of a ViT's
    map. The result per input patch is summed onto the decoder position its pixels feed: (count, n).
    """
    device = token_map.device
    fed = token_map >= 0
    target = token_map.clamp_min(0)
    per_position = torch.bincount(token_map[fed], minlength=seq_len).to(torch.float32)
    share = torch.where(fed, 1.0 / per_position[target].clamp_min(1.0), torch.zeros((), device=device))
    if rows is None:
        w = share.unsqueeze(0).expand(count, *share.shape).clone()
    else:
        w = rows[:, target] * share.unsqueeze(0)  # (c, B, n_v)
    sums = _row_sums(abars, w)
    scale = torch.where(sums > 0, sums, torch.ones((), device=device))
    m = _rows(w / scale, abars)  # w @ (R_bar - I)
    if rows is not None:
        m = m + w  # the residual identity: each image token's own patches
    out = torch.zeros(count, seq_len, device=device)
    out.index_add_(1, target[fed], m[:, fed])
    return out


def _streamed_rows(stream: _RowStream, scalars: torch.Tensor, starts: torch.Tensor, out: torch.Tensor,
                   through: Any) -> int:
    """One backward per target, each folding its row through ``stream``; returns the calls.
    ``through`` is what the gradient is asked of: the kernel's anchor (an input of every block's
    attention), the first block's eager attention weights, or (blocks recomputed) the gradient edge
    of the decoder's input; either way the backward runs through every decoder block and stops there."""
    for k in range(scalars.numel()):
        stream.begin(starts[k])
        torch.autograd.grad(scalars[k], through, retain_graph=k < scalars.numel() - 1)
        out[k] = stream.row()
    return scalars.numel()


def _gradients(scalars: torch.Tensor, chunk: list[int], weights: list[torch.Tensor],
               retain: bool) -> list[torch.Tensor | None]:
    """``d scalars[k] / d weights`` for the targets in ``chunk``, each with a leading target axis."""
    if len(chunk) == 1:
        grads = torch.autograd.grad(scalars[chunk[0]], weights, retain_graph=retain, allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    pick = torch.zeros(len(chunk), scalars.numel(), device=scalars.device, dtype=scalars.dtype)
    pick[torch.arange(len(chunk)), torch.as_tensor(chunk)] = 1.0
    return list(torch.autograd.grad(scalars, weights, grad_outputs=pick, retain_graph=retain,
                                    allow_unused=True, is_grads_batched=True))


def _forward(stack: contextlib.ExitStack, prepared: Prepared, overrides: dict[str, Any],
             decoder: list[tuple[str, torch.nn.Module]], vision: list[tuple[str, torch.nn.Module]], streamed: bool,
             light: bool = False, taps: _RecomputedTaps | None = None,
             ) -> tuple[Any, dict[str, list[Any]], _RowKernel | None]:
    """The forward with attention weights kept: through the row kernel when ``streamed`` and every
    decoder block can run it, else with eager attention and the weights in autograd's graph. The
    contexts (kernel, eager attention, capture hooks) enter ``stack``: they stay open for the
    backward passes, where recomputed blocks run their forward again. ``light`` and ``taps``: see
    :func:`_capture` (``taps`` only on the eager path)."""
    if streamed:
        attempt = contextlib.ExitStack()
        try:
            kernel = attempt.enter_context(_row_kernel(prepared, decoder))
            attempt.enter_context(torch.enable_grad())
            store = attempt.enter_context(_capture(decoder, light=light))
            out = prepared.forward(**overrides) if kernel is not None else None
        except BaseException:
            attempt.close()
            raise
        if kernel is not None and kernel.ran == set(range(len(decoder))):
            stack.enter_context(attempt)
            return out, store, kernel
        del out, store  # a block ran its own eager kernel (or none could switch): the eager path
        attempt.close()
    stack.enter_context(eager_attention(prepared.model))
    stack.enter_context(torch.enable_grad())
    stack.enter_context(_embeddings_require_grad(prepared, taps.inputs if taps is not None else None))
    store = stack.enter_context(_capture(decoder + vision, light=light and taps is not None, taps=taps))
    out = prepared.forward(**overrides)
    return out, store, None


def compute_relevancy(
    prepared: Prepared,
    *,
    target: str = DEFAULT_TARGET,
    through: str = DEFAULT_THROUGH,
    batch: int = DEFAULT_BATCH,
    explainer: str = "relevancy",
    recompute: bool = False,
) -> Relevancy:
    """One forward with attention weights in the graph, then per answer token its gradients and row.

    The targets are the T answer tokens' values at their generating positions and, when T > 1,
    their sum for the whole answer; ``batch`` of them go through one ``autograd.grad`` call
    (``is_grads_batched`` when more than one).

    ``recompute``: every decoder and vision block recomputes its activations in each backward pass
    (:mod:`xmllm.explainers.recompute`). In the streamed case (``batch`` 1, through the decoder) the
    forward then keeps no attention weights at all: each layer's are recomputed inside its block's
    backward, folded into the row with their gradient and dropped, so no two layers' n x n
    attentions are alive at once. Through the vision tower, or with ``batch`` > 1, the weights of
    every layer are still kept (the vision rule needs whole matrices; a batch needs every layer's
    gradients at once); only the rest of each block is recomputed.
    """
    device = prepared.inputs["input_ids"].device
    positions = prepared.logit_positions.to(device)
    token_ids = prepared.target_ids()  # (T,), or (2, T) with a contrast
    count = int(positions.numel())
    with_vision = through != "decoder"

    decoder_modules = _attention_modules(prepared, DECODER_ATTN_PREFIX)
    vision_modules = _attention_modules(prepared, VISION_ATTN_PREFIX) if with_vision else []
    if with_vision and not vision_modules:
        raise ParamError(f"{explainer}: through={through!r} but the model has no vision blocks")
    overrides: dict[str, Any] = {"use_cache": False, "logits_to_keep": positions}
    pixels = prepared.inputs.get("pixel_values")
    if with_vision and torch.is_tensor(pixels) and pixels.is_floating_point():
        overrides["pixel_values"] = pixels.detach().requires_grad_()

    with contextlib.ExitStack() as stack:
        return _propagate(stack, prepared, target, through, batch, explainer, recompute, overrides,
                          decoder_modules, vision_modules, positions, token_ids, count)


def _propagate(stack: contextlib.ExitStack, prepared: Prepared, target: str, through: str, batch: int, explainer: str,
               recompute: bool, overrides: dict[str, Any], decoder_modules: list[tuple[str, torch.nn.Module]],
               vision_modules: list[tuple[str, torch.nn.Module]], positions: torch.Tensor, token_ids: torch.Tensor,
               count: int) -> Relevancy:
    """:func:`compute_relevancy`'s forward and backward passes, inside ``stack``'s contexts."""
    device = prepared.inputs["input_ids"].device
    seq_len = prepared.seq_len
    with_vision = through != "decoder"
    clock = time.perf_counter()
    streamed = batch == 1 and not with_vision  # the common case: rows folded inside the backward passes
    light = recompute and streamed  # nothing of any layer's attention kept past its block
    stack.enter_context(recomputed_blocks(prepared.adapter, recompute))
    taps = _RecomputedTaps(_RowStream(len(decoder_modules)), [n for n, _ in decoder_modules]) if light else None
    hooks = stack.enter_context(Hooks())
    out, store, kernel = _forward(stack, prepared, overrides, decoder_modules, vision_modules, streamed, light, taps)
    decoder_weights = _single_weights(explainer, prepared, {n: store[n] for n, _ in decoder_modules}, "relevancy")
    vision_weights = _single_weights(explainer, prepared, {n: store[n] for n, _ in vision_modules},
                                     f"through={through!r}")
    token_map = _vision_token_map(explainer, prepared, vision_weights) if with_vision else None

    logits = out.logits[0]
    if logits.shape[0] != count:  # a model that ignored logits_to_keep
        logits = logits[positions]
    picked = torch.arange(count, device=device)
    values = torch.log_softmax(logits.float(), dim=-1) if target == "logprob" else logits.float()
    per_token = score_tokens(values, token_ids)
    # The whole answer's target: the sum. One more backward costs 1/T of the rest, less than
    # accumulating T gradients of layers x heads x n x n.
    scalars = torch.cat([per_token, per_token.sum().unsqueeze(0)]) if count > 1 else per_token
    timings = {"forward_s": time.perf_counter() - clock}

    weights = decoder_weights + vision_weights
    num_decoder = len(decoder_weights)
    starts = torch.zeros(scalars.numel(), seq_len, device=device)
    starts[picked, positions] = 1.0
    if count > 1:
        starts[count, positions] = 1.0
    decoder_rows = torch.zeros(scalars.numel(), seq_len, device=device)
    image_rows = decoder_rows if not with_vision else torch.zeros_like(decoder_rows)
    clock = time.perf_counter()
    if kernel is not None:
        calls = _streamed_rows(kernel.stream, scalars, starts, decoder_rows, kernel.anchor)
    elif light:
        if len(taps.inputs) != 1:
            raise RuntimeError(f"{explainer}: the decoder's input embedding ran {len(taps.inputs)} times in one forward")
        calls = _streamed_rows(taps.stream, scalars, starts, decoder_rows, taps.inputs[0])
    elif streamed:
        eager_taps = _EagerTaps(_RowStream(len(decoder_weights)), decoder_weights, hooks)
        calls = _streamed_rows(eager_taps.stream, scalars, starts, decoder_rows, decoder_weights[0])
    else:
        calls = 0
        for first in range(0, scalars.numel(), batch):
            chunk = list(range(first, min(first + batch, scalars.numel())))
            grads = _gradients(scalars, chunk, weights, retain=chunk[-1] < scalars.numel() - 1)
            calls += 1
            abars = [None if g is None else _abar(g, w) for g, w in zip(grads, weights)]
            del grads
            rows = _rows(starts[chunk], [None if a is None else a[:, 0] for a in abars[:num_decoder]])
            decoder_rows[chunk] = rows
            if with_vision:
                handed = rows if through == "both" else None
                image_rows[chunk] = _vision_rows(handed, abars[num_decoder:], token_map, seq_len, len(chunk))
            del abars
    timings["gradients_s"] = time.perf_counter() - clock
    del out, weights, decoder_weights, vision_weights, store

    answer = count if count > 1 else 0
    return Relevancy(
        prepared=prepared,
        target=target,
        through=through,
        decoder=decoder_rows[:count].cpu(),
        decoder_answer=decoder_rows[answer].cpu(),
        image=image_rows[:count].cpu(),
        image_answer=image_rows[answer].cpu(),
        targets=per_token.detach().cpu(),
        timings=timings,
        backward_calls=calls,
        batch=batch,
        kernel=("streamed attention backward" if kernel is not None else "eager autograd")
        + (", blocks recomputed" if recompute else ""),
    )

