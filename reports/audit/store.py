"""The audit's output folder: one folder per sample, written whole or not at all.

Layout of ``OUT/``::

    samples/<key>/record.json      the sample's results (answer, reliance, checks, faithfulness, flags)
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
from pathlib import Path
from typing import Any

from xmllm.files import make_dir, nearest_existing, remove_stale, replace_dir, scratch_dir, write_atomic

from xmllm.errors import XmllmError
from .worker import RECORD, SampleOutput

SAMPLES = "samples"
_TMP = ".tmp-"
_OLD = ".old-"
SITE_SCRATCH = ".site-"
"""Prefix of the site folder's scratch copy (``.site-<pid>-...``), swept on the next run if its process died."""
MARKER = ".xmllm-audit"
"""Written into every audit folder: only an empty folder or one holding it is written into."""


class OutputError(XmllmError):
    """The output folder cannot be written (read-only, full disk, a file in the way): one line
    naming the path and the system's reason."""

    def __init__(self, path: Path, exc: OSError) -> None:
        reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
        super().__init__(f"output {path}: cannot write: {reason}")


class AuditStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.samples = self.root / SAMPLES
        self._opened = False

    def check(self) -> None:
        """Refuse, before any model work and without writing anything, an output that is not a
        folder, a non-empty folder that is not an audit, or one that cannot be written."""
        if self.root.exists() and not self.root.is_dir():
            raise XmllmError(f"output {self.root}: exists and is not a folder")
        if self.root.is_dir() and any(self.root.iterdir()) and not (self.root / MARKER).is_file():
            raise XmllmError(f"output {self.root}: a non-empty folder that is not an xmllm audit; choose a new folder")
        existing = nearest_existing(self.root)
        if not existing.is_dir():
            raise XmllmError(f"output {self.root}: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            reason = "read-only file system" if _read_only_fs(existing) else "permission denied"
            raise XmllmError(f"output {self.root}: cannot write into {existing} ({reason})")

    def open(self) -> None:
        """Make (or reopen) the folder and sweep what an interrupted run left half-made: called
        when the first result is ready, so a run whose model cannot load writes nothing. A folder
        made here is removed again when the open fails (a full disk)."""
        if self._opened:
            return
        self.check()
        made = self.root
        while not made.parent.exists() and made.parent != made:
            made = made.parent
        made = None if made.exists() else made
        try:
            make_dir(self.samples)
            if not (self.root / MARKER).is_file():
                write_atomic(self.root / MARKER, "xmllm run\n")
            self.sweep()
        except OSError as exc:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
            raise OutputError(self.root, exc) from None
        self._opened = True

    def sweep(self) -> None:
        """Remove what processes that ended without cleaning up (``kill -9``) left: half-made
        sample folders, folders renamed aside, the site's scratch copy, temporary files. Folders
        of a process still running (another ``xmllm run`` on this folder) are left alone."""
        remove_stale(self.samples, _TMP)
        remove_stale(self.samples, _OLD)
        remove_stale(self.root, SITE_SCRATCH)
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
        """Write the sample's files into a scratch folder, then rename it into place (modes follow
        the umask); a write that fails (a full disk) leaves no scratch behind."""
        self.open()
        final = self.folder(out.key)
        try:
            tmp = scratch_dir(self.samples, _TMP)
        except OSError as exc:
            raise OutputError(final, exc) from None
        try:
            for rel, data in out.files.items():
                path = tmp / rel
                if not path.resolve().is_relative_to(tmp.resolve()):
                    raise XmllmError(f"sample {out.key}: refusing to write {rel!r} outside its folder")
                make_dir(path.parent)
                with path.open("wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            replace_dir(tmp, final, old=self.samples / f"{_OLD}{os.getpid()}-{out.key}")
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(final, exc) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
