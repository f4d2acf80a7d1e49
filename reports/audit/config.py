"""The audit's YAML config, loaded safely and validated with pydantic; every error is one line
naming the config file and the field.

Relative paths (the sample set, a local model folder, the output folder) are relative to the
config file's folder, so a config means the same thing from any working directory.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xmllm.errors import XmllmError


class ConfigError(XmllmError):
    """A config that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JsonlSource(_Strict):
    """The project's JSONL sample set (xmllm.samples)."""

    type: Literal["jsonl"]
    path: str = Field(min_length=1)


class ImageFolderSource(_Strict):
    """A folder of images and a CSV with columns ``image``, ``question`` and optionally ``answer``
    and ``id``; ``image`` is relative to ``folder``."""

    type: Literal["image_folder"]
    folder: str = Field(min_length=1)
    csv: str = Field(min_length=1)


class HfColumns(_Strict):
    image: str = "image"
    question: str = "question"
    answer: str | None = "answer"
    id: str | None = None


class HfDatasetSource(_Strict):
    """A Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (needs ``pip install datasets``)."""

    type: Literal["hf_dataset"]
    path: str = Field(min_length=1)
    split: str | None = None
    columns: HfColumns = HfColumns()


SampleSource = Annotated[JsonlSource | ImageFolderSource | HfDatasetSource, Field(discriminator="type")]


class FaithfulnessConfig(_Strict):
    """Deletion and insertion areas of each explainer's image map, against a random map's."""

    enabled: bool = True
    steps: int = Field(default=4, ge=1, le=64)
    baseline: str = "black"

    @field_validator("baseline")
    @classmethod
    def _known_baseline(cls, value: str) -> str:
        from xmllm.explainers.masking import BASELINES

        if value not in BASELINES:
            raise ValueError(f"unknown baseline {value!r}; choose from {', '.join(BASELINES)}")
        return value


class ExecutorConfig(_Strict):
    """Where samples run: in this process, or on Ray (one model per actor)."""

    kind: Literal["local", "ray"] = "local"
    workers: int | None = Field(default=None, ge=1)
    """Ray actors; default: as many as the cluster's free CPUs (or GPUs) allow."""
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    address: str | None = None
    """A Ray cluster's address; None starts a local instance."""


class SiteConfig(_Strict):
    max_reports: int = Field(default=50, ge=0)
    """Per-sample reports copied into the site (flagged ones first): a site of 10 000 reports helps no one."""


RENAMED_FIELDS = {"probes": "checks"}
"""Top-level keys of an older config (xmllm 0.2) and their names now: a one-line error says which."""

FLAG_KINDS = ("failed", "wrong", "hallucination", "unfaithful", "unchanged_without_image", "unexpected_image")
DEFAULT_FLAGS = ("failed", "wrong", "hallucination", "unfaithful", "unexpected_image")
"""``unexpected_image``: with several pictures and the sample's ``evidence_image``, the explainers'
maps put their largest share on another picture."""


def _known(kind: str, names: list[str], options: Any) -> list[str]:
    """``names`` without repeats, in order; a name not in ``options`` is a one-line error."""
    for name in names:
        if name not in options:
            raise ValueError(f"unknown {kind} {name!r}; choose from {', '.join(options)}")
    return list(dict.fromkeys(names))


