"""Scratch folders and the cache's root: what both layers need to keep work in progress out of the way.

In the core because the model loader keeps offloaded blocks in a scratch folder under the cache
(:mod:`xmllm.explainers.models.dispatch`); the application layer (``xmllm.files``, ``xmllm.cache``)
uses the same functions.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def default_cache_dir() -> Path:
    """``$XMLLM_CACHE_DIR``, else ``xmllm`` in the user's cache folder (``$XDG_CACHE_HOME`` or
    ``~/.cache``): one cache for every folder xmllm is run from, never inside a checkout."""
    if os.environ.get("XMLLM_CACHE_DIR"):
        return Path(os.environ["XMLLM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "xmllm"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dir(path: Path) -> Path:
    """``mkdir -p`` whose new folders get the mode a plain ``mkdir`` gives (the umask applies)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def scratch_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder ``parent/<prefix><pid>-<random>`` for work in progress.

    Its name carries the process id, so that :func:`remove_stale` can tell a folder left by a
    process that was killed from one in use; its mode follows the umask (``mkdtemp`` would make
    it private, and it may become the output itself)."""
    make_dir(parent)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    os.chmod(path, 0o777 & ~_umask())
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Delete the :func:`scratch_dir` folders under ``parent`` whose process has ended (killed,
    say, before it could clean up); returns what was removed."""
    removed = []
    if not Path(parent).is_dir():
        return removed
    for path in Path(parent).glob(f"{prefix}*"):
        pid, sep, _ = path.name[len(prefix):].partition("-")
        if sep and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
