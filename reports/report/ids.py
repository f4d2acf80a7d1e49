"""Stable element ids in a rendered report, so that a run renders to the same bytes every time.

Bokeh names its models with a process-wide counter (``p1234``: it depends on what the process
rendered before) and its documents and root elements with ``uuid.uuid4()``. While a report is
rendered inside :func:`stable_bokeh_ids`, the counter starts from a fixed base and the UUIDs come
from a generator seeded by the run (its sample, explainers and seed): unique within the page (all
a page needs), the same on every render, in every process and on every audit worker.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
import threading
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

ID_BASE = 10**9
"""Where the counter restarts: above any id a process hands out otherwise, so no id can repeat
one of a model made outside the block."""
_LOCK = threading.Lock()


@contextlib.contextmanager
def stable_bokeh_ids(seed: str) -> Iterator[None]:
    from bokeh.util import serialization

    rng = random.Random(int.from_bytes(hashlib.sha256(seed.encode("utf-8")).digest()[:8], "big"))
    shim = SimpleNamespace(uuid4=lambda: uuid.UUID(int=rng.getrandbits(128), version=4))
    with _LOCK:
        saved_uuid, saved_counter = serialization.uuid, serialization._simple_id
        serialization.uuid, serialization._simple_id = shim, ID_BASE
        try:
            yield
        finally:
            serialization.uuid = saved_uuid
            serialization._simple_id = max(saved_counter, 0)
