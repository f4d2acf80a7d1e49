"""``run_audit``: read the set, skip what is done, compute the rest on an executor, summarise.

A stored sample is reused when its record carries this config's results fingerprint and the
same input hash (image bytes, question, expected answer, mask, extra ground truth); a failed one
is reused too unless ``retry_failed``. Each finished sample is written at once (see
:mod:`.store`), so an interrupted run loses at most the samples in flight. The output folder is
checked first but made only when the first result is ready: a model that cannot load leaves
nothing behind.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmllm.errors import XmllmError
from .config import LoadedConfig
from .sources import AuditItem, read_bytes, read_items
from .store import AuditStore
from .worker import SampleOutput, SampleTask, WorkerSpec


class SampleFailed(XmllmError):
    """``--fail-fast``: the first failing sample stops the run (its record is kept)."""


@dataclass
class AuditOutcome:
    out: Path
    total: int
    computed: int
    reused: int
    failed: int
    flagged: int
    seconds: float
    executor: dict[str, Any] = field(default_factory=dict)
    summary: Path | None = None


def input_sha256(item: AuditItem, image: bytes | None, mask: bytes | None, error: str | None,
                 more: tuple[bytes, ...] = ()) -> str:
    """What the sample's result depends on besides the config."""
    h = hashlib.sha256()
    for part in (item.id, item.question, item.expected or "", json.dumps(item.extra, sort_keys=True, default=str),
                 error or ""):
        h.update(part.encode("utf-8") + b"\0")
    for blob in (image, mask):
        h.update(hashlib.sha256(blob or b"").digest())
    if more or item.video:  # several pictures, or a video cut to a number of frames (single images hash as before)
        h.update(f"video:{item.video}:{item.frames}".encode())
        for blob in more:
            h.update(hashlib.sha256(blob).digest())
    return h.hexdigest()


def make_task(item: AuditItem) -> SampleTask:
    """The sample with its files' bytes; a missing or oversized file is a per-sample error."""
    error = None
    image = mask = None
    more: tuple[bytes, ...] = ()
    try:
        image = item.image_bytes if item.image_bytes is not None else read_bytes(item.image)
        mask = read_bytes(item.mask)
        more = tuple(read_bytes(path) or b"" for path in item.more_images)
    except XmllmError as exc:
        error = str(exc)
    return SampleTask(item, input_sha256(item, image, mask, error, more), image, mask, error, more)


def run_audit(loaded: LoadedConfig, out: Path | None = None, *, fail_fast: bool = False, retry_failed: bool = False,
              progress: bool = True) -> AuditOutcome:
    from tqdm import tqdm

    from .executor import EXECUTORS
    from .site import write_summary

    t0 = time.perf_counter()
    config = loaded.config
    out = Path(out) if out is not None else loaded.output
    items = read_items(loaded)  # structural errors stop here, before any model work
    store = AuditStore(out)
    store.check()  # an output that cannot be written stops here too; nothing is written until a result is ready
    fingerprint = config.results_fingerprint()
    todo: list[AuditItem] = []
    reused = 0
    for item in items:
        task = make_task(item)
        stored = store.record(item.key)
        if (stored is not None and stored.get("fingerprint") == fingerprint and stored.get("id") == item.id
                and stored.get("input_sha256") == task.input_sha256
                and not (retry_failed and stored.get("status") == "failed")):
            reused += 1
            continue
        todo.append(item)  # its bytes are read again when its turn comes: a big set never sits in memory
    counts = {"computed": 0, "failed": 0}
    executor: dict[str, Any] = {"executor": config.executor.kind, "workers": 0}
    bar = tqdm(total=len(items), initial=reused, desc="auditing", unit="sample", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        def done(output: SampleOutput) -> None:
            store.commit(output)
            counts["computed"] += 1
            bar.update(1)
            if output.record["status"] == "failed":
                counts["failed"] += 1
                bar.set_postfix_str(f"{counts['failed']} failed")
                if fail_fast:
                    raise SampleFailed(f"sample {output.record['id']!r} failed: {output.record['error']} "
                                       "(--fail-fast; its record is in the output folder)")

        if todo:
            spec = WorkerSpec(json.loads(config.model_dump_json()), loaded.model_spec, fingerprint)
            executor = EXECUTORS[config.executor.kind](_lazy(todo), spec, config.executor, done)
    finally:
        bar.close()
    records = [store.record(item.key) for item in items]
    missing = [item.id for item, rec in zip(items, records) if rec is None]
    if missing:
        raise XmllmError(f"output {out}: no result for sample {missing[0]!r} after the run (was a file removed?)")
    seconds = time.perf_counter() - t0
    store.open()  # sweeps what a killed run left (a half-written site) when every sample was reused
    summary = write_summary(loaded, out, records, run_info={**executor, "computed": counts["computed"],
                                                             "reused": reused, "seconds": round(seconds, 3)})
    return AuditOutcome(out, len(items), counts["computed"], reused,
                        sum(r["status"] == "failed" for r in records), sum(bool(r["flags"]) for r in records),
                        time.perf_counter() - t0, executor, summary)


def _lazy(items: list[AuditItem]) -> Iterator[SampleTask]:
    for item in items:
        yield make_task(item)
