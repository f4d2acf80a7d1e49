"""Training recipe of the demo model, reproducible on two CPU cores.

A plain end-to-end run learns the answer priors and stalls around 50%. The recipe is a
curriculum in two stages:

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

Every random choice comes from the seed in :class:`TrainConfig`, so the same config on the
same machine gives the same weights bit for bit.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .model import PATCH_SIZE, build_model, build_processor
from .questions import QUESTION_TYPES
from .samples import DemoSample, generate_sample, TRAIN_STREAM
from .world import COLOURS, IMAGE_SIZE, SHAPES

COLOUR_CLASSES = ("none", *COLOURS)
SHAPE_CLASSES = ("none", *SHAPES)
GRID = IMAGE_SIZE // PATCH_SIZE


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


def answer_sample(i: int, cfg: TrainConfig) -> DemoSample:
    """Sample ``i`` of the answer-training set: a description or a question type from the mix."""
    if cfg.describe_every and i % cfg.describe_every == cfg.describe_every - 1:
        qtype = "describe"
    else:
        qtype = cfg.answer_mix[(i - i // cfg.describe_every if cfg.describe_every else i) % len(cfg.answer_mix)]
    return generate_sample(i // cfg.batch, i % cfg.batch, qtype, stream=(TRAIN_STREAM,))


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


def answer_batch(processor, samples: list[DemoSample]) -> dict[str, torch.Tensor]:
    """Prompt through the chat template, then answer tokens and EOS; loss on those only."""
    tok = processor.tokenizer
    seqs, targets = [], []
    for s in samples:
        ids = _prompt_ids(processor, s.text)
        answer = tok(s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(ids + answer)
        targets.append([-100] * len(ids) + answer)
    width = max(map(len, seqs))
    pad = tok.pad_token_id
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (ids, tgt) in enumerate(zip(seqs, targets)):
        input_ids[r, width - len(ids):] = torch.tensor(ids)
        labels[r, width - len(ids):] = torch.tensor(tgt)
        mask[r, width - len(ids):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "position_ids": position_ids}


_PROMPTS: dict[str, list[int]] = {}


def _prompt_ids(processor, question: str) -> list[int]:
    """Token ids of the chat-templated prompt with its image tokens expanded (memoised:
    the world has a few hundred distinct questions)."""
    if question not in _PROMPTS:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        _PROMPTS[question] = processor.tokenizer(expand_image_tokens(processor, prompt), add_special_tokens=True)["input_ids"]
    return _PROMPTS[question]


def expand_image_tokens(processor, prompt: str) -> str:
    """The prompt with its ``<image>`` expanded exactly as the processor expands it."""
    n = processor._get_num_multimodal_tokens(image_sizes=[(IMAGE_SIZE, IMAGE_SIZE)])["num_image_tokens"][0]
    return prompt.replace(processor.image_token, processor.image_token * n)


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


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
    processor = build_processor()
    model = build_model(processor.tokenizer, seed=cfg.seed)
    tower = model.model.vision_tower
    heads = PatchHeads(tower.config.hidden_size)
    history: dict[str, list] = {"vision": [], "qa": []}
    t0 = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
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
    if len(cycles) > 1 and _matches_first_cycle(first, cfg):
        _load_weights(model, first)
        history = json.loads((first / "xmllm_training.json").read_text())["history"]
        done = 1
        log(f"first answer cycle resumed from {first}")
    for cycle, (steps, lr) in enumerate(cycles[done:], start=done):
        offset = sum(n for n, _ in cycles[:cycle])
        _answer_cycle(model, processor, samples, feats, cfg, history, t0, log, out_dir,
                      cycle=cycle, steps=steps, lr=lr, offset=offset)
        if cycle == 0 and len(cycles) > 1:
            save(model, processor, first, cfg, history, steps)
    save(model, processor, out_dir / "final", cfg, history, sum(n for n, _ in cycles))
    return {"seconds": time.time() - t0, "history": history}


FIRST_CYCLE_KEYS = ("seed", "batch", "vision_steps", "vision_lr", "qa_samples", "qa_steps", "qa_lr", "warmup",
                    "early_step", "describe_every", "answer_mix", "coverage")
"""The settings that determine the first answer cycle's weights (a saved first cycle with the
same values is reused)."""


def _matches_first_cycle(folder: Path, cfg: TrainConfig) -> bool:
    meta = folder / "xmllm_training.json"
    if not (folder / "config.json").is_file() or not meta.is_file():
        return False
    saved = json.loads(meta.read_text())["train_config"]
    ours = json.loads(json.dumps(asdict(cfg)))
    return all(saved.get(k) == ours[k] for k in FIRST_CYCLE_KEYS)


def _load_weights(model, folder: Path) -> None:
    """The weights of a saved checkpoint into ``model``, through the same loader users have."""
    from transformers import LlavaForConditionalGeneration

    saved = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    model.load_state_dict(saved.state_dict(), strict=True)


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
            g["lr"] = _lr(step, steps, lr, cfg.warmup)
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
            g["lr"] = _lr(step, cfg.vision_steps, cfg.vision_lr, cfg.warmup)
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
        batch = answer_batch(processor, samples)
        logits = forward_from_features(model, feats, batch)
        first = (batch["labels"] != -100).float().argmax(-1)
        rows = torch.arange(len(samples))
        right = logits[rows, first - 1].argmax(-1) == batch["labels"][rows, first]
    for s, ok in zip(samples, right.tolist()):
        hits.setdefault(s.question_type, []).append(ok)
    return {"all": sum(map(sum, hits.values())) / n, **{f: sum(v) / len(v) for f, v in hits.items()}}


def cached_features(tower, processor, samples: list[DemoSample], chunk: int = 256) -> torch.Tensor:
    """The frozen tower's patch features (CLS dropped, as LLaVA's "default" strategy does)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(samples), chunk):
            pixels = processor.image_processor([s.image() for s in samples[i:i + chunk]], return_tensors="pt")["pixel_values"]
            out.append(tower(pixel_values=pixels).last_hidden_state[:, 1:])
    return torch.cat(out)


def forward_from_features(model, feats: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """LLaVA's forward from precomputed tower features: project them, scatter them into the
    token embeddings at the image-token positions, run the decoder; returns the logits."""
    embeds = model.get_input_embeddings()(batch["input_ids"])
    is_image = (batch["input_ids"] == model.config.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(is_image, model.model.multi_modal_projector(feats).to(embeds.dtype))
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).last_hidden_state
    return model.lm_head(hidden)


def save(model, processor, folder: Path, cfg: TrainConfig, history: dict, qa_step: int) -> None:
    """Hugging Face format plus the recipe that produced it."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    meta = {"train_config": asdict(cfg), "answer_steps_done": qa_step, "history": history,
            "question_types": list(QUESTION_TYPES)}
    (folder / "xmllm_training.json").write_text(json.dumps(meta, indent=1))
