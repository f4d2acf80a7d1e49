"""Load an image-text-to-text model, its processor and its adapter, with provenance for reports.

A spec is ``"demo"`` (the embedded demo model), ``"demo-early"`` (an early checkpoint of it), a
local folder, or a Hugging Face hub id. Hub ids load from the local cache when offline
(``HF_HUB_OFFLINE=1``); every failure is one line saying what is missing and what to do. Weights
load as safetensors unless pickles are allowed, and remote code runs only when asked.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import ModelAdapter, adapter_for
from .adapters.base import lookup_adapter
from .errors import ModelLoadError

DEMO_SPEC = "demo"
DEMO_EARLY_SPEC = "demo-early"
"""An early checkpoint of the demo model's training run, for comparing checkpoints."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HASH_CHUNK = 1 << 20  # bytes read at a time when hashing weights
_SAFE_WEIGHTS = "*.safetensors"
_PICKLE_WEIGHTS = "*.bin"
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_TRUTHY = {"1", "true", "yes", "on"}
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass
class LoadedModel:
    """A model ready to explain: model, processor and adapter, and where they came from."""

    model: Any
    processor: Any
    adapter: ModelAdapter
    spec: str
    source: str
    device: torch.device
    dtype: torch.dtype
    revision: str | None = None
    weights_sha256: str | None = None
    eager_attention: bool = False

    def provenance(self) -> dict[str, Any]:
        """What a report needs to say which model, weights and software produced it."""
        import transformers

        config = self.model.config
        return {
            "spec": self.spec,
            "source": self.source,
            "model_type": getattr(config, "model_type", None),
            "model_class": type(self.model).__name__,
            "adapter": type(self.adapter).__name__,
            "revision": self.revision,
            "weights_sha256": self.weights_sha256,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }


# --- device and dtype ------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else as torch understands it."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    check_device(found)
    return found


def check_device(device: torch.device) -> None:
    """A one-line error for a device this machine does not have (before any model work)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ModelLoadError(f"device {str(device)!r} is not available: {why}; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {str(device)!r} is not available: this machine has "
                                 f"{torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device {str(device)!r} is not available on this machine; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"device {str(device)!r} is not supported: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA, float32 elsewhere (CPU half precision is slow and lossy)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use 'auto', {', '.join(sorted(set(_DTYPES)))}")
    return _DTYPES[key]


# --- weights fingerprint ---------------------------------------------------------------------------

_HASH_CACHE: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The folder's safetensors files, sorted by name; pickles only when allowed and nothing else."""
    files = sorted(folder.glob(_SAFE_WEIGHTS))
    if not files and allow_pickle:
        files = sorted(folder.glob(_PICKLE_WEIGHTS))
    return files


def weights_sha256(folder: str | Path, allow_pickle: bool = False) -> str | None:
    """SHA-256 over the weight files' bytes in name order (``cat`` them, then hash).

    Streamed in chunks, and cached per folder and the files' sizes and modification times, so
    a multi-gigabyte checkpoint is hashed once per change.
    """
    folder = Path(folder).resolve()
    files = weight_files(folder, allow_pickle)
    if not files:
        return None
    stats = []
    for path in files:
        stat = path.stat()
        stats.append((path.name, stat.st_size, stat.st_mtime_ns))
    key = (str(folder), tuple(stats))
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        for path in files:
            with path.open("rb") as handle:
                while chunk := handle.read(_HASH_CHUNK):
                    digest.update(chunk)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


# --- resolving a spec ------------------------------------------------------------------------------


def _offline() -> bool:
    """Whether the hub must not be contacted; read at call time, not at import."""
    return any(os.environ.get(name, "").strip().lower() in _TRUTHY for name in _OFFLINE_VARIABLES)


_MISSING_HINT = "pass a folder written by save_pretrained or a hub id"
_DEMO_MISSING_HINT = "this install lacks the demo weights; reinstall xmllm from a release that ships them"


