"""Token text as readers see it, for anything that prints a tokenizer's pieces (the report, an
explainer's why-panel sentence)."""
from __future__ import annotations


def show_token(token: str) -> str:
    """A tokenizer's piece as readers see it: BPE space and newline markers made visible."""
    return token.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\u21b5").replace("\n", "\u21b5")
