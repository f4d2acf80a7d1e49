"""Hooks that are always taken off the model again.

Explainers read and edit forwards through the adapter's stable hook points instead of forked model
code. A hook left behind would make the next explainer run on an edited (or still recorded) model,
so every hook is added inside a :class:`Hooks` block, which removes it however the block ends.
"""
from __future__ import annotations

from typing import Any, TypeVar

Handle = TypeVar("Handle")


class Hooks:
    """Hooks that live exactly as long as a ``with`` block: every handle added is removed when the
    block ends, also when the forward raises or a later registration fails.

    Handles are torch ``RemovableHandle``s: module forward and pre-forward hooks, and tensor
    ``register_hook`` handles alike.
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def add(self, handle: Handle) -> Handle:
        """Keep ``handle`` for removal; returns it."""
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every handle added so far, last added first (the ``with`` block's end does this)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
