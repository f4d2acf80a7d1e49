"""Stage 3 of the demo recipe: questions over several pictures and short clips.

The single-image model of stages 1-2 (:mod:`.train`) is the start: its vocabulary grows by the new
questions' words (every earlier word keeps its id; new rows start at the mean of the old ones), the
tower stays frozen, and the projector and decoder learn on batches that are half single-image
questions (so those stay at their level) and half questions over two pictures or three frames.
Features are cached per picture, as in stage 2; a sample's pictures are scattered into its image
tokens in order, exactly as LLaVA's forward scatters several images.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .answer_data import (answer_batch, answer_sample, cached_features_of_images, cosine_lr, first_token_right,
                          forward_from_features)
from .checkpoints import SINGLE_IMAGE_KEYS, config_matches, load_weights, reads_pictures, save
from .model import build_model, build_processor
from .pictures import by_group
from .samples import TRAIN_STREAM, DemoSample, generate_picture_samples, generate_sample
from .samples import generate_samples


def picture_training_sample(i: int, mix: tuple[str, ...], batch: int) -> DemoSample:
    """Sample ``i`` of the stage-3 training set, its question type cycling through ``mix``."""
    return generate_sample(i // batch, i % batch, mix[i % len(mix)], stream=(TRAIN_STREAM,))


def extend_vocabulary(model, tokenizer) -> None:
    """Grow the embedding and output rows to ``tokenizer``'s size; earlier rows are kept, new rows
    are drawn around the mean of the old ones (transformers' mean resizing)."""
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def grow_checkpoint(folder: Path, cfg) -> bool:
    """Grow a single-image checkpoint's vocabulary in place (as stage 3 grows the model's), so that it
    reads the same prompts as the final model: the early checkpoint, which ``training.compare`` sets
    beside the final one and which needs the same vocabulary. Its single-image answers are unchanged.
    Returns whether it grew (False: already grown, or no checkpoint)."""
    meta_path = folder / "xmllm_training.json"
    if not meta_path.is_file() or reads_pictures(saved_vocabulary(folder)):
        return False
    meta = json.loads(meta_path.read_text())
    base = build_processor(pictures=False)
    model = build_model(base.tokenizer, seed=cfg.seed)
    load_weights(model, folder)
    torch.manual_seed(cfg.seed + 4)
    processor = build_processor(pictures=True)
    extend_vocabulary(model, processor.tokenizer)
    save(model, processor, folder, cfg, meta["history"], meta["answer_steps_done"])
    return True


def saved_vocabulary(folder: Path) -> dict[str, int]:
    """The vocabulary of a saved checkpoint's tokenizer."""
    return json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]


class PictureFeatures:
    """The frozen tower's features of every picture of a list of samples, and where each sample's are."""

    def __init__(self, tower, processor, samples: list[DemoSample], chunk: int = 512):
        self.count = [len(s.scene.scenes) if s.several else 1 for s in samples]
        self.start = [0, *itertools.accumulate(self.count[:-1])]
        parts, pending = [], []  # rendered as they are needed: all the pictures of 80,000 samples take gigabytes
        for s in samples:
            pending.extend(s.images())
            while len(pending) >= chunk:  # the tower sees the same groups of ``chunk`` pictures as in one list
                parts.append(cached_features_of_images(tower, processor, pending[:chunk], chunk))
                pending = pending[chunk:]
        if pending:
            parts.append(cached_features_of_images(tower, processor, pending, chunk))
        self.feats = torch.cat(parts)

    def batch(self, indices: list[int]) -> torch.Tensor:
        """Every picture's features of the samples at ``indices``, in order: ``(pictures, tokens, hidden)``."""
        return torch.cat([self.feats[self.start[i]:self.start[i] + self.count[i]] for i in indices])


