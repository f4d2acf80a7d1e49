"""Shard and offload: load a model through accelerate's dispatch (``device_map``).

``device_map="auto"`` spreads the model's blocks over the GPUs within each one's memory limit
(``device_memory``), the rest kept in CPU memory and, past that, on disk in an offload folder;
blocks whose weights are kept off the GPU are brought to it one at a time as they run. A 13B
model then runs on two 24 GB GPUs, or on one with the remaining blocks offloaded.

Limits are written ``0=20GiB,1=20GiB,cpu=64GiB`` (a GPU index, ``cuda:N``, ``mps`` or ``cpu``, then
a size as :func:`xmllm.explainers.memory.parse_memory` reads it); ``disk`` takes no size. The
offload folder defaults to a scratch folder under xmllm's cache, removed when the model is
released (or, after a crash, by the next load).
"""
from __future__ import annotations

import importlib.util
import shutil
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""``device_map`` values accelerate spreads a model by (``auto`` is ``balanced`` over the GPUs)."""
OFFLOAD_SCRATCH = "offload"
"""The cache subfolder holding default offload folders."""
OFFLOAD_PREFIX = "weights-"
ACCELERATE_HINT = "pip install xmllm[offload]"
_DEVICE_KEY_HELP = "a GPU index (0, cuda:1), mps or cpu"


class DeviceMapError(ModelLoadError, ValueError):
    """A device map, memory limit or offload folder that cannot be used (one line)."""


@dataclass(frozen=True)
class Dispatch:
    """How a model is spread over devices: accelerate's strategy (or an explicit map), each
    device's memory limit, and the offload folder (None: a scratch folder, removed after)."""

    device_map: str | dict[str, Any] = "auto"
    max_memory: dict[int | str, int] | None = None
    offload_folder: Path | None = None

    def record(self) -> dict[str, Any]:
        """The request as the provenance records it (the resulting map is recorded beside it)."""
        return {
            "strategy": self.device_map if isinstance(self.device_map, str) else "explicit",
            "max_memory": None if self.max_memory is None
            else {str(k): int(v) for k, v in self.max_memory.items()},
            "offload_folder": str(self.offload_folder) if self.offload_folder is not None else None,
        }


def require_accelerate(what: str = "device_map") -> None:
    """A one-line error when accelerate, which dispatch needs, is not installed."""
    if importlib.util.find_spec("accelerate") is None:
        raise DeviceMapError(f"{what} needs accelerate, which is not installed: {ACCELERATE_HINT}")


def _device_key(key: Any, what: str) -> int | str:
    if isinstance(key, bool):
        raise DeviceMapError(f"{what}: device {key!r} is not {_DEVICE_KEY_HELP}")
    if isinstance(key, int):
        if key < 0:
            raise DeviceMapError(f"{what}: device {key!r} is not {_DEVICE_KEY_HELP}")
        return key
    text = str(key).strip().lower()
    if text.isdigit():
        return int(text)
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    if text in ("cpu", "mps", "disk"):
        return text
    raise DeviceMapError(f"{what}: device {str(key)!r} is not {_DEVICE_KEY_HELP}")


def parse_device_memory(value: str | Mapping[Any, Any] | None, what: str = "--device-memory") -> dict[int | str, int] | None:
    """``{device: bytes}`` from ``"0=20GiB,cpu=64GiB"`` or a mapping ``{0: "20GiB", "cpu": "64GiB"}``.

    Keys are a GPU index (``0``, ``cuda:1``), ``mps`` or ``cpu``; sizes as ``parse_memory`` reads
    them. Anything else is a one-line error naming ``what`` and the value.
    """
    from ..sizes import MemorySizeError, parse_memory

    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            raise DeviceMapError(f"{what} {value!r}: expected DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=64GiB")
        pairs: list[tuple[Any, Any]] = []
        for part in value.split(","):
            key, sep, size = part.partition("=")
            if not sep or not key.strip() or not size.strip():
                raise DeviceMapError(f"{what} {value!r}: expected DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=64GiB")
            pairs.append((key, size))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
        if not pairs:
            raise DeviceMapError(f"{what} {value!r}: expected at least one device, e.g. {{0: 20GiB, cpu: 64GiB}}")
    else:
        raise DeviceMapError(f"{what} {value!r}: expected DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=64GiB")
    limits: dict[int | str, int] = {}
    for key, size in pairs:
        device = _device_key(key, f"{what} {_shown(value)}")
        if device == "disk":
            raise DeviceMapError(f"{what} {_shown(value)}: disk takes no limit (it holds what the others do not)")
        if device in limits:
            raise DeviceMapError(f"{what} {_shown(value)}: device {device!r} is given twice")
        try:
            limits[device] = parse_memory(size.strip() if isinstance(size, str) else size, f"device {device}'s limit")
        except MemorySizeError as exc:
            raise DeviceMapError(f"{what} {_shown(value)}: {exc}") from None
    return limits


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else repr(dict(value))


