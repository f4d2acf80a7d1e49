"""Saved checkpoints of the demo recipe: Hugging Face folders with the recipe that made them, and
which saved stage a rerun of the same config may go on from."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .pictures import ORDINALS, PICTURE_QUESTION_TYPES
from .questions import QUESTION_TYPES

if TYPE_CHECKING:  # pragma: no cover
    from .recipe import TrainConfig


FIRST_CYCLE_KEYS = ("seed", "batch", "vision_steps", "vision_lr", "qa_samples", "qa_steps", "qa_lr", "warmup",
                    "early_step", "describe_every", "answer_mix", "coverage")
"""The settings that determine the first answer cycle's weights (a saved first cycle with the
same values is reused)."""


SINGLE_IMAGE_KEYS = (*FIRST_CYCLE_KEYS, "restart_steps", "restart_lr")
"""The settings that determine the single-image model of stages 1-2."""


def config_matches(folder: Path, cfg: "TrainConfig", keys: tuple[str, ...]) -> bool:
    """Whether ``folder`` holds a checkpoint saved by a config with ``cfg``'s values of ``keys``."""
    meta = folder / "xmllm_training.json"
    if not (folder / "config.json").is_file() or not meta.is_file():
        return False
    saved = json.loads(meta.read_text())["train_config"]
    ours = json.loads(json.dumps(asdict(cfg)))
    return all(saved.get(k) == ours[k] for k in keys)


def matches_first_cycle(folder: Path, cfg: "TrainConfig") -> bool:
    return config_matches(folder, cfg, FIRST_CYCLE_KEYS)


def reads_pictures(vocabulary: dict[str, int]) -> bool:
    """Whether a vocabulary has the words of the questions over several pictures (stage 3 grew it)."""
    return ORDINALS[0] in vocabulary


def load_weights(model, folder: Path) -> None:
    """The weights of a saved checkpoint into ``model``, through the same loader users have."""
    from transformers import LlavaForConditionalGeneration

    saved = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    model.load_state_dict(saved.state_dict(), strict=True)


def save(model, processor, folder: Path, cfg: "TrainConfig", history: dict, qa_step: int) -> None:
    """Hugging Face format plus the recipe that produced it."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    meta = {"train_config": asdict(cfg), "answer_steps_done": qa_step, "history": history,
            "question_types": [*QUESTION_TYPES, *(PICTURE_QUESTION_TYPES if reads_pictures(processor.tokenizer.get_vocab())
                                                  else ())]}
    (folder / "xmllm_training.json").write_text(json.dumps(meta, indent=1))