def train_pictures(model, out_dir: Path, cfg, history: dict, t0: float, log) -> object:
    """Stage 3 on ``model`` (the single-image model); returns the processor with the grown vocabulary."""
    torch.manual_seed(cfg.seed + 3)
    processor = build_processor(pictures=True)
    extend_vocabulary(model, processor.tokenizer)
    tower = model.model.vision_tower
    tower.eval()
    tower.requires_grad_(False)
    singles = [answer_sample(i, cfg) for i in range(cfg.picture_single_samples)]
    several = [picture_training_sample(i, cfg.picture_mix, cfg.batch) for i in range(cfg.picture_samples)]
    single_feats = PictureFeatures(tower, processor, singles)
    several_feats = PictureFeatures(tower, processor, several)
    log(f"cached tower features of {len(singles)} single-image and {len(several)} picture samples "
        f"({len(several_feats.feats)} pictures) in {time.time() - t0:.0f}s")
    history.setdefault("pictures", [])
    done = 0
    for cycle, (steps, lr) in enumerate(cfg.picture_cycles):
        folder = out_dir / f"pictures-{cycle + 1}"
        if _matches(folder, cfg, cycle):
            load_weights(model, folder)
            history.update(json.loads((folder / "xmllm_training.json").read_text())["history"])
            log(f"picture cycle {cycle + 1} resumed from {folder}")
        else:
            _cycle(model, processor, singles, single_feats, several, several_feats, cfg, history, t0, log,
                   cycle=cycle, steps=steps, lr=lr, offset=done)
            save(model, processor, folder, cfg, history, done + steps)
        done += steps
    return processor


PICTURE_SET_KEYS = ("picture_samples", "picture_single_samples", "picture_mix")
"""The settings that determine stage 3's training sets (the cycles are compared up to the one asked for)."""


def _matches(folder: Path, cfg, cycle: int) -> bool:
    """Whether ``folder`` holds picture cycle ``cycle`` of this very config (and all before it)."""
    if not (folder / "model.safetensors").is_file() or not config_matches(folder, cfg, (*SINGLE_IMAGE_KEYS,
                                                                                          *PICTURE_SET_KEYS)):
        return False
    saved = json.loads((folder / "xmllm_training.json").read_text())["train_config"]
    ours = json.loads(json.dumps(asdict(cfg)))
    return saved.get("picture_cycles", [])[:cycle + 1] == ours["picture_cycles"][:cycle + 1]


def _cycle(model, processor, singles, single_feats, several, several_feats, cfg, history, t0, log, *,
           cycle: int, steps: int, lr: float, offset: int) -> None:
    """One cosine cycle; each batch is half single-image, half picture samples."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    draw = torch.Generator().manual_seed(cfg.seed * 1000 + 300 + cycle)
    half = cfg.batch // 2
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, cfg.warmup)
        a = torch.randint(0, len(singles), (half,), generator=draw).tolist()
        b = torch.randint(0, len(several), (cfg.batch - half,), generator=draw).tolist()
        opt.zero_grad(set_to_none=True)
        # the halves go through the decoder apart (a single-image prompt is a third of a clip's: padded
        # together, two thirds of its row would be padding); the loss is still the batch's token mean
        halves = [([singles[i] for i in a], single_feats.batch(a)), ([several[i] for i in b], several_feats.batch(b))]
        batches = [answer_batch(processor, part) for part, _ in halves]
        tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
        loss = 0.0
        for (_, feats), batch in zip(halves, batches):
            logits = forward_from_features(model, feats, batch)
            part = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                               reduction="sum") / tokens
            part.backward()
            loss += float(part.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        at = offset + step
        if step % 100 == 0 or step == steps - 1:
            history["pictures"].append({"step": at, "answer_loss": loss, "t": time.time() - t0})
            log(f"pictures {at:5d}  loss {loss:.4f}  {time.time() - t0:.0f}s")
        if cfg.monitor_every and ((step + 1) % cfg.monitor_every == 0 or step + 1 == steps):
            acc = picture_monitor(model, processor)
            history["picture_monitor"] = [*history.get("picture_monitor", []), {"step": at + 1, **acc}]
            log(f"pictures {at + 1:5d}  first-token accuracy " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))
            model.train()


def picture_monitor(model, processor, n: int = 400, seed: int = 1) -> dict[str, float]:
    """Teacher-forced first-answer-token accuracy on fresh single-image and picture samples (user
    seed 1; logging only): every evaluated answer is one token, so this equals greedy exact match."""
    tower = model.model.vision_tower
    samples = generate_samples(n, seed) + generate_picture_samples(n, seed)
    model.eval()
    hits: dict[str, list[bool]] = {}
    for lo in range(0, len(samples), 100):
        part = samples[lo:lo + 100]
        feats = PictureFeatures(tower, processor, part).batch(list(range(len(part))))
        for s, ok in zip(part, first_token_right(model, processor, feats, part)):
            hits.setdefault(s.question_type, []).append(ok)
    groups = by_group(hits)
    return {**{g: sum(v) / len(v) for g, v in groups.items()}, **{t: sum(v) / len(v) for t, v in hits.items()}}
