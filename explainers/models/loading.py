"""Load an image-text-to-text model, its processor and its adapter, with provenance for reports.

A spec is ``"demo"`` (the embedded demo model), ``"demo-early"`` (an early checkpoint of it), a
local folder, or a Hugging Face hub id. Hub ids load from the local cache when offline
(``HF_HUB_OFFLINE=1``); every failure is one line saying what is missing and what to do. Weights
load as safetensors unless pickles are allowed, and remote code runs only when asked.

Explaining images needs no torchvision: a processor whose video part cannot load without it
(Qwen2-VL, SmolVLM, ...) is built from the folder's image processor (its PIL backend), tokenizer,
chat template and settings, with a :class:`NoVideoProcessor` in place of the video part, and a
one-line warning says so once. A processor without an image processor is refused in one line.
"""
from __future__ import annotations

import hashlib
import json
import logging
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
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
"""Where a folder names its processor class, in the order AutoProcessor reads them."""
_VIDEO_FILE = "video_preprocessor_config.json"
_LOG = logging.getLogger(__name__)


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
    dispatch: Any = None
    """The :class:`~.dispatch.Dispatch` the model was loaded with (None: all of it on ``device``)."""

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
            **self._dispatch_provenance(),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }


    def _dispatch_provenance(self) -> dict[str, Any]:
        """The device map used (where each block lived), when the model was dispatched."""
        if self.dispatch is None:
            return {}
        from .dispatch import device_map_of, summary

        return {"device_map": {**self.dispatch.record(), "blocks": summary(self.model),
                               "map": device_map_of(self.model)}}


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
    except Exception:  # noqa: BLE001 - an invalid id or revision: treated as not cached
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


def _check_family(source: _Source, common: dict[str, Any], spec: str) -> Any:
    """Read the config first, so an unsupported family fails before any weights are read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.name, **common)
    except Exception as error:
        if source.hub and source.folder is None:
            raise _not_cached(spec, error) from error
        raise ModelLoadError(f"cannot read the config of {source.name}: {_one_line(error)}") from error
    lookup_adapter(getattr(config, "model_type", None), config)
    return config


# --- the processor ---------------------------------------------------------------------------------

_VIDEO_HINT = "videos need torchvision built for this torch (pip install torchvision)"
_warned_video: set[str] = set()
"""Processor classes whose missing video part was already said (once per process)."""


class NoVideoProcessor(dict):
    """Stands in for a processor's video part when torchvision cannot load.

    It is the video settings the folder saved (a dict, so the processor still serialises), also
    readable as attributes: code on the image path that reads them (SmolVLM's chat template reads
    ``num_frames`` and ``fps``) works, and a video given to the processor is refused in one line.
    """

    num_frames = None
    fps = None

    def __init__(self, settings: dict[str, Any], reason: str) -> None:
        super().__init__(settings)
        for key, value in settings.items():
            if key.isidentifier() and not key.startswith("_") and not hasattr(dict, key):
                setattr(self, key, value)
        self.reason = reason

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ModelLoadError(f"this processor has no video part: torchvision does not load here ({self.reason}); "
                             f"{_VIDEO_HINT}")


def _one_line_text(error: BaseException) -> str:
    """An error's text on one line (its lines joined), for errors whose first line says little."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def _torchvision_problem(error: BaseException) -> str | None:
    """Why torchvision cannot be used here, when that is why ``error`` happened; else None."""
    if "torchvision" not in _one_line_text(error).lower():
        return None
    try:
        import torchvision  # noqa: F401 - a broken build fails here: operators that do not register
    except Exception as failure:  # noqa: BLE001 - ImportError, or a RuntimeError from its compiled operators
        return _one_line(failure)
    return _one_line_text(error)


def _hub_kwargs(common: dict[str, Any]) -> dict[str, Any]:
    return {key: common[key] for key in ("revision", "local_files_only") if key in common}


