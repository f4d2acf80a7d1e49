"""One sample's audit, computed where the model is (this process, or a Ray actor).

The worker gets a :class:`SampleTask` (the sample with its file bytes, so no shared file system
is needed) and returns a :class:`SampleOutput`: every file of the sample's folder as bytes and
its record. The driver writes them (:mod:`.store`), so the local and Ray executors produce
byte-identical folders. Any failure of the sample (unreadable image, empty answer, an
explainer's error) becomes a record with ``status: failed`` and a one-line error.
"""
from __future__ import annotations

import errno
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import AuditConfig
from .sources import AuditItem

RUN = "run"
"""Sub-folder of a sample's folder holding its saved run (explanations.npz, manifest.json, images, report.html)."""
RECORD = "record.json"
TIMINGS = "timings.json"
RANDOM = "random"
SCRATCH = "scratch"
"""Folder of the cache (``$XMLLM_CACHE_DIR``, else ``~/.cache/xmllm``) holding each sample's work in
progress, not TMPDIR: ``audit-<pid>-...``, removed when the sample is done, and by the next run's
workers when a killed process (``kill -9``) could not."""
SCRATCH_PREFIX = "audit-"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def scratch_root() -> Path:
    """Where workers on this machine keep their scratch folders (a Ray node's own cache)."""
    from ..cache import default_cache_dir

    return default_cache_dir() / SCRATCH


@dataclass(frozen=True)
class SampleTask:
    item: AuditItem
    input_sha256: str
    image_bytes: bytes | None = None
    mask_bytes: bytes | None = None
    read_error: str | None = None
    more_bytes: tuple[bytes, ...] = ()
    """The second and later pictures' bytes."""


@dataclass(frozen=True)
class SampleOutput:
    key: str
    files: dict[str, bytes]
    record: dict[str, Any]


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs, as plain data (Ray ships it to actors)."""

    config: dict[str, Any]
    model_spec: str
    fingerprint: str
    device: str | None = None
    """Overrides the config's device (a Ray actor with a GPU uses ``cuda``)."""