class AuditConfig(_Strict):
    """What ``xmllm run CONFIG.yaml`` audits, with what, and where the results go."""

    name: str = Field(default="audit", min_length=1, max_length=200)
    model: str = Field(default="demo", min_length=1)
    device: str = "auto"
    device_map: str | None = None
    """``auto`` (or ``balanced``, ``sequential``): shard the model over the GPUs, the rest offloaded to
    CPU memory and disk (:mod:`xmllm.explainers.models.dispatch`; needs ``pip install xmllm[offload]``)."""
    device_memory: str | dict[str, Any] | None = None
    """Weights each device may hold under ``device_map``: ``"0=20GiB,cpu=64GiB"`` or ``{0: 20GiB, cpu: 64GiB}``."""
    offload_folder: str | None = None
    """Where ``device_map`` keeps blocks offloaded to disk, relative to the config (default: a scratch
    folder under xmllm's cache, removed after)."""
    seed: int = 0
    samples: SampleSource
    allow_absolute_paths: bool = False
    limit: int | None = Field(default=None, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    """The generated answers' token limit (default: the model's generation config)."""
    max_memory: int | str | None = None
    """Tensor memory each explainer may add, e.g. ``20GB`` (default: the device's; see
    :mod:`xmllm.explainers.memory`)."""
    explainers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    checks: list[str] = Field(default_factory=lambda: ["blank_image", "pope"])
    """Hallucination checks run on each sample (:mod:`xmllm.audit.checks`)."""
    faithfulness: FaithfulnessConfig = FaithfulnessConfig()
    flags: list[str] = Field(default_factory=lambda: list(DEFAULT_FLAGS))
    output: str = "audit"
    reports: bool = True
    """Write a self-contained HTML report per sample."""
    executor: ExecutorConfig = ExecutorConfig()
    site: SiteConfig = SiteConfig()

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?|mps", value):
            raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("device_map")
    @classmethod
    def _device_map(cls, value: str | None) -> str | None:
        from xmllm.explainers.models.dispatch import STRATEGIES

        if value is not None and value not in STRATEGIES:
            raise ValueError(f"unknown device map {value!r}; use {', '.join(STRATEGIES)}")
        return value

    @field_validator("device_memory", mode="before")
    @classmethod
    def _device_memory(cls, value: Any) -> Any:
        from xmllm.explainers.models.dispatch import parse_device_memory

        if value is None:
            return None
        limits = parse_device_memory(value, "device_memory")
        return {str(key): size for key, size in (limits or {}).items()}

    @model_validator(mode="after")
    def _dispatch(self) -> AuditConfig:
        dispatched = self.device_map is not None or self.device_memory is not None or self.offload_folder is not None
        if dispatched and self.device != "auto":
            raise ValueError(f"device {self.device!r} and device_map: give one (the device map places every block; "
                             "device_memory or offload_folder alone mean device_map: auto)")
        return self

    @field_validator("max_memory")
    @classmethod
    def _memory(cls, value: int | str | None) -> int | None:
        from xmllm.explainers.memory import parse_memory

        return None if value is None else parse_memory(value, "size")

    @field_validator("explainers", mode="before")
    @classmethod
    def _explainer_list(cls, value: Any) -> Any:
        """``[a, b]`` is ``{a: {}, b: {}}``; a null parameter block is an empty one."""
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise ValueError("a list of explainers must hold explainer ids (strings)")
            return {v: {} for v in value}
        if isinstance(value, dict):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @field_validator("explainers")
    @classmethod
    def _known_explainers(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from xmllm.explainers.registry import RegistryError, get_explainer

        for eid in value:
            try:
                explainer = get_explainer(eid)
            except RegistryError:
                raise ValueError(f"unknown explainer {eid!r}; run 'xmllm explainers' to list them") from None
            if explainer.scope != "sample":
                raise ValueError(f"explainer {eid!r} runs over a whole sample set, not per sample")
            explainer.check_params(value[eid])  # the explainer's declaration, before any model work
        return value

    @field_validator("checks")
    @classmethod
    def _known_checks(cls, value: list[str]) -> list[str]:
        from .checks import CHECKS

        return _known("check", value, CHECKS)

    @field_validator("flags")
    @classmethod
    def _known_flags(cls, value: list[str]) -> list[str]:
        return _known("flag", value, FLAG_KINDS)

    def results_fingerprint(self) -> str:
        """SHA-256 over everything a sample's result depends on (model, device, seed, explainers,
        checks, faithfulness): a stored result with another fingerprint is recomputed."""
        from ..cache import canonical_json, xmllm_version

        keys = {"model": self.model, "device": self.device, "seed": self.seed, "explainers": self.explainers,
                "checks": self.checks, "faithfulness": self.faithfulness.model_dump(), "reports": self.reports,
                "max_new_tokens": self.max_new_tokens,
                "xmllm": xmllm_version()}
        if self.device_map is not None or self.device_memory is not None or self.offload_folder is not None:
            keys["device_map"] = self.device_map or "auto"  # only when set, so earlier audits' results stay valid
        return hashlib.sha256(canonical_json(keys).encode("utf-8")).hexdigest()


class LoadedConfig:
    """A validated config with the folder its relative paths are relative to."""

    def __init__(self, config: AuditConfig, path: Path, model_spec: str) -> None:
        self.config = config
        self.path = path
        self.root = path.parent.resolve()
        self.model_spec = model_spec
        """``model`` as the loader takes it: a folder relative to the config resolved, else as written."""

    def resolve(self, rel: str) -> Path:
        return (self.root / Path(rel).expanduser()).resolve()

    @property
    def output(self) -> Path:
        return self.resolve(self.config.output)

    def public(self) -> dict[str, Any]:
        """The config as the summary shows it: everything but the output folder and the executor
        (neither changes results, so two runs into two folders, or on Ray, summarise the same;
        ``run.json`` says how a run was executed)."""
        data = json.loads(self.config.model_dump_json())
        data.pop("output", None)
        data.pop("executor", None)
        data["model"] = self.config.model
        return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> LoadedConfig:
    """Read ``path`` safely (:mod:`xmllm.safe_yaml`: no Python tags, bounded aliases and
    size, no duplicate keys) and validate it whole, explainer parameters included, before any
    model work; ``overrides`` are dotted keys (``executor.kind``) set on top, as the command line
    gives them."""
    from xmllm.safe_yaml import YamlError, load_yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = load_yaml(path)
    except YamlError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of fields (name, model, samples, ...)")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    for old, new in RENAMED_FIELDS.items():
        if old in data:
            raise ConfigError(f"{path}: field {old} is now called {new}: rename the key '{old}:' to '{new}:'")
    try:
        config = AuditConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_first_error(exc)}") from None
    _check_device(config, path)
    config = _check_dispatch(config, path)
    loaded = LoadedConfig(config, path, config.model)
    local = loaded.resolve(config.model)
    if config.model != "demo" and local.is_dir():
        loaded.model_spec = str(local)
    return loaded


def _check_device(config: AuditConfig, path: Path) -> None:
    """``device: cuda`` (or ``cuda:N``, ``mps``) on a machine without it: a one-line error naming
    the field, before any model work. Only where the models run on this machine: the local
    executor, or Ray without an address (a local instance); a cluster's nodes are not this one."""
    if config.device in ("auto", "cpu") or (config.executor.kind == "ray" and config.executor.address):
        return
    from xmllm.explainers.models.errors import ModelLoadError
    from xmllm.explainers.models.loading import resolve_device

    try:
        resolve_device(config.device)  # checks the device is there (models.loading.check_device)
    except ModelLoadError as exc:
        message = _one_line(exc).replace("--device ", "device: ")
        raise ConfigError(f"{path}: field device: {message}") from None


def _check_dispatch(config: AuditConfig, path: Path) -> AuditConfig:
    """``device_map`` (or ``device_memory``, ``offload_folder``) without accelerate, or naming a GPU
    this machine lacks: a one-line error before any model work; a relative offload folder made
    relative to the config file."""
    if config.device_map is None and config.device_memory is None and config.offload_folder is None:
        return config
    from xmllm.explainers.models.dispatch import check_device_memory, parse_device_memory, require_accelerate
    from xmllm.explainers.models.errors import ModelLoadError

    field = "device_map" if config.device_map is not None else (
        "device_memory" if config.device_memory is not None else "offload_folder")
    try:
        require_accelerate(field)
        if not (config.executor.kind == "ray" and config.executor.address):
            check_device_memory(parse_device_memory(config.device_memory, "device_memory"), "device_memory")
    except ModelLoadError as exc:
        raise ConfigError(f"{path}: field {field}: {_one_line(exc)}") from None
    if config.offload_folder is not None and not Path(config.offload_folder).expanduser().is_absolute():
        folder = (path.parent.resolve() / Path(config.offload_folder).expanduser()).resolve()
        config = config.model_copy(update={"offload_folder": str(folder)})
    return config


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[last] = value


def _first_error(exc: ValidationError) -> str:
    """``field samples.path: Field required`` for the first error (and how many more there are)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part)) or "(top level)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    return f"field {loc}: {_one_line(message)}{more}"


def _is_union_tag(part: Any) -> bool:
    return part in ("jsonl", "image_folder", "hf_dataset")


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())