def check_device_memory(limits: Mapping[int | str, int] | None, what: str = "--device-memory") -> None:
    """Every GPU a limit names is one this machine has (before any model work)."""
    for device in limits or {}:
        if isinstance(device, int):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if device >= count:
                have = "no CUDA GPU" if count == 0 else f"{count} CUDA GPU(s)"
                raise DeviceMapError(f"{what}: GPU {device} is not available: this machine has {have}")
        elif device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceMapError(f"{what}: mps is not available on this machine")


def make_dispatch(device_map: str | Mapping[str, Any] | Dispatch | None, device_memory: Any = None,
                  offload_folder: str | Path | None = None, *, flag: str = "device_map",
                  memory_flag: str = "device_memory") -> Dispatch | None:
    """The checked :class:`Dispatch`, or None when no device map is asked for (a memory limit or
    an offload folder alone asks for ``auto``)."""
    if isinstance(device_map, Dispatch):
        return device_map
    if device_map is None and device_memory is None and offload_folder is None:
        return None
    require_accelerate(flag)
    if device_map is None:
        device_map = "auto"
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            raise DeviceMapError(f"{flag} {device_map!r}: use {', '.join(STRATEGIES)} "
                                 "(or, in the API, a {module: device} mapping)")
        mapping: str | dict[str, Any] = device_map
    elif isinstance(device_map, Mapping):
        mapping = {}
        for module, device in device_map.items():
            key = _device_key(device, f"{flag} {module!r}")
            mapping[str(module)] = key
    else:
        raise DeviceMapError(f"{flag} {device_map!r}: use {', '.join(STRATEGIES)} or a {{module: device}} mapping")
    limits = parse_device_memory(device_memory, memory_flag)
    check_device_memory(limits, memory_flag)
    folder = Path(offload_folder).expanduser() if offload_folder is not None else None
    if folder is not None and folder.exists() and not folder.is_dir():
        raise DeviceMapError(f"offload folder {folder}: exists and is not a folder")
    return Dispatch(mapping, limits, folder)


# --- loading ---------------------------------------------------------------------------------------


def offload_root() -> Path:
    from ..scratch import default_cache_dir

    return default_cache_dir() / OFFLOAD_SCRATCH


def load_kwargs(dispatch: Dispatch) -> tuple[dict[str, Any], Path | None]:
    """``from_pretrained`` arguments for ``dispatch`` and the scratch folder made for it (None
    when the user named the offload folder)."""
    kwargs: dict[str, Any] = {"device_map": dispatch.device_map}
    if dispatch.max_memory is not None:
        kwargs["max_memory"] = dict(dispatch.max_memory)
    scratch = None
    if dispatch.offload_folder is not None:
        folder = dispatch.offload_folder
        folder.mkdir(parents=True, exist_ok=True)
    else:
        from ..scratch import remove_stale, scratch_dir

        root = offload_root()
        remove_stale(root, OFFLOAD_PREFIX)  # folders of processes that were killed before removing theirs
        folder = scratch = scratch_dir(root, OFFLOAD_PREFIX)
    kwargs["offload_folder"] = str(folder)
    return kwargs, scratch


def release_with(model: Any, scratch: Path | None) -> None:
    """Remove the scratch offload folder when ``model`` is released (or at exit), at once when
    nothing went to disk."""
    if scratch is None:
        return
    if "disk" not in set(map(str, device_map_of(model).values())):
        shutil.rmtree(scratch, ignore_errors=True)
        return
    weakref.finalize(model, shutil.rmtree, str(scratch), True)


def device_map_of(model: Any) -> dict[str, str]:
    """Where each block of a dispatched model lives (``{}`` for a model on one device)."""
    found = getattr(model, "hf_device_map", None) or {}
    return {str(name): _device_name(device) for name, device in found.items()}


def _device_name(device: Any) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    return str(device)


def execution_device(model: Any) -> torch.device:
    """The device a dispatched model takes its inputs on: where its first block runs (accelerate's
    hook says, for a block kept in CPU memory or on disk and run on a GPU), else the device of
    its first parameter that is not on the meta device."""
    try:
        return _EXECUTION[model]
    except (KeyError, TypeError):
        pass
    device = _find_execution_device(model)
    try:
        _EXECUTION[model] = device
    except TypeError:  # pragma: no cover - a model that cannot be weakly referenced
        pass
    return device


_EXECUTION: weakref.WeakKeyDictionary[Any, torch.device] = weakref.WeakKeyDictionary()


def _find_execution_device(model: Any) -> torch.device:
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        device = _hook_device(hook)
        if device is not None:
            return device
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _hook_device(hook: Any) -> torch.device | None:
    if hook is None:
        return None
    for inner in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        device = getattr(inner, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


def summary(model: Any) -> dict[str, int]:
    """How many blocks each device holds, e.g. ``{"cuda:0": 30, "cpu": 12, "disk": 3}``."""
    counts: dict[str, int] = {}
    for device in device_map_of(model).values():
        counts[device] = counts.get(device, 0) + 1
    return counts
