"""Keep freed memory in the process (glibc), so that batched CPU forwards do not page-fault.

glibc's ``malloc`` serves blocks above its mmap threshold by ``mmap`` and unmaps them on ``free``,
and trims the heap top back to the system; a batched forward allocates and frees activations of
a few MiB per operation, so every such block is fresh memory whose pages fault on first touch.
On the demo model that is a fifth of batched occlusion's wall time (``sys`` time a third of
``user`` in ``xmllm bench``). Raising both thresholds keeps freed blocks in the heap for the next
forward, as PyTorch's caching allocator does on a GPU. The cost: the process returns memory to the
system only at exit, so its resident size stays at its peak. Numbers are unchanged; only where the
bytes come from changes.

The ``xmllm`` command turns this on at start; a library user calls :func:`keep_freed_memory`.
``XMLLM_KEEP_FREED_MEMORY=0`` leaves the allocator as it is; other C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter numbers (malloc.h)."""
MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc's largest mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``): blocks up to
this size come from the heap and are reused."""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the heap top kept before glibc gives any back."""
OPT_OUT = "XMLLM_KEEP_FREED_MEMORY"

_state: str | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None  # musl and other C libraries have no mallopt to tune
    version.restype = ctypes.c_char_p
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory() -> str:
    """Tune glibc to keep freed memory (once per process); returns what the allocator now does,
    for the benchmark's header."""
    global _state
    if _state is not None:
        return _state
    if os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        _state = f"system default ({OPT_OUT}=0)"
        return _state
    libc = _glibc()
    if libc is None:
        _state = "system default (not glibc)"
        return _state
    version = libc.gnu_get_libc_version().decode()
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        _state = f"glibc {version}, system default (mallopt refused)"
        return _state
    _state = f"glibc {version}, freed memory kept (blocks up to {MMAP_THRESHOLD >> 20} MiB reused)"
    return _state


def allocator_state() -> str:
    """What :func:`keep_freed_memory` did in this process, or that it has not run."""
    return _state or "system default (not tuned)"