class AuditWorker:
    """One model, loaded once; :meth:`process` audits samples one at a time."""

    def __init__(self, spec: WorkerSpec) -> None:
        from xmllm.explainers.models import load_model
        from xmllm.explainers.models.errors import ModelLoadError

        from xmllm.errors import XmllmError
        from xmllm.explainers.methods.inference import VisualReliance

        from ..pipeline import make_plan
        from ..runner import needs_attention

        self.spec = spec
        self.config = AuditConfig.model_validate(spec.config)
        self.ids = list(self.config.explainers)
        # planned once per worker: every sample runs the same explainers with the same parameters
        self.plan = make_plan(self.ids, self.config.explainers, seed=self.config.seed,
                              max_new_tokens=self.config.max_new_tokens)
        self.reliance = make_plan([VisualReliance.id], seed=self.config.seed)
        """Visual reliance, which every audited sample gets (its scores go into the record)."""
        try:
            placed = self._dispatch()
            self.loaded = load_model(spec.model_spec, device="auto" if placed else spec.device or self.config.device,
                                     eager_attention=needs_attention(self.ids), **placed)
        except ModelLoadError as exc:
            raise XmllmError(f"model {spec.model_spec}: {exc}") from None
        from xmllm.files import remove_stale

        self.scratch = scratch_root()
        remove_stale(self.scratch, SCRATCH_PREFIX)

    def _dispatch(self) -> dict[str, Any]:
        """The config's ``device_map``, ``device_memory`` and ``offload_folder`` (the map spreads the
        model over the GPUs the worker sees, a Ray actor's included)."""
        config = self.config
        if config.device_map is None and config.device_memory is None and config.offload_folder is None:
            return {}
        return {"device_map": config.device_map or "auto", "device_memory": config.device_memory,
                "offload_folder": config.offload_folder}

    def ready(self) -> bool:
        return True

    def process(self, task: SampleTask) -> SampleOutput:
        item = task.item
        record: dict[str, Any] = {
            "id": item.id, "index": item.index, "key": item.key, "question": item.question,
            "expected": item.expected, "image": item.image_name, "input_sha256": task.input_sha256,
            "fingerprint": self.spec.fingerprint, "status": "ok", "error": None,
        }
        if item.more_images or item.video:
            record["pictures"] = "video" if item.video else 1 + len(item.more_images)
        if item.extra.get("evidence_image") is not None:
            record["evidence_image"] = int(item.extra["evidence_image"])
        timings: dict[str, float] = {}
        folder = self._scratch()
        try:
            try:
                if task.read_error:
                    raise _SampleFailure(task.read_error)
                self._audit(task, folder, record, timings)
            except Exception as exc:  # noqa: BLE001 - a sample's failure is recorded, the run goes on
                if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                    raise  # the machine's fault, not the sample's: every sample would fail the same way
                record.update(status="failed", error=_one_line(exc, folder, item))
                for name in ("answer", "correct", "reliance", "checks", "faithfulness"):
                    record.pop(name, None)
            for spilled in (_input_path(folder, item), folder / "mask.png"):
                spilled.unlink(missing_ok=True)  # inputs are not outputs
            record["flags"] = flags_of(record, self.config.flags)
            _write_json(folder / RECORD, record)
            _write_json(folder / TIMINGS, {k: round(v, 4) for k, v in timings.items()})
            files = {p.relative_to(folder).as_posix(): p.read_bytes()
                     for p in sorted(folder.rglob("*")) if p.is_file()}
        except OSError as exc:  # the scratch folder's disk is full or read-only
            raise self._scratch_error(exc) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return SampleOutput(item.key, files, record)

    def _scratch(self) -> Path:
        from xmllm.files import scratch_dir

        try:
            return scratch_dir(self.scratch, SCRATCH_PREFIX)
        except OSError as exc:
            raise self._scratch_error(exc) from None

    def _scratch_error(self, exc: OSError) -> Exception:
        from xmllm.errors import XmllmError

        return XmllmError(f"scratch folder {self.scratch}: cannot write: {exc.strerror or exc} "
                          "(set XMLLM_CACHE_DIR to a writable folder with free space)")

    # --- the steps ---------------------------------------------------------------------------------

    def _sample(self, task: SampleTask, folder: Path):
        import numpy as np

        from xmllm.explainers.prepared import ExplainSample
        from xmllm.images import load_image

        item = task.item
        if item.video:  # the frames that fit the model's context (or those asked for), as pictures
            from ..video import DEFAULT_FRAMES, frames_for, load_video, video_record

            path = _spill(task.image_bytes, _input_path(folder, item))
            clip = frames_for(self.loaded, load_video(path, item.frames or DEFAULT_FRAMES), item.question,
                               item.frames, self.plan)
            record = {**video_record(clip), "path": str(item.image)}
            return ExplainSample(list(clip.frames), item.question, id=item.id, expected=item.expected,
                                 extra={**item.extra, "video": record})
        image = load_image(_spill(task.image_bytes, _input_path(folder, item)))
        pictures = [image] + [load_image(_spill(data, folder / f"input-{k + 1}{_suffix(path.name)}"))
                              for k, (data, path) in enumerate(zip(task.more_bytes, item.more_images))]
        mask = None
        if task.mask_bytes is not None:
            mask = np.asarray(load_image(_spill(task.mask_bytes, folder / "mask.png"), mode="L")) >= 128
            if mask.shape != (image.height, image.width):
                raise _SampleFailure(f"{item.mask}: mask is {mask.shape[1]}x{mask.shape[0]} pixels but the image is "
                                     f"{image.width}x{image.height}")
        return ExplainSample(pictures, item.question, id=item.id, expected=item.expected, mask=mask,
                             extra=dict(item.extra))

    def _audit(self, task: SampleTask, folder: Path, record: dict[str, Any], timings: dict[str, float]) -> None:
        import time

        import torch

        from xmllm.explainers.answering import is_correct

        from ..runner import run_explainers

        config, seed = self.config, self.config.seed
        sample = self._sample(task, folder)
        for spilled in (_input_path(folder, task.item), folder / "mask.png", *folder.glob("input-*")):
            spilled.unlink(missing_ok=True)  # inputs are not outputs
        # the audit scores faithfulness itself (config steps and baseline, with a random floor)
        from xmllm.explainers.memory import memory_budget

        with memory_budget(config.max_memory):
            result = run_explainers(self.loaded, sample, self.plan, faithfulness=False)
        record["skipped"] = dict(result.manifest.get("skipped") or {})
        timings.update(result.manifest.pop("timings_seconds", {}))
        for exp in result.explanations:  # seconds vary run to run; they live in timings.json
            exp.meta.pop("seconds", None)
        prepared = result.prepared
        record["answer"] = prepared.answer.text
        record["answer_cut"] = prepared.answer.cut
        record["correct"] = None if not item_expected(record) else is_correct(prepared.answer.text, record["expected"])

        t = time.perf_counter()
        reliance_id = self.reliance.labels[0]
        reliance = next((e for e in result.explanations if e.explainer == reliance_id), None)
        if reliance is None:
            from ..pipeline import run_plan

            reliance = next(run_plan(self.loaded, prepared, self.reliance)).explanation
            result.explanations.append(reliance)
            result.manifest["explainers"] = [*result.manifest["explainers"], reliance_id]
        record["reliance"] = {k: _num(reliance.scores[k]) for k in
                              ("reliant_share", "mean_drop_blank", "mean_drop_noised", "vcd_agreement")}
        timings["reliance"] = time.perf_counter() - t

        from .checks import CHECKS

        record["checks"] = {}
        for name in config.checks:
            t = time.perf_counter()
            torch.manual_seed(seed)
            record["checks"][name] = CHECKS[name](prepared, seed)
            timings[f"check.{name}"] = time.perf_counter() - t

        record["carried_by"] = carried_by(result)

        record["faithfulness"] = {}
        if config.faithfulness.enabled:
            t = time.perf_counter()
            record["faithfulness"] = self._faithfulness(result, prepared)
            timings["faithfulness"] = time.perf_counter() - t

        result.manifest["audit"] = {"fingerprint": self.spec.fingerprint, "input_sha256": task.input_sha256}
        t = time.perf_counter()
        result.save(folder / RUN, report=config.reports)  # element ids seeded by the run: identical on every audit
        timings["save"] = time.perf_counter() - t

    def _faithfulness(self, result: Any, prepared: Any) -> dict[str, Any]:
        from xmllm.explainers.metrics import faithfulness_many, primary_image_map, random_map, unmaskable

        fc, seed = self.config.faithfulness, self.config.seed
        described, maps = {}, {}
        for exp in result.explanations:
            scored = primary_image_map(exp)
            if scored is not None:
                maps[exp.explainer], described[exp.explainer] = scored.values, scored.describe()
        if not maps or unmaskable(self.loaded) is not None:
            return {}
        shape = next(iter(maps.values())).shape
        maps[RANDOM], described[RANDOM] = random_map(shape, seed), "uniform random map (the floor)"
        got = faithfulness_many(self.loaded, prepared, maps, baseline=fc.baseline, steps=fc.steps, seed=seed)
        return {name: {"map": described[name], "deletion_area": _num(v["deletion_area"]),
                       "insertion_area": _num(v["insertion_area"])} for name, v in got.items()}


