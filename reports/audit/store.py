"""The audit's output folder: one folder per sample, written whole or not at all.

Layout of ``OUT/``::

    samples/<key>/record.json      the sample's results (answer, reliance, probes, faithfulness, flags)
    samples/<key>/timings.json     seconds per step (kept out of the record: they vary run to run)
    samples/<key>/run/             explanations.npz, manifest.json, image_0.png, report.html
    audit.json, summary.html       the audit summary (written last)
    site/                          Markdown pages and copied reports for ``xmllm build --audit OUT``

``<key>`` is a hash of the sample's id. A sample's folder is built under a temporary name and
renamed into place, so after ``kill -9`` a folder is either complete or absent; leftovers are
removed on the next run, which recomputes only what is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from xmllm.explainers.files import replace_dir

from ..explainers.errors import XmllmError
from .worker import RECORD, SampleOutput

SAMPLES = "samples"
_TMP = ".tmp-"
_OLD = ".old-"
MARKER = ".xmllm-audit"
"""Written into every audit folder: only an empty folder or one holding it is written into."""


class AuditStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.samples = self.root / SAMPLES

    def open(self) -> None:
        """Make (or reopen) the folder and sweep what an interrupted run left half-made."""
        if self.root.exists() and not self.root.is_dir():
            raise XmllmError(f"output {self.root}: exists and is not a folder")
        if self.root.is_dir() and any(self.root.iterdir()) and not (self.root / MARKER).is_file():
            raise XmllmError(f"output {self.root}: a non-empty folder that is not an xmllm audit; choose a new folder")
        self.samples.mkdir(parents=True, exist_ok=True)
        (self.root / MARKER).write_text("xmllm run\n", encoding="utf-8")
        for leftover in self.samples.iterdir():
            if leftover.name.startswith((_TMP, _OLD)):
                shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.root.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)

    def folder(self, key: str) -> Path:
        return self.samples / key

    def record(self, key: str) -> dict[str, Any] | None:
        """The stored record of ``key``, or None when absent or unreadable."""
        try:
            data = json.loads((self.folder(key) / RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def commit(self, out: SampleOutput) -> Path:
        """Write the sample's files into a temporary folder, then rename it into place."""
        final = self.folder(out.key)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP}{out.key[:8]}-", dir=self.samples))
        try:
            for rel, data in out.files.items():
                path = tmp / rel
                if not path.resolve().is_relative_to(tmp.resolve()):
                    raise XmllmError(f"sample {out.key}: refusing to write {rel!r} outside its folder")
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            os.chmod(tmp, 0o755)
            replace_dir(tmp, final, old=final.with_name(f"{_OLD}{out.key}-{os.getpid()}"))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
