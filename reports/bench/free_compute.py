"""Real shapes, free arithmetic: peak memory of a real-width model measured on a CPU in seconds.

A LLaVA-1.5-7B decoder layer at ~640 tokens costs ~250 GFLOP per forward, far too slow for a CPU
to run the dozens of forwards an explainer makes. But an operator's *memory* does not depend on
its arithmetic: a matrix product allocates one output of a known shape whatever the values. So
:class:`FreeCompute`, a ``TorchDispatchMode``, answers the operators whose cost is arithmetic
(:data:`FREE_OPS`: matrix products, convolutions, fused attention, embedding look-ups, and their
backward kernels) with a zero-filled tensor of the shape, dtype and strides the real kernel gives
(taken from the operator's meta kernel), and runs every other operator for real: norms,
softmaxes, activations, copies, reshapes, indexing. Autograd sits above the mode, so what it saves
for backward, and when it frees it, is exactly what it does for the real model; so is every
allocation the explainers make themselves. Its storage counter (the one ``xmllm bench`` uses,
:mod:`xmllm.bench.memory`) then sees the same tensor bytes as on the real model.

The weights never need values either: :func:`materialise` builds the model with its parameters
on the meta device (no memory, no initialisation), then gives every matrix a one-element storage
expanded to its shape (stride 0: 2 bytes for a 4096 x 11008 matrix) and every vector (norm
weights, biases) real values. Only the free operators read the matrices.

What changes is the values: every product is zero, so logits are flat and gradients vanish. An
explainer whose *sizes* depend on values (how many cells a search tries, how long a generation
runs) is measured on those zero values; the scale bench forces the answer and picks parameters
so that sizes are set by the parameters (see :mod:`xmllm.bench.scale`). The test suite checks that
this measurement equals the real-arithmetic one exactly on a small model, for every explainer.
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from xmllm.explainers.recompute import recomputing

from .memory import _StorageCounter

aten = torch.ops.aten

FREE_OPS = frozenset({
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten._addmm_activation.default,
    aten.convolution.default,
    aten.convolution_backward.default,
    aten.embedding.default,
    aten.embedding_dense_backward.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
})
"""Operators whose cost is arithmetic, answered with zeros of the real output's layout. Composite
operators (``linear``, ``matmul``, ``einsum``, math attention) reach the mode decomposed into these
and cheap ones, exactly as they reach the real kernels."""


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.size(), value.stride(), dtype=value.dtype, device="meta")
    return value


def _device_of(args: Any, kwargs: Any) -> torch.device:
    found: list[torch.device] = []
    tree_map(lambda v: found.append(v.device) if isinstance(v, torch.Tensor) and v.device.type != "meta" else None,
             (args, kwargs))
    return found[0] if found else torch.device("cpu")


PATTERN_SEED = 0
PATTERN_ROWS = 61
"""Rows of the fill block (a prime, so that it does not line up with heads, tiles or copies)."""
_BLOCKS: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}


def _block(dtype: torch.dtype, device: torch.device, width: int) -> torch.Tensor:
    """A fixed (PATTERN_ROWS, width) block of N(0, 1) values (absolute, times 3, for integers)."""
    key = (dtype, device, width)
    if key not in _BLOCKS:
        generator = torch.Generator().manual_seed(PATTERN_SEED + width)
        values = torch.randn(PATTERN_ROWS, width, generator=generator, dtype=torch.float32)
        _BLOCKS[key] = (values if dtype.is_floating_point or dtype.is_complex else values.abs().mul(3)).to(
            device=device, dtype=dtype)
    return _BLOCKS[key]


def fill(tensor: torch.Tensor) -> torch.Tensor:
    """Write a fixed pattern over ``tensor`` (a broadcast copy of :func:`_block`: memory traffic only)."""
    if tensor.numel() == 0:
        return tensor
    if tensor.dtype == torch.bool:
        return tensor.fill_(True)
    width = tensor.shape[-1] if tensor.dim() else 1
    if not tensor.is_contiguous():
        return tensor.copy_(_block(tensor.dtype, tensor.device, width)[0].expand(tensor.shape))
    rows = tensor.numel() // width
    flat = tensor.view(rows, width)
    block = _block(tensor.dtype, tensor.device, width)
    whole = rows // PATTERN_ROWS
    if whole:
        flat[: whole * PATTERN_ROWS].view(whole, PATTERN_ROWS, width).copy_(block.expand(whole, PATTERN_ROWS, width))
    if rows > whole * PATTERN_ROWS:
        flat[whole * PATTERN_ROWS :].copy_(block[: rows - whole * PATTERN_ROWS])
    return tensor


def mark_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Write a non-zero into the first entry of every row (the rest stays unwritten): a gradient
    that is not zero anywhere an explainer looks for rows to skip, for the cost of one column."""
    if tensor.numel() and tensor.dim() and (tensor.is_floating_point() or tensor.is_complex()):
        tensor.select(-1, 0).fill_(1.0)
    return tensor


