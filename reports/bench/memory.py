"""Peak memory of a function: the most bytes of tensors it had allocated at once.

On CUDA the allocator keeps the count (``torch.cuda.max_memory_allocated``, reset before the run).
On a CPU nothing does, and process-level figures do not fit: peak RSS (``VmHWM``) also moves with
glibc's arenas, which keep freed blocks and hand them out again without the RSS growing, and
``tracemalloc`` sees only Python's own allocator, not tensor storage. So on a CPU a
``TorchDispatchMode`` watches every ATen operator the function runs (the backward pass's
included: autograd's engine runs them under the same mode) and counts each new tensor storage's
bytes until the storage is freed (a weak reference's callback; views and in-place results share
their storage and count once). The peak of that count is the tensors the function held at once:
activations, KV caches, autograd graphs, gradients and results, the same quantity CUDA's counter
gives. It leaves out what was allocated before the call (weights, inputs), Python objects and
NumPy arrays, which the methods measured here keep small. The mode costs time per operator, so
memory is measured in runs of its own, never in the timed ones.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _StorageCounter(TorchDispatchMode):
    """Counts the bytes of tensor storages created under it while they are alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int) -> Callable[[Any], None]:
        def callback(_ref: Any) -> None:
            self.live -= self._sizes.pop(key, 0)
            self._refs.pop(key, None)

        return callback

    def _see(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        size = storage.nbytes()
        known = self._sizes.get(key)
        if known is None:
            self._refs[key] = weakref.ref(storage, self._freed(key))
            self._sizes[key] = size
            self.live += size
        elif known != size:  # resized in place (an ``out=`` operator)
            self._sizes[key] = size
            self.live += size - known
        else:
            return
        self.peak = max(self.peak, self.live)

    def _see_outputs(self, out: Any, args: tuple, kwargs: dict) -> None:
        """Count the storages ``out`` allocated: not those of its inputs (a view or an in-place
        result of a weight allocated before the call is no allocation of the call's)."""
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and (item.device.type == "meta"
                                                   or item.untyped_storage()._cdata not in inputs
                                                   or item.untyped_storage()._cdata in self._sizes):
                self._see(item)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._see_outputs(out, args, kwargs)
        return out


@dataclass(frozen=True)
class Peak:
    """The peak bytes a call allocated above what was allocated when it started, and how it was counted."""

    bytes: int
    method: str


def peak_memory(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, Peak]:
    """Run ``fn`` once and return its result with its peak tensor bytes (see the module's docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, Peak(torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated")
    counter = _StorageCounter()
    with counter:
        result = fn()
    return result, Peak(counter.peak, "tensor storages allocated by ATen operators (TorchDispatchMode)")
