"""Outputs written whole or not at all: a file or folder appears under its name only once complete.

Everything xmllm writes (explanations, manifests, reports, audit records, sample sets, site
folders) goes through here, so that an interrupted run never leaves a half-written file where a
reader, a cache or a resumed audit would take it for a finished one.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from xmllm.explainers.scratch import _umask, make_dir, remove_stale, scratch_dir  # noqa: F401  (re-exported)


def atomic(path: Path, write: Callable[[IO[Any]], Any], binary: bool = False) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place; the file gets
    the mode a plain ``open`` would give it (``mkstemp`` makes it private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """``path`` replaced whole by ``data`` (text as UTF-8)."""
    atomic(path, lambda fh: fh.write(data), binary=isinstance(data, bytes))


def replace_dir(staged: Path, final: Path, old: Path | None = None) -> None:
    """Put the finished folder ``staged`` in ``final``'s place; the previous ``final`` is first
    renamed aside (to ``old``, by default a hidden name beside it) and removed only after; when
    the second rename fails, the previous folder is put back."""
    aside = None
    if final.exists():
        aside = old if old is not None else final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, aside)
    try:
        os.replace(staged, final)
    except BaseException:
        if aside is not None and not final.exists():
            os.replace(aside, final)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def nearest_existing(path: Path) -> Path:
    """``path`` itself, or its nearest ancestor that exists (a link counts): where its first new
    folder would be made, so that is where writability is decided."""
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: Path) -> Path:
    """Create and remove an empty file in ``folder``, or in its nearest existing ancestor when it
    does not exist yet (where its first new folder would be made); returns the folder checked.

    Raises the system's ``OSError`` (a read-only file system, no permission, no inodes or no
    blocks left) before any costly work: access bits alone would not do, since root passes them
    on a read-only mount."""
    checked = nearest_existing(Path(folder))
    if not checked.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(checked))
    fd, tmp = tempfile.mkstemp(dir=checked, prefix=".xmllm-writable-", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)
    st = os.statvfs(checked)  # an empty file takes no blocks: a full disk shows here
    if (st.f_bfree if os.geteuid() == 0 else st.f_bavail) == 0:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(checked))
    return checked


def write_dir(final: Path, fill: Callable[[Path], Any]) -> Path:
    """Build the folder ``final`` whole or not at all: ``fill`` writes into a hidden sibling
    (``.<name>.tmp-<pid>-...``), which is then renamed into place, replacing an earlier ``final``.

    Any failure (a full disk) removes the sibling and the parent folders made for it, so that
    nothing half-written is left where a reader would take it for a finished folder; siblings
    left by killed processes are swept first."""
    final = Path(final).absolute()
    made = final.parent
    while not made.parent.exists() and made.parent != made:
        made = made.parent
    made = None if made.exists() else made
    prefix = f".{final.name}.tmp-"
    try:
        remove_stale(final.parent, prefix)
        tmp = scratch_dir(final.parent, prefix)
        try:
            fill(tmp)
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    return final