def _folder_json(name: str, filename: str, common: dict[str, Any]) -> dict[str, Any] | None:
    """A JSON file of the folder (or of the hub id's cached snapshot), or None when it has none."""
    from transformers.utils import cached_file

    try:
        path = cached_file(name, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **_hub_kwargs(common))
    except Exception:  # noqa: BLE001 - an unreadable hub entry reads as no file
        return None
    if path is None:
        return None
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _named_processor(name: str, common: dict[str, Any]) -> tuple[str, str] | None:
    """``(file, class name)``: the processor class the folder names, where AutoProcessor looks."""
    for filename in _PROCESSOR_FILES:
        content = _folder_json(name, filename, common)
        if content and isinstance(content.get("processor_class"), str):
            return filename, content["processor_class"]
    return None


def _family_processor(config: Any) -> type | None:
    """The processor class transformers maps the config's model type to, if any."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    try:
        return PROCESSOR_MAPPING[type(config)]
    except (KeyError, ValueError, ImportError):
        return None


def _processor_class(name: str, common: dict[str, Any], config: Any) -> type | None:
    """The class AutoProcessor builds for the folder: the one it names if transformers has it,
    else the model type's."""
    from transformers.models.auto.processing_auto import processor_class_from_name

    named = _named_processor(name, common)
    found = processor_class_from_name(named[1]) if named else None
    return found if isinstance(found, type) else _family_processor(config)


def _video_attributes(cls: type) -> list[str]:
    return [attribute for attribute in cls.get_attributes() if "video" in attribute]


def _without_video(cls: type, name: str, common: dict[str, Any], reason: str) -> Any:
    """``cls`` built from the folder's image processor (the PIL backend), tokenizer, chat template
    and processor settings, its video part a :class:`NoVideoProcessor`: what AutoProcessor
    builds, less what needs torchvision."""
    from transformers import AutoImageProcessor, AutoTokenizer

    hub = _hub_kwargs(common)
    settings, _ = cls.get_processor_dict(name, **hub)
    video = set(_video_attributes(cls))
    parts: dict[str, Any] = {}
    for attribute in cls.get_attributes():
        saved = settings.get(attribute)
        if attribute in video:
            saved = saved if isinstance(saved, dict) else _folder_json(name, _VIDEO_FILE, common) or {}
            parts[attribute] = NoVideoProcessor(saved, reason)
        elif "tokenizer" in attribute:
            subfolder = "" if attribute == "tokenizer" else attribute
            parts[attribute] = AutoTokenizer.from_pretrained(name, subfolder=subfolder,
                                                             trust_remote_code=common["trust_remote_code"], **hub)
        elif "image_processor" in attribute:
            parts[attribute] = AutoImageProcessor.from_pretrained(
                name, processor_config=saved if isinstance(saved, dict) else None, backend="pil",
                trust_remote_code=common["trust_remote_code"], **hub)
        else:
            raise ModelLoadError(f"{cls.__name__} also needs a {attribute}, which xmllm cannot build without "
                                 "its video part")
    code = cls.__init__.__code__
    accepted = set(code.co_varnames[1:code.co_argcount + code.co_kwonlyargcount])
    options = {key: value for key, value in settings.items() if key in accepted and key not in parts}
    processor = cls.__new__(cls)
    check = processor.check_argument_for_proper_class

    def allow_stand_in(argument_name: str, argument: Any) -> Any:
        if argument_name in video and isinstance(argument, NoVideoProcessor):
            return NoVideoProcessor  # transformers' own check would need torchvision to name the class
        return check(argument_name, argument)

    processor.check_argument_for_proper_class = allow_stand_in
    try:
        cls.__init__(processor, **parts, **options)
    finally:
        del processor.check_argument_for_proper_class
    return processor


def _say_once(key: str, message: str) -> None:
    if key not in _warned_video:
        _warned_video.add(key)
        _LOG.warning("xmllm: warning: %s", message)