def carried_by(result: Any) -> dict[str, dict[str, Any]]:
    """With several pictures (or frames): per explainer that ranks cells, the picture (1-based) with
    the largest share of its map, and that share."""
    from xmllm.explainers.metrics.image_shares import image_shares
    from xmllm.explainers.registry import registered

    out: dict[str, dict[str, Any]] = {}
    if len(result.images) < 2:
        return out
    for exp in result.explanations:
        declared = registered().get(exp.explainer)
        shares = image_shares(exp, result.manifest.get("layouts"), len(result.images))
        if shares is not None and declared is not None and declared.ranks_cells:
            out[exp.explainer] = {"image": shares.carrier + 1, "share": round(shares.shares[shares.carrier], 4)}
    return out


def item_expected(record: dict[str, Any]) -> bool:
    return isinstance(record.get("expected"), str) and bool(record["expected"].strip())


def flags_of(record: dict[str, Any], kinds: list[str]) -> list[dict[str, str]]:
    """Why a sample deserves a look, in the config's flag kinds; each with a one-line detail."""
    found: dict[str, str] = {}
    if record["status"] == "failed":
        found["failed"] = record["error"] or "failed"
    if record.get("correct") is False:
        found["wrong"] = f"answered {record.get('answer')!r}, expected {record.get('expected')!r}"
    pope = (record.get("checks") or {}).get("pope") or {}
    if pope.get("hallucination"):
        found["hallucination"] = f"said yes to an absent object: {pope['absent']['question']!r}"
    blank = (record.get("checks") or {}).get("blank_image") or {}
    if blank.get("unchanged"):
        found["unchanged_without_image"] = f"the same answer {blank.get('answer')!r} with a blank image"
    carried, evidence = record.get("carried_by") or {}, record.get("evidence_image")
    if carried and evidence is not None:
        votes = [v["image"] for v in carried.values()]
        top = max(sorted(set(votes)), key=votes.count)
        if top != evidence:
            said = ", ".join(f"{k} {v['share']:.0%}" for k, v in carried.items() if v["image"] == top)
            found["unexpected_image"] = f"carried by picture {top} ({said}), the evidence is in picture {evidence}"
    faith = record.get("faithfulness") or {}
    floor = (faith.get(RANDOM) or {}).get("deletion_area")
    worse = [name for name, v in faith.items() if name != RANDOM and floor is not None
             and v.get("deletion_area") is not None and v["deletion_area"] >= floor]
    if worse:
        found["unfaithful"] = f"deletion area no better than a random map's: {', '.join(worse)}"
    return [{"kind": kind, "detail": found[kind]} for kind in kinds if kind in found]


class _SampleFailure(Exception):
    """A sample that cannot be audited; the message is already one line."""


def _spill(data: bytes | None, path: Path) -> Path:
    if data is None:
        raise _SampleFailure("no image")
    path.write_bytes(data)
    return path


def _input_path(folder: Path, item: AuditItem) -> Path:
    return folder / ("input" + _suffix(item.image_name))


def _suffix(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return suffix if suffix.isascii() and suffix[1:].isalnum() and len(suffix) <= 6 else ".img"


def _one_line(exc: BaseException, folder: Path, item: AuditItem) -> str:
    """The error in one line; the worker's scratch paths replaced by the sample's own file name."""
    from xmllm.errors import XmllmError

    text = str(exc) if isinstance(exc, (XmllmError, _SampleFailure)) else f"{type(exc).__name__}: {exc}"
    shown = str(item.image) if item.image is not None else item.image_name
    text = text.replace(str(_input_path(folder, item)), shown)
    text = text.replace(str(folder / "mask.png"), str(item.mask))
    text = text.replace(str(folder), "<scratch>")
    return " ".join(text.split())[:500] or type(exc).__name__


def _num(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
