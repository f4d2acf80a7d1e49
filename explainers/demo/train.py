"""Training recipe of the demo model, reproducible on two CPU cores.

A plain end-to-end run learns the answer priors and stalls around 50%. The recipe is a
curriculum in three stages:

1. **Vision pretraining.** The CLIP tower learns, for each 16x16 patch, the colour and
   the shape of the object covering it, whether an object's centre lies in it, and its
   own row and column (labels come from the world's ground truth). Shape is the slow
   one: a patch sees a quarter of an object, so the tower must learn to combine
   neighbours; that takes about 1,000 steps, after which every feature is read off with
   a per-patch loss below 0.01. The tower's state is saved (``vision.pt``) so that the
   answer stage can be rerun without repeating this one.
2. **Answer training.** The tower is frozen, so its features are computed once for a
   fixed training set; the projector and the decoder then learn to answer from those
   cached features (loss on the answer tokens only). The forward is exactly the LLaVA
   forward (image features scattered into the token embeddings at the image-token
   positions), without recomputing the tower every step, which makes each step about
   three times cheaper.

3. **Pictures and clips** (:mod:`.train_pictures`). The vocabulary grows by the words of the
   questions over two pictures and three-frame clips, and the projector and decoder go on learning
   on batches that are half single-image questions and half questions over several pictures.

Every random choice comes from the seed in :class:`TrainConfig`, so the same config on the
same machine gives the same weights bit for bit.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .recipe import TrainConfig
from .answer_data import (answer_batch, answer_sample, cached_features, cosine_lr, first_token_right,
                          forward_from_features)
from .checkpoints import SINGLE_IMAGE_KEYS, config_matches, load_weights, matches_first_cycle, save
from .model import PATCH_SIZE, build_model, build_processor
from .samples import DemoSample, generate_sample, TRAIN_STREAM
from .train_pictures import grow_checkpoint, train_pictures
from .world import COLOURS, IMAGE_SIZE, SHAPES

COLOUR_CLASSES = ("none", *COLOURS)
SHAPE_CLASSES = ("none", *SHAPES)
GRID = IMAGE_SIZE // PATCH_SIZE


def patch_labels(sample: DemoSample, coverage: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patch colour class, shape class and object-centre flag, each (GRID*GRID,).
    (Row and column targets are the patch's own index, added in :class:`PatchHeads`.)"""
    masks = sample.scene.object_masks()  # (n, H, W)
    colour = np.zeros(GRID * GRID, dtype=np.int64)
    shape = np.zeros(GRID * GRID, dtype=np.int64)
    centre = np.zeros(GRID * GRID, dtype=np.int64)
    if len(masks):
        cover = masks.reshape(len(masks), GRID, PATCH_SIZE, GRID, PATCH_SIZE).mean(axis=(2, 4))
        cover = cover.reshape(len(masks), -1)
        best = cover.argmax(axis=0)
        has = cover.max(axis=0) >= coverage
        for p in np.flatnonzero(has):
            obj = sample.scene.objects[best[p]]
            colour[p] = COLOUR_CLASSES.index(obj.colour)
            shape[p] = SHAPE_CLASSES.index(obj.shape)
        for obj in sample.scene.objects:
            r = min(int(obj.cy // PATCH_SIZE), GRID - 1)
            c = min(int(obj.cx // PATCH_SIZE), GRID - 1)
            centre[r * GRID + c] = 1
    return colour, shape, centre


class PatchHeads(nn.Module):
    """Linear read-outs of the vision tower's patch features (training only)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.colour = nn.Linear(hidden, len(COLOUR_CLASSES))
        self.shape = nn.Linear(hidden, len(SHAPE_CLASSES))
        self.centre = nn.Linear(hidden, 2)
        self.row = nn.Linear(hidden, GRID)
        self.col = nn.Linear(hidden, GRID)

    def loss(self, feats: torch.Tensor, labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ce = nn.functional.cross_entropy
        parts = {
            "colour": ce(self.colour(feats).flatten(0, 1), labels["colour"].flatten()),
            "shape": ce(self.shape(feats).flatten(0, 1), labels["shape"].flatten()),
            "centre": ce(self.centre(feats).flatten(0, 1), labels["centre"].flatten()),
        }
        # where each patch is: RoPE puts position into attention scores, not into values,
        # so the features themselves must say where they are for "left of" to be readable
        idx = torch.arange(GRID * GRID, device=feats.device).expand(feats.shape[0], -1)
        parts["row"] = ce(self.row(feats).flatten(0, 1), (idx // GRID).flatten())
        parts["col"] = ce(self.col(feats).flatten(0, 1), (idx % GRID).flatten())
        return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}


def training_sample(step: int, index: int, describe_every: int) -> DemoSample:
    """Sample ``index`` of training step ``step``; every ``describe_every``-th is a description."""
    describe = describe_every and index % describe_every == describe_every - 1
    return generate_sample(step, index, "describe" if describe else None, stream=(TRAIN_STREAM,))


class TrainingBatches(torch.utils.data.IterableDataset):
    """Batches from the training stream: step ``s`` always yields the same samples."""

    def __init__(self, processor, steps: range, batch: int, coverage: float, with_text: bool, describe_every: int):
        self.processor, self.steps, self.batch = processor, steps, batch
        self.coverage, self.with_text, self.describe_every = coverage, with_text, describe_every


    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for step in self.steps:
            samples = [training_sample(step, i, self.describe_every if self.with_text else 0) for i in range(self.batch)]
            yield collate(self.processor, samples, self.coverage, self.with_text)


def collate(processor, samples: list[DemoSample], coverage: float, with_text: bool) -> dict[str, torch.Tensor]:
    """Pixels, patch labels and (for answer training) left-padded prompt+answer ids."""
    images = [s.image() for s in samples]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    labels = [patch_labels(s, coverage) for s in samples]
    out = {
        "pixel_values": pixels,
        "colour": torch.from_numpy(np.stack([l[0] for l in labels])),
        "shape": torch.from_numpy(np.stack([l[1] for l in labels])),
        "centre": torch.from_numpy(np.stack([l[2] for l in labels])),
    }
    if with_text:
        out.update(answer_batch(processor, samples))
    return out


def _loader(processor, steps: range, cfg: TrainConfig, with_text: bool):
    return torch.utils.data.DataLoader(
        TrainingBatches(processor, steps, cfg.batch, cfg.coverage, with_text, cfg.describe_every),
        batch_size=None, num_workers=1, prefetch_factor=4, persistent_workers=False,
    )


def train(out_dir: Path, cfg: TrainConfig | None = None, log=print) -> dict:
    """Run the whole recipe and save ``final/`` and ``early/`` checkpoints under ``out_dir``.

    Stage 1 leaves ``out_dir/vision.pt``; a rerun with the same config resumes from it.
    """
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    processor = build_processor(pictures=False)
    model = build_model(processor.tokenizer, seed=cfg.seed)
    t0 = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    single = out_dir / "single"
    if cfg.picture_cycles and config_matches(single, cfg, SINGLE_IMAGE_KEYS):
        load_weights(model, single)
        history = json.loads((single / "xmllm_training.json").read_text())["history"]
        log(f"single-image stages resumed from {single}")
    else:
        history = _single_image_stages(model, processor, out_dir, cfg, t0, log)
    steps = cfg.qa_steps + cfg.restart_steps
    if cfg.picture_cycles:
        if not config_matches(single, cfg, SINGLE_IMAGE_KEYS):
            save(model, processor, single, cfg, history, steps)
        processor = train_pictures(model, out_dir, cfg, history, t0, log)
        steps += sum(n for n, _ in cfg.picture_cycles)
        if grow_checkpoint(out_dir / "early", cfg):
            log(f"early checkpoint {out_dir / 'early'}: vocabulary grown to the final model's")
    save(model, processor, out_dir / "final", cfg, history, steps)
    return {"seconds": time.time() - t0, "history": history}


def _single_image_stages(model, processor, out_dir: Path, cfg: TrainConfig, t0: float, log) -> dict:
    """Stages 1 and 2 (vision pretraining, answer training) on ``model``; returns the history."""
    tower = model.model.vision_tower
    heads = PatchHeads(tower.config.hidden_size)
    history: dict[str, list] = {"vision": [], "qa": []}
    stage1 = out_dir / "vision.pt"
    stage1_key = {k: v for k, v in asdict(cfg).items() if k in ("seed", "batch", "vision_steps", "vision_lr", "warmup", "coverage")}
    if stage1.is_file() and (saved := torch.load(stage1, weights_only=True))["config"] == stage1_key:
        model.load_state_dict(saved["model"])
        history["vision"] = json.loads(saved["history"])
        log(f"vision stage resumed from {stage1}")
    else:
        _train_vision(model, heads, processor, cfg, history, t0, log)
        tmp = stage1.with_suffix(".tmp")
        torch.save({"config": stage1_key, "model": model.state_dict(), "history": json.dumps(history["vision"])}, tmp)
        tmp.replace(stage1)

    # Stage 2: frozen tower, cached features, the rest learns to answer.
    tower.eval()
    tower.requires_grad_(False)
    samples = [answer_sample(i, cfg) for i in range(cfg.qa_samples)]
    feats = cached_features(tower, processor, samples)
    log(f"cached tower features of {len(samples)} samples in {time.time() - t0:.0f}s")
    cycles = [(cfg.qa_steps, cfg.qa_lr)] + ([(cfg.restart_steps, cfg.restart_lr)] if cfg.restart_steps else [])
    first = out_dir / "cycle-1"
    done = 0
    if len(cycles) > 1 and matches_first_cycle(first, cfg):
        load_weights(model, first)
        history = json.loads((first / "xmllm_training.json").read_text())["history"]
        done = 1
        log(f"first answer cycle resumed from {first}")
    for cycle, (steps, lr) in enumerate(cycles[done:], start=done):
        offset = sum(n for n, _ in cycles[:cycle])
        _answer_cycle(model, processor, samples, feats, cfg, history, t0, log, out_dir,
                      cycle=cycle, steps=steps, lr=lr, offset=offset)
        if cycle == 0 and len(cycles) > 1:
            save(model, processor, first, cfg, history, steps)
    return history


def _answer_cycle(model, processor, samples, feats, cfg: TrainConfig, history: dict, t0: float, log, out_dir: Path,
                  *, cycle: int, steps: int, lr: float, offset: int) -> None:
    """One cosine cycle of answer training with a fresh optimiser; its draws come from a
    generator seeded by (seed, cycle), so a resumed cycle is the same as an uninterrupted one."""
    tower = model.model.vision_tower
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    draw = torch.Generator().manual_seed(cfg.seed if cycle == 0 else cfg.seed * 1000 + cycle)
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, cfg.warmup)
        idx = torch.randint(0, len(samples), (cfg.batch,), generator=draw)
        batch = answer_batch(processor, [samples[i] for i in idx])
        logits = forward_from_features(model, feats[idx], batch)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        at = offset + step
        if step % 100 == 0 or step == steps - 1:
            history["qa"].append({"step": at, "answer_loss": float(loss.detach()), "t": time.time() - t0})
            log(f"answer {at:5d}  loss {float(loss.detach()):.4f}  {time.time() - t0:.0f}s")
        if cycle == 0 and step + 1 == cfg.early_step:
            save(model, processor, out_dir / "early", cfg, history, step + 1)
        if cfg.monitor_every and ((step + 1) % cfg.monitor_every == 0 or step + 1 == steps):
            acc = monitor_accuracy(model, processor, tower)
            history["monitor"] = [*history.get("monitor", []), {"step": at + 1, **acc}]
            log(f"answer {at + 1:5d}  first-token accuracy " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))
            model.train()


def _train_vision(model, heads: PatchHeads, processor, cfg: TrainConfig, history: dict, t0: float, log) -> None:
    """Stage 1: the vision tower learns what is where."""
    tower = model.model.vision_tower
    opt = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=cfg.vision_lr, weight_decay=0.01)
    model.train()
    for step, batch in enumerate(_loader(processor, range(cfg.vision_steps), cfg, with_text=False)):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.vision_steps, cfg.vision_lr, cfg.warmup)
        feats = tower(pixel_values=batch["pixel_values"]).last_hidden_state[:, 1:]
        loss, parts = heads.loss(feats, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.vision_steps - 1:
            history["vision"].append({"step": step, "loss": float(loss.detach()), **parts, "t": time.time() - t0})
            log(f"vision {step:5d}  loss {float(loss.detach()):.4f}  " + "  ".join(f"{k} {v:.3f}" for k, v in parts.items()))


def monitor_accuracy(model, processor, tower, n: int = 500, seed: int = 1) -> dict[str, float]:
    """Teacher-forced first-answer-token accuracy per question type on fresh samples: every
    evaluated answer is one token, so this equals greedy exact match."""
    from .samples import generate_samples

    samples = generate_samples(n, seed)
    model.eval()
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        feats = cached_features(tower, processor, samples)
    for s, ok in zip(samples, first_token_right(model, processor, feats, samples)):
        hits.setdefault(s.question_type, []).append(ok)
    return {"all": sum(map(sum, hits.values())) / n, **{f: sum(v) / len(v) for f, v in hits.items()}}


