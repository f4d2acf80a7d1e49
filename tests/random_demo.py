"""A demo-architecture model with random weights, saved like a checkpoint: real forwards in tests
without waiting for trained weights. Usage: ``load_model(save_random_demo(tmp_path / "m"))``."""
from __future__ import annotations

from pathlib import Path

SEED = 0


def save_random_demo(folder: Path, seed: int = SEED) -> Path:
    """Save the demo LLaVA (random weights, the demo's processor) into ``folder``; returns it. The
    single-image vocabulary: the random weights (and so the answers tests rely on, several tokens
    long) stay those the suite was written against."""
    from xmllm.explainers.demo.model import build_model, build_processor

    if (folder / "config.json").is_file():
        return folder
    processor = build_processor(pictures=False)
    model = build_model(processor.tokenizer, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
