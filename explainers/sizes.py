"""Reading a memory size (``20GB``, ``24GiB``, ``512MiB``): what the memory budget and the device map's
per-device limits share. No dependencies, so the model loader can use it."""
from __future__ import annotations

import math
import re

from xmllm import XmllmError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([a-zA-Z]*)\s*$")


class MemorySizeError(XmllmError, ValueError):
    """A memory size that cannot be read (one line)."""


def parse_memory(text: str | int | float, what: str = "--max-memory") -> int:
    """Bytes in a size such as ``20GB``, ``24GiB``, ``512MiB``, ``1.5e9`` or ``2000000000``.

    Decimal units (kB, MB, GB, TB; K, M, G, T) are powers of 1000, binary ones (KiB, MiB, GiB,
    TiB) powers of 1024; case does not matter. A one-line :class:`~xmllm.errors.XmllmError`
    (also a ValueError) names ``what`` otherwise.
    """
    if isinstance(text, bool):
        raise MemorySizeError(f"{what} {text!r}: expected a size such as 20GB, 24GiB or 512MiB")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _SIZE.match(str(text))
        unit = match.group(3).lower() if match else None
        if match is None or unit not in _UNITS:
            raise MemorySizeError(f"{what} {text!r}: expected a size such as 20GB, 24GiB or 512MiB "
                               "(units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")
        try:
            value = float(f"{match.group(1)}e{match.group(2) or 0}") * _UNITS[unit]
        except OverflowError:  # pragma: no cover - float() gives inf rather than raising
            value = math.inf
    if not math.isfinite(value) or value < 1:
        raise MemorySizeError(f"{what} {text!r}: must be a positive number of bytes")
    return int(value)
