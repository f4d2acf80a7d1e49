"""The demo recipe's settings: every knob of a training run, saved next to the weights."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Every knob of a training run; saved next to the weights."""

    seed: int = 0
    batch: int = 64
    vision_steps: int = 1500
    vision_lr: float = 3e-3
    qa_samples: int = 80000
    """Size of the fixed answer-training set whose tower features are cached."""
    qa_steps: int = 6000
    qa_lr: float = 2e-3
    warmup: int = 100
    early_step: int = 300
    threads: int = 2
    describe_every: int = 4
    """Every n-th answer-training sample asks for a description (a dense training signal)."""
    answer_mix: tuple[str, ...] = (
        "colour", "shape", "count", "presence", "position", "count", "presence", "position", "position")
    """Question types of the other answer-training samples, cycled: the multi-hop types
    (position, then count and presence) learn last, so they get more of the data."""
    restart_steps: int = 3000
    """Steps of a second answer-training cycle (warm restart: fresh optimiser, a new cosine
    schedule from ``restart_lr``); 0 for one cycle. The first cycle's cosine tail leaves the
    slow question types (position, count) still climbing; a restart lets them go on."""
    restart_lr: float = 1e-3
    monitor_every: int = 500
    """Answer-stage steps between accuracy checks on fresh samples (user seed 1; logging only)."""
    coverage: float = 0.2
    """Share of a patch an object must cover for the patch to carry its label."""
    picture_cycles: tuple[tuple[int, float], ...] = ((3000, 1e-3),)
    """Stage 3 (:mod:`.train_pictures`): (steps, peak learning rate) of each cosine cycle over several
    pictures and clips; empty for a single-image model."""
    picture_samples: int = 40000
    """Size of stage 3's fixed set of questions over several pictures (features cached per picture)."""
    picture_single_samples: int = 40000
    """Size of stage 3's single-image set (the first samples of stage 2's), half of every batch."""
    picture_mix: tuple[str, ...] = ("which_picture", "count_pictures", "motion", "which_frame", "count_pictures", "motion")
    """Question types of stage 3's picture samples, cycled: summing over pictures and motion get more."""