def allocated_output(func: Any, args: tuple, kwargs: dict, floating_only: bool = False,
                     values: bool | str = True) -> Any:
    """What ``func`` would return: tensors of the real layouts (computed on meta) holding the fill
    pattern, so that nothing downstream sees the flat values a zero fill would give (uniform
    attention, tied rankings, vanishing gradients) where the real model sees varied ones."""
    device = _device_of(args, kwargs)
    try:
        shapes = func(*tree_map(_meta, args), **tree_map(_meta, kwargs))
    except (NotImplementedError, RuntimeError):  # no meta kernel, or a data-dependent shape
        if floating_only:
            return None
        raise
    if floating_only and not all(v.is_floating_point() for v in torch.utils._pytree.tree_flatten(shapes)[0]
                                 if isinstance(v, torch.Tensor)):
        return None

    def real(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            out = torch.empty_strided(value.size(), value.stride(), dtype=value.dtype, device=device)
            return fill(out) if values is True else mark_rows(out) if values == "rows" else out
        return value

    return tree_map(real, shapes)


_COMPOSITE: dict[Any, bool] = {}


def _composite(func: Any) -> bool:
    """Whether ``func`` has a CompositeImplicitAutograd kernel (``linear``, ``matmul``, ``conv2d``,
    ``softmax``, ...): with autograd on, the dispatcher decomposes those before the mode sees them;
    under inference mode they arrive whole, and the mode decomposes them itself, so that it sees
    the same operators (and the same allocations) whether a graph is recorded or not."""
    if func not in _COMPOSITE:
        try:
            _COMPOSITE[func] = torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")
        except (RuntimeError, AttributeError):
            _COMPOSITE[func] = False
    return _COMPOSITE[func]


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward pass on this thread."""
    return torch._C._current_autograd_node() is not None


_FUNCTIONAL: dict[Any, bool] = {}


def _functional(func: Any) -> bool:
    """Whether ``func`` returns fresh tensors: no view, no in-place or out= argument."""
    if func not in _FUNCTIONAL:
        schema = func._schema
        _FUNCTIONAL[func] = not func.is_view and not any(
            a.alias_info is not None for a in (*schema.arguments, *schema.returns))
    return _FUNCTIONAL[func]


class FreeCompute(_StorageCounter):
    """Counts live tensor bytes like :func:`xmllm.bench.memory.peak_memory` (``peak``), answering
    :data:`FREE_OPS` with allocated, pattern-filled tensors when ``free`` (else running them: the
    reference); with ``free_backward`` also every functional operator with floating-point outputs
    that autograd's engine runs during a backward pass (elementwise gradients of norms, softmaxes,
    activations: their values decide nothing an explainer's sizes depend on)."""

    def __init__(self, free: bool = True, free_backward: bool = True) -> None:
        super().__init__()
        self.free = free
        self.free_backward = free_backward
        self.free_calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _composite(func):  # reached undecomposed (no autograd key: inference mode): decompose here
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = None
        if self.free and func in FREE_OPS:
            # products in a backward pass: every row non-zero somewhere (no row of a gradient is skipped
            # that the real one would not be), the rest unwritten; in a forward, the fill pattern
            out = allocated_output(func, args, kwargs, values="rows" if _in_backward() else True)
        elif self.free and self.free_backward and _in_backward() and recomputing() is None and _functional(func):
            # gradients' values decide no size: left unwritten (and their pages untouched); a block
            # recomputed in the backward (recompute=True) runs them as a forward does, since
            # checkpointing refuses recomputed tensors whose metadata differ from the saved ones
            out = allocated_output(func, args, kwargs, floating_only=True, values=False)
        if out is None:
            out = func(*args, **kwargs)
        else:
            self.free_calls += 1
        self._see_outputs(out, args, kwargs)
        return out


def measure(fn: Callable[[], Any], free: bool = True, free_backward: bool = True) -> tuple[Any, int]:
    """Run ``fn`` under :class:`FreeCompute`; its result and peak live tensor bytes. An exception
    ``fn`` raises comes back as the result, with the peak reached before it."""
    mode = FreeCompute(free, free_backward)
    with collector_paused():
        try:
            with mode:
                result = fn()
        except Exception as error:  # noqa: BLE001 - the caller decides whether the peak still holds
            result = error
    return result, mode.peak


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector off for the block, after one collection: tensors held only by
    reference cycles (generation leaves some) are then freed at the same point in every run,
    instead of whenever the collector happens to run, which made peaks differ by a few KB with
    the order of earlier work. The peak counts them as alive: an upper bound, the same each time."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --- models whose matrices hold no values -----------------------------------------------------------


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered in the block lands on the meta device (no memory, and the
    module's initialisation runs on nothing); buffers (rotary frequencies, position ids) stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def materialise(model: nn.Module, dtype: torch.dtype, device: torch.device | str = "cpu", *,
                values: str = "free", seed: int = 0, std: float = 0.02) -> nn.Module:
    """Give a model built under :func:`parameters_on_meta` its parameters in ``dtype`` on ``device``.

    ``values="free"``: every matrix is one zero expanded to its shape (only :data:`FREE_OPS` read
    matrices), so a 7B model's weights take no memory; ``"random"``: matrices drawn from N(0, std),
    for real arithmetic (the reference the free measurement is checked against, and GPU runs).
    Vectors are real either way: norm weights one, biases and the rest zero. Buffers (rotary
    frequencies, position ids) are the model's own, moved to ``device``.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if param.dim() >= 2:
                if values == "free":
                    data = torch.zeros((), dtype=dtype, device=device).expand(param.shape)
                else:
                    data = torch.randn(param.shape, generator=generator, device=device, dtype=dtype).mul_(std)
            elif "norm" in type(module).__name__.lower() and name == "weight":
                data = torch.ones(param.shape, dtype=dtype, device=device)
            else:
                data = torch.zeros(param.shape, dtype=dtype, device=device)
            module._parameters[name] = nn.Parameter(data, requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device != torch.device(device):
                module._buffers[name] = buffer.to(device)
    return model.eval()