def _load_processor(name: str, common: dict[str, Any], config: Any) -> Any:
    """The folder's processor, as AutoProcessor builds it; without its video part when torchvision
    cannot load (said once); a one-line error when it cannot explain images."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name, **common)
    except Exception as error:
        reason = _torchvision_problem(error)
        cls = _processor_class(name, common, config) if reason is not None else None
        if cls is None or not _video_attributes(cls):
            raise ModelLoadError(f"cannot load the processor of {name}: {_one_line_text(error)}") from error
        try:
            processor = _without_video(cls, name, common, reason)
        except ModelLoadError as failure:
            raise ModelLoadError(f"cannot load the processor of {name}: {failure}") from error
        except Exception as failure:
            raise ModelLoadError(f"cannot load the processor of {name} without its video part (torchvision: "
                                 f"{reason}): {_one_line_text(failure)}") from failure
        _say_once(cls.__name__, f"{cls.__name__} without its video part: torchvision does not load here "
                                f"({reason}); images are explained without it, {_VIDEO_HINT}")
    if getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(f"cannot load the processor of {name}: {_no_image_processor(name, common, config, processor)}")
    return processor


def _no_image_processor(name: str, common: dict[str, Any], config: Any, processor: Any) -> str:
    """Why the processor AutoProcessor gave cannot explain images, and what to change."""
    import transformers
    from transformers.models.auto.processing_auto import processor_class_from_name

    what = type(processor).__name__
    if not hasattr(processor, "get_attributes"):  # a tokenizer or a feature extractor alone
        what = f"AutoProcessor gave a bare {what}, which"
    named = _named_processor(name, common)
    family = _family_processor(config)
    suggestion = f"; set processor_class to {family.__name__!r} there" if family is not None else ""
    if named and not isinstance(processor_class_from_name(named[1]), type):
        return (f"its {named[0]} names processor_class {named[1]!r}, which transformers {transformers.__version__} "
                f"does not have, so {what} has no image processor{suggestion}")
    return f"{what} has no image processor: save the model's processor into the folder (processor.save_pretrained)"


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
    device_map: Any = None,
    device_memory: Any = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load ``spec`` ("demo", "demo-early", a folder or a hub id) with its processor and family adapter.

    ``eager_attention`` selects the eager attention kernel, the only one that returns
    attention weights. The model is put in eval mode on ``device`` in ``dtype``. transformers'
    own bars and notices are routed through xmllm's (:mod:`xmllm.explainers.quiet`).

    ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or a ``{module: device}`` mapping)
    loads through accelerate's dispatch instead of onto ``device`` (which must then be left
    ``"auto"``): blocks spread over the GPUs within ``device_memory`` (``"0=20GiB,cpu=64GiB"`` or
    ``{0: "20GiB", "cpu": "64GiB"}``), the rest in CPU memory and then on disk in
    ``offload_folder`` (default: a scratch folder under xmllm's cache, removed after); blocks kept
    off the GPU run one at a time (:mod:`.dispatch`). A limit or a folder alone means ``"auto"``.
    """
    from transformers import AutoModelForImageTextToText

    from ..quiet import route_library_output

    route_library_output()  # no "Loading weights" bar nor known-harmless notices (all of it with XMLLM_VERBOSE=1)
    spec = os.fspath(spec)
    from .dispatch import make_dispatch

    dispatch = make_dispatch(device_map, device_memory, offload_folder)
    if dispatch is not None and not (isinstance(device, str) and device == "auto"):
        raise ModelLoadError(f"device {str(device)!r} and a device map: give one (the device map places "
                             "every block)")
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    source = _resolve(spec, allow_pickle, revision)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.hub:
        common["revision"] = revision
        common["local_files_only"] = _offline()

    config = _check_family(source, common, spec)
    model_kwargs: dict[str, Any] = {"dtype": target_dtype, **common}
    if not allow_pickle:
        model_kwargs["use_safetensors"] = True
    if eager_attention:
        model_kwargs["attn_implementation"] = "eager"
    scratch = None
    if dispatch is not None:
        from .dispatch import load_kwargs

        placed, scratch = load_kwargs(dispatch)
        model_kwargs.update(placed)
    try:
        model = AutoModelForImageTextToText.from_pretrained(source.name, **model_kwargs)
    except Exception as error:  # transformers raises OSError, ValueError and hub errors alike
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
        if source.hub and source.folder is None:
            raise _not_cached(spec, error) from error
        raise ModelLoadError(f"cannot load the model from {source.name}: {_one_line(error)}") from error
    if dispatch is not None:
        from .dispatch import execution_device, release_with

        release_with(model, scratch)
        target_device = execution_device(model)
        model = model.eval()
    processor = _load_processor(source.name, common, config)

    if dispatch is None:
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
        dispatch=dispatch,
    )