def _check_folder(folder: Path, allow_pickle: bool, label: str, missing_hint: str = _MISSING_HINT) -> None:
    if not folder.exists():
        raise ModelLoadError(f"{label} {folder} does not exist: {missing_hint}")
    if not folder.is_dir():
        raise ModelLoadError(f"{label} {folder} is not a folder: pass the folder holding config.json and the weights")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{label} {folder} has no config.json: pass the folder written by save_pretrained")
    if weight_files(folder, allow_pickle):
        return
    if any(folder.glob(_PICKLE_WEIGHTS)):
        raise ModelLoadError(
            f"{label} {folder} has only pickle weights (*.bin): convert them to safetensors, "
            "or pass allow_pickle=True if you trust their source"
        )
    raise ModelLoadError(f"{label} {folder} has no weights (*.safetensors): save the model there with save_pretrained")


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a hub id, if its config is in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an invalid id or revision: treated as not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def _not_cached(repo_id: str, cause: BaseException | None = None) -> ModelLoadError:
    reason = f" (hub: {_one_line(cause)})" if cause is not None and not _offline() else ""
    return ModelLoadError(
        f"model {repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached{reason}: "
        f"download it on a machine with network (hf download {repo_id}) or pass a local folder"
    )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


@dataclass(frozen=True)
class _Source:
    """Where a spec resolves: a local folder, or a hub id with its cached snapshot if any."""

    name: str
    folder: Path | None
    hub: bool


def _resolve(spec: str, allow_pickle: bool, revision: str | None) -> _Source:
    if spec in (DEMO_SPEC, DEMO_EARLY_SPEC):
        from xmllm.explainers.demo import DEMO_EARLY_MODEL_DIR, DEMO_MODEL_DIR

        folder = Path(DEMO_MODEL_DIR if spec == DEMO_SPEC else DEMO_EARLY_MODEL_DIR)
        label = "the demo model folder" if spec == DEMO_SPEC else "the early demo model folder"
        _check_folder(folder, allow_pickle, label, _DEMO_MISSING_HINT)
        return _Source(str(folder), folder, hub=False)
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or path.is_absolute() or not _HUB_ID.match(spec):
        _check_folder(path, allow_pickle, "model folder")
        return _Source(str(path.resolve()), path.resolve(), hub=False)
    snapshot = _cached_snapshot(spec, revision)
    if snapshot is None and _offline():
        raise _not_cached(spec)
    return _Source(spec, snapshot, hub=True)


def _check_family(source: _Source, common: dict[str, Any], spec: str) -> None:
    """Read the config first, so an unsupported family fails before any weights are read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.name, **common)
    except Exception as error:
        if source.hub and source.folder is None:
            raise _not_cached(spec, error) from error
        raise ModelLoadError(f"cannot read the config of {source.name}: {_one_line(error)}") from error
    lookup_adapter(getattr(config, "model_type", None))


# --- loading ---------------------------------------------------------------------------------------


def load_model(
    spec: str | os.PathLike[str],
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    eager_attention: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load ``spec`` ("demo", "demo-early", a folder or a hub id) with its processor and family adapter.

    ``eager_attention`` selects the eager attention kernel, the only one that returns
    attention weights. The model is put in eval mode on ``device`` in ``dtype``. transformers'
    own bars and notices are routed through xmllm's (:mod:`xmllm.explainers.quiet`).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..quiet import route_library_output

    route_library_output()  # no "Loading weights" bar nor known-harmless notices (all of it with XMLLM_VERBOSE=1)
    spec = os.fspath(spec)
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    source = _resolve(spec, allow_pickle, revision)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.hub:
        common["revision"] = revision
        common["local_files_only"] = _offline()

    _check_family(source, common, spec)
    model_kwargs: dict[str, Any] = {"dtype": target_dtype, **common}
    if not allow_pickle:
        model_kwargs["use_safetensors"] = True
    if eager_attention:
        model_kwargs["attn_implementation"] = "eager"
    try:
        model = AutoModelForImageTextToText.from_pretrained(source.name, **model_kwargs)
    except Exception as error:  # transformers raises OSError, ValueError and hub errors alike
        if source.hub and source.folder is None:
            raise _not_cached(spec, error) from error
        raise ModelLoadError(f"cannot load the model from {source.name}: {_one_line(error)}") from error
    try:
        processor = AutoProcessor.from_pretrained(source.name, **common)
    except Exception as error:
        raise ModelLoadError(f"cannot load the processor from {source.name}: {_one_line(error)}") from error

    model = model.to(target_device).eval()
    folder = source.folder or (_cached_snapshot(spec, revision) if source.hub else None)
    commit = getattr(model.config, "_commit_hash", None) if source.hub else None
    return LoadedModel(
        model=model,
        processor=processor,
        adapter=adapter_for(model, processor),
        spec=spec,
        source=source.name,
        device=target_device,
        dtype=target_dtype,
        revision=commit or revision,
        weights_sha256=weights_sha256(folder, allow_pickle) if folder is not None else None,
        eager_attention=eager_attention,
    )
