"""A concept bottleneck read out of the model: probes for named concepts, and interventions on them.

Concept bottleneck models (Koh et al.) force a prediction through a layer of named concepts so that
a person can read, and edit, what the model believes. An image-text model has no such layer, but
its image features can be read the same way: per image patch, linear probes for the concepts the
demo world knows (object vs background, colour, shape, horizontal and vertical position), fitted
on the projector's features as the decoder reads them and on the vision tower's output, against
ground truth from ``extra["objects"]``. Whether the model *uses* what a probe reads is then tested
by intervening, as in a concept bottleneck: move the features of the asked-about object's patches
along the probe's direction from the true colour (shape) to another one, regenerate, and count
how often the answer becomes the new colour (shape), against a random direction of the same size.

Positions, never counts: patches are the grid cells of the adapter's layouts, placed on the
picture by each grid's region, so tiles, crops and dynamic resolutions are handled alike.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from xmllm import MissingInput

from ..answering import generate_answer, is_correct, normalise
from ..backward import default_cam_layer
from ..citations import ALAIN_BENGIO
from xmllm.explainers.prepared import ExplainSample, Prepared
from ..explanation import Explanation, Target
from ..forward import fused_attention
from ..hooks import Hooks
from ..linear_probe import LogisticProbe, train_logistic
from ..models import LoadedModel
from ..models.layout import ImageLayout, PatchGrid
from ..params import ExplainerParams, ParamError, param
from ..registry import Citation, Explainer, Need, register

GROUP = "design"
SITES: tuple[str, ...] = ("projector", "vision")
"""Where patch features are read: the decoder's input at the image-token positions (the projector's
output as the decoder reads it), and the vision block the projector reads, pooled per cell."""
PROJECTOR_SITE = "projector"
SITE_NOTES: dict[str, str] = {
    "projector": "decoder input at the image-token positions (the projector's output as the decoder reads it)",
    "vision": "vision block {layer} output, mean over the vision tokens feeding each cell",
}
HORIZONTAL: tuple[str, ...] = ("left", "centre", "right")
VERTICAL: tuple[str, ...] = ("top", "middle", "bottom")
BACKGROUND = "background"
DEFAULT_MIN_COVERAGE = 0.5
"""A cell belongs to an object when the object covers at least this share of its pixels; cells
touched by an object below it are left out of the probes (neither object nor background)."""
DEFAULT_TEST_FRACTION = 0.25
"""Share of the samples (not cells: cells of one image are not independent) held out for accuracy."""
DEFAULT_EDIT_COVERAGE = 0.2
"""Interventions edit every cell the object covers this much: edge cells carry its colour too (on a
partly trained demo model, editing only half-covered cells moved no answer; a fifth or more did)."""
DEFAULT_ALPHAS: tuple[float, ...] = (1.0, 2.0, 4.0)
"""Intervention strengths, in units of the step that mirrors the probe's margin (see :func:`concept_step`);
the first is the headline success rate's."""
PROBE_C = 1.0
"""Inverse L2 strength of the logistic-regression probes (scikit-learn's default)."""
PROBE_MAX_ITER = 2000
EDITABLE: dict[str, str] = {"colour": "colour", "shape": "shape"}
"""Question type -> the concept of the grounded object that the answer names."""

KOH = Citation("Concept Bottleneck Models", 2020, "2007.04612", "Koh, Nguyen, Tang, Mussmann, Pierson, Kim, Liang")
LABO = Citation("Language in a Bottle: Language Model Guided Concept Bottlenecks for Interpretable Image "
                "Classification (LaBo)", 2022, "2211.11158", "Yang, Panagopoulou, Zhou, Jin, Callison-Burch, Yatskar")
TCAV = Citation("Interpretability Beyond Feature Attribution: Quantitative Testing with Concept Activation Vectors "
                "(TCAV)", 2017, "1711.11279", "Kim, Wattenberg, Gilmer, Cai, Wexler, Viegas, Sayres")


# --- concepts ------------------------------------------------------------------------------------------


def _bin(fraction: float, names: tuple[str, ...]) -> str:
    return names[min(max(int(fraction * len(names)), 0), len(names) - 1)]


@dataclass(frozen=True)
class Concept:
    """A named concept: a patch's class from the object covering it (None: background)."""

    name: str
    label: Callable[[dict[str, Any] | None, tuple[int, int]], str | None]
    description: str


CONCEPTS: dict[str, Concept] = {
    c.name: c
    for c in (
        Concept("object", lambda o, hw: BACKGROUND if o is None else "object", "object vs background"),
        Concept("colour", lambda o, hw: None if o is None else str(o["colour"]), "the covering object's colour"),
        Concept("shape", lambda o, hw: None if o is None else str(o["shape"]), "the covering object's shape"),
        Concept("horizontal", lambda o, hw: None if o is None else _bin(float(o["cx"]) / hw[1], HORIZONTAL),
                "the covering object's centre: left, centre or right third of the image"),
        Concept("vertical", lambda o, hw: None if o is None else _bin(float(o["cy"]) / hw[0], VERTICAL),
                "the covering object's centre: top, middle or bottom third of the image"),
    )
}

OBJECT_KEYS = ("shape", "colour", "cx", "cy", "size")


def sample_objects(sample: ExplainSample, explainer: str) -> list[dict[str, Any]]:
    """The ground-truth objects of a sample, checked; a one-line error when absent or malformed."""
    objects = sample.extra.get("objects") if isinstance(sample.extra, dict) else None
    if not isinstance(objects, list):
        raise MissingInput(f"{explainer}: sample {sample.id!r} has no extra['objects'] (ground-truth objects); "
                         "concept probes need a labelled sample set such as the demo world's")
    for k, obj in enumerate(objects):
        missing = [key for key in OBJECT_KEYS if not isinstance(obj, dict) or key not in obj]
        if missing:
            raise MissingInput(f"{explainer}: sample {sample.id!r}: extra['objects'][{k}] lacks {missing[0]!r}")
    return objects


def object_masks(objects: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Boolean pixel masks of the objects, ``(objects, height, width)``, drawn by the demo world."""
    from ..demo.world import Scene

    scene = Scene.from_json([{key: obj[key] for key in OBJECT_KEYS} for obj in objects], size=max(height, width))
    if not objects:
        return np.zeros((0, height, width), dtype=bool)
    return scene.object_masks()[:, :height, :width]


def _cell_index(pixels: int, start: float, stop: float, cells: int) -> np.ndarray:
    """For each pixel (by its centre), the cell it falls in along one axis, or -1 outside the grid."""
    centres = (np.arange(pixels) + 0.5) / pixels
    index = np.floor((centres - start) / (stop - start) * cells).astype(int)
    return np.where((index >= 0) & (index < cells), index, -1)


def cell_coverage(masks: np.ndarray, grid: PatchGrid) -> np.ndarray | None:
    """Share of each cell's pixels that each object covers, ``(objects, rows, cols)`` (NaN for a cell
    no pixel centre falls in); None when the adapter cannot place the grid on the picture."""
    if grid.region is None:
        return None
    top, left, bottom, right = grid.region
    height, width = masks.shape[-2:]
    rows = np.eye(grid.rows + 1)[_cell_index(height, top, bottom, grid.rows)][:, : grid.rows].T  # (rows, H)
    cols = np.eye(grid.cols + 1)[_cell_index(width, left, right, grid.cols)][:, : grid.cols].T  # (cols, W)
    counts = np.outer(rows.sum(1), cols.sum(1))
    covered = np.einsum("rh,nhw,cw->nrc", rows, masks.astype(np.float64), cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, covered / np.where(counts > 0, counts, 1.0), np.nan)


@dataclass(frozen=True)
class Cell:
    """One grid cell of one sample: where its feature sits and what covers it."""

    sample: int
    position: int
    grid: str
    row: int
    col: int
    object: int | None
    """The object covering at least ``min_coverage`` of it, or None for a background cell."""


def labelled_cells(layout: ImageLayout, masks: np.ndarray, sample: int, min_coverage: float
                   ) -> tuple[list[Cell], dict[int, dict[int, float]]]:
    """The cells of every placed grid of one image that are clearly object or clearly background,
    and for each object the coverage of every cell (by position) it touches."""
    cells: list[Cell] = []
    touched: dict[int, dict[int, float]] = {}
    for grid in layout.grids:
        coverage = cell_coverage(masks, grid)
        if coverage is None:
            continue
        for r in range(grid.rows):
            for c in range(grid.cols):
                shares = coverage[:, r, c]
                if shares.size and np.isnan(shares).any():
                    continue
                position = int(grid.positions[r * grid.cols + c])
                for k in np.nonzero(shares > 0)[0].tolist():
                    touched.setdefault(k, {})[position] = float(shares[k])
                best = int(np.argmax(shares)) if shares.size else -1
                if best >= 0 and shares[best] >= min_coverage:
                    cells.append(Cell(sample, position, grid.name, r, c, best))
                elif not shares.size or shares.max() == 0:
                    cells.append(Cell(sample, position, grid.name, r, c, None))
    return cells, touched


# --- features --------------------------------------------------------------------------------------------


def _hidden_of(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class DecoderInputEdit:
    """A pre-hook on the first decoder block that adds ``delta`` to the hidden states at
    ``positions`` in the prompt forward (decode steps, shorter than the prompt, pass through)."""

    def __init__(self, positions: torch.Tensor, delta: torch.Tensor) -> None:
        self.positions = positions.long()
        self.delta = delta
        self.applied = 0

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        hidden = _hidden_of(args, kwargs)
        if self.positions.numel() == 0 or hidden.shape[1] <= int(self.positions.max()):
            return None
        hidden = hidden.clone()
        hidden[0, self.positions.to(hidden.device)] += self.delta.to(device=hidden.device, dtype=hidden.dtype)
        self.applied += 1
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


@contextlib.contextmanager
def edited_decoder_input(adapter: Any, edit: DecoderInputEdit) -> Iterator[DecoderInputEdit]:
    with Hooks() as hooks:
        hooks.add(adapter.decoder_layers()[0].register_forward_pre_hook(edit, with_kwargs=True))
        yield edit


def pool_by_position(values: torch.Tensor, token_map: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of vision-token ``values`` ``(*map shape, D)`` over the tokens feeding each decoder
    position: ``(seq_len, D)`` and the token count per position (0: none)."""
    flat = values.reshape(-1, values.shape[-1]).float()
    index = token_map.reshape(-1).to(flat.device)
    keep = index >= 0
    sums = torch.zeros(seq_len, flat.shape[-1], device=flat.device).index_add_(0, index[keep], flat[keep])
    counts = torch.zeros(seq_len, device=flat.device).index_add_(0, index[keep], torch.ones_like(index[keep],
                                                                                              dtype=flat.dtype))
    return sums / counts.clamp_min(1.0)[:, None], counts


@torch.inference_mode()
def site_features(loaded: Any, sample: ExplainSample, vision_layer: int | None
                  ) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor | None]:
    """One prompt forward: the inputs, per site the features at every decoder position ``(seq, D)``
    (CPU, float32), and, with a ``vision_layer``, how many vision tokens feed each position."""
    adapter = loaded.adapter
    inputs, _ = adapter.build_inputs(sample.images, sample.question)
    store: dict[str, torch.Tensor] = {}

    def decoder_input(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        store.setdefault(PROJECTOR_SITE, _hidden_of(args, kwargs)[0].float().cpu())

    def vision_output(_module: nn.Module, _args: tuple, output: Any) -> None:
        store.setdefault("vision", output[0] if isinstance(output, (tuple, list)) else output)

    with Hooks() as hooks:
        hooks.add(adapter.decoder_layers()[0].register_forward_pre_hook(decoder_input, with_kwargs=True))
        if vision_layer is not None:
            hooks.add(adapter.vision_layers()[vision_layer].register_forward_hook(vision_output))
        loaded.model(**inputs, use_cache=False)
    features = {PROJECTOR_SITE: store[PROJECTOR_SITE]}
    if vision_layer is None:
        return inputs, features, None
    token_map = adapter.vision_token_map(inputs)
    vision = store["vision"]
    if tuple(token_map.shape) != tuple(vision.shape[:-1]):
        raise ValueError(f"vision block {vision_layer} output {tuple(vision.shape)} does not match the "
                         f"vision-token map {tuple(token_map.shape)}")
    pooled, counts = pool_by_position(vision, token_map, int(inputs["input_ids"].shape[-1]))
    features["vision"] = pooled.cpu()
    return inputs, features, counts.cpu()


# --- probes ------------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """A multinomial logistic-regression probe, with its weights mapped back to raw feature space
    (``logits = weight @ x + bias``) so that its directions can be used on the model's features."""

    site: str
    concept: str
    classes: list[str]
    weight: np.ndarray
    bias: np.ndarray
    accuracy: float
    shuffled_accuracy: float
    majority_accuracy: float
    train_cells: int
    test_cells: int
    converged: bool
    per_class: dict[str, float] = field(default_factory=dict)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias

    def summary(self) -> dict[str, Any]:
        return {"classes": self.classes, "accuracy": self.accuracy, "shuffled_accuracy": self.shuffled_accuracy,
                "majority_accuracy": self.majority_accuracy, "train_cells": self.train_cells,
                "test_cells": self.test_cells, "converged": self.converged, "per_class_accuracy": self.per_class}


def _logistic(x: np.ndarray, y: np.ndarray) -> tuple[Any, LogisticProbe, bool]:
    """The scaler, the probe fitted on the standardised features, and whether it stopped below the
    iteration limit (how this explainer counts convergence; embedding.probe counts solver warnings)."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    probe = train_logistic(scaler.transform(x), y, PROBE_C, PROBE_MAX_ITER)
    return scaler, probe, probe.iterations < PROBE_MAX_ITER


def fit_probe(site: str, concept: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
              y_test: np.ndarray, seed: int) -> Probe:
    """Fit on standardised features; held-out accuracy, the same fit on shuffled labels (chance),
    and the majority class's accuracy."""
    scaler, model, converged = _logistic(x_train, y_train)
    classes = list(model.classes)
    # (classes, features), laid out as scikit-learn's coef_ (three or more classes) or as a zero row stacked
    # over its one row (two): the layout decides how ``weight @ scaler.mean_`` below rounds.
    coef, intercept = model.weight.T, model.bias
    if len(classes) == 2:
        coef = np.ascontiguousarray(coef)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    weight = coef / scale
    bias = intercept - weight @ scaler.mean_
    predicted = model.predict(scaler.transform(x_test))
    accuracy = float(np.mean(predicted == y_test))
    per_class = {c: float(np.mean(predicted[y_test == c] == c)) for c in classes if np.any(y_test == c)}
    shuffled = np.random.default_rng([seed, 0x5F1E]).permutation(y_train)
    s_scaler, s_model, _ = _logistic(x_train, shuffled) if len(set(shuffled)) > 1 else (scaler, model, True)
    shuffled_accuracy = float(np.mean(s_model.predict(s_scaler.transform(x_test)) == y_test))
    values, counts = np.unique(y_train, return_counts=True)
    majority = values[np.argmax(counts)]
    return Probe(site, concept, classes, weight, bias, accuracy, shuffled_accuracy,
                 float(np.mean(y_test == majority)), int(len(y_train)), int(len(y_test)), converged, per_class)


def concept_step(probe: Probe, features: np.ndarray, true: str, target: str) -> np.ndarray:
    """Per feature row, the step along ``w_target - w_true`` that mirrors the probe's margin: a patch
    the probe read as ``true`` by a margin m is read as ``target`` by m after the step (patches
    already read as ``target`` get no step). Multiply by alpha for stronger or weaker edits."""
    a, b = probe.classes.index(true), probe.classes.index(target)
    direction = probe.weight[b] - probe.weight[a]
    gap = features @ direction + (probe.bias[b] - probe.bias[a])  # target logit - true logit
    size = float(direction @ direction)
    steps = np.where(gap < 0, -2.0 * gap, 0.0) / max(size, np.finfo(np.float64).tiny)
    return steps[:, None] * direction[None, :]


def random_like(step: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random directions with the norm of each row of ``step``: the intervention's control."""
    noise = rng.standard_normal(step.shape)
    norms = np.linalg.norm(noise, axis=1, keepdims=True)
    return noise / np.where(norms > 0, norms, 1.0) * np.linalg.norm(step, axis=1, keepdims=True)


@dataclass
class CellTable:
    """Every labelled cell of a sample set, with its features at each site."""

    cells: list[Cell]
    by_site: dict[str, np.ndarray]
    """Site -> ``(cells, D)`` float64 features, rows in ``cells`` order."""
    touched: list[dict[int, dict[int, float]]]
    """Per sample, per object: the coverage of every cell (by position) the object touches."""
    features: list[dict[str, torch.Tensor]]
    """Per sample, per site: the features at every decoder position."""


def collect_cells(loaded: Any, samples: Sequence[ExplainSample], objects: Sequence[list[dict[str, Any]]],
                  sites: Sequence[str], vision_layer: int, min_coverage: float, explainer: str) -> CellTable:
    """One prompt forward per sample: the cells of its first image that are clearly an object's or
    clearly background, and their features (cells no vision token feeds are left out)."""
    cells: list[Cell] = []
    rows: dict[str, list[np.ndarray]] = {site: [] for site in sites}
    touched: list[dict[int, dict[int, float]]] = []
    per_sample: list[dict[str, torch.Tensor]] = []
    for index, sample in enumerate(samples):
        inputs, features, counts = site_features(loaded, sample, vision_layer if "vision" in sites else None)
        layouts = loaded.adapter.image_layouts(inputs)
        if not layouts:
            raise MissingInput(f"{explainer}: sample {sample.id!r} has no image tokens")
        image = sample.images[0]
        found, covered = labelled_cells(layouts[0], object_masks(objects[index], int(image.height),
                                                                 int(image.width)), index, min_coverage)
        if counts is not None:
            found = [c for c in found if counts[c.position] > 0]
        touched.append(covered)
        per_sample.append(features)
        cells.extend(found)
        for cell in found:
            for site in sites:
                rows[site].append(features[site][cell.position].numpy())
    if not cells:
        raise MissingInput(f"{explainer}: no image cell could be labelled (are the grids placed on the images?)")
    return CellTable(cells, {site: np.stack(rows[site]).astype(np.float64) for site in sites}, touched, per_sample)


@dataclass(frozen=True)
class SampleSplit:
    """Samples held out of the probe fits: cells of one image are not independent, so the split is
    by sample, never by cell."""

    train: list[int]
    test: list[int]

    @classmethod
    def draw(cls, count: int, test_fraction: float, seed: int) -> "SampleSplit":
        order = np.random.default_rng([seed, 0xC0B]).permutation(count).tolist()
        n_test = min(max(1, int(round(test_fraction * count))), count - 1)
        return cls(order[n_test:], order[:n_test])


def fit_probes(table: CellTable, samples: Sequence[ExplainSample], objects: Sequence[list[dict[str, Any]]],
               concepts: Sequence[str], sites: Sequence[str], split: SampleSplit, seed: int
               ) -> tuple[dict[tuple[str, str], Probe], dict[str, str]]:
    """One probe per (site, concept) on the cells the concept labels; concepts that cannot be
    fitted (one class, or no held-out cell) are returned with the reason."""
    test_samples = set(split.test)
    is_test = np.array([c.sample in test_samples for c in table.cells])
    sizes = [(int(s.images[0].height), int(s.images[0].width)) for s in samples]
    probes: dict[tuple[str, str], Probe] = {}
    skipped: dict[str, str] = {}
    for concept in concepts:
        label = CONCEPTS[concept].label
        labels = np.array([label(None if c.object is None else objects[c.sample][c.object], sizes[c.sample]) or ""
                           for c in table.cells], dtype=object)
        usable = labels != ""
        train, test = usable & ~is_test, usable & is_test
        if len(set(labels[train])) < 2 or not test.any():
            skipped[concept] = "fewer than two classes among the training cells, or no held-out cell"
            continue
        for site in sites:
            x = table.by_site[site]
            probes[(site, concept)] = fit_probe(site, concept, x[train], labels[train].astype(str), x[test],
                                                labels[test].astype(str), seed)
    return probes, skipped


@dataclass
class Intervention:
    """One sample's concept edit and the answers it produced."""

    sample: ExplainSample
    concept: str
    object: int
    true: str
    target: str
    positions: torch.Tensor
    features: np.ndarray
    answer: str = ""
    edited: dict[float, str] = field(default_factory=dict)
    control: dict[float, str] = field(default_factory=dict)
    probe_flipped: dict[float, float] = field(default_factory=dict)


def plan_interventions(samples: Sequence[ExplainSample], objects: Sequence[list[dict[str, Any]]],
                       touched: Sequence[dict[int, dict[int, float]]], features: Sequence[dict[str, torch.Tensor]],
                       probes: dict[tuple[str, str], Probe], edit_coverage: float
                       ) -> tuple[list[Intervention], list[dict[str, str]]]:
    """The samples whose answer is a concept of one grounded object (colour and shape questions),
    with the projector features of the cells that object covers at ``edit_coverage`` or more."""
    planned: list[Intervention] = []
    skipped: list[dict[str, str]] = []
    for index, sample in enumerate(samples):
        concept = EDITABLE.get(str(sample.extra.get("question_type")))
        grounding = sample.extra.get("grounding") or []
        probe = probes.get((PROJECTOR_SITE, concept)) if concept else None
        if probe is None or len(grounding) != 1:
            continue
        k = int(grounding[0])
        true = str(objects[index][k][concept])
        if true not in probe.classes or len(probe.classes) < 2:
            skipped.append({"id": sample.id, "reason": f"the {concept} probe has no class {true!r} or no other"})
            continue
        chosen = sorted(p for p, share in touched[index].get(k, {}).items() if share >= edit_coverage)
        if not chosen:
            skipped.append({"id": sample.id, "reason": f"no cell is {edit_coverage:g} covered by the object"})
            continue
        positions = torch.tensor(chosen, dtype=torch.long)
        feats = features[index][PROJECTOR_SITE][positions].double().numpy()
        planned.append(Intervention(sample, concept, k, true, "", positions, feats))
    return planned, skipped


def run_intervention(loaded: Any, item: Intervention, probe: Probe, alphas: Sequence[float],
                     rng: np.random.Generator, seed: int, max_new_tokens: int | None) -> None:
    """The unedited answer, a target the answer does not name already (none: ``item.target`` stays
    empty), then the answers edited along the probe and along a random direction, per alpha."""
    item.answer = answer_with(loaded, item.sample, item.positions, np.zeros_like(item.features), max_new_tokens)
    choices = [c for c in probe.classes if c != item.true and not is_correct(item.answer, c)]
    if not choices:
        return
    item.target = str(rng.choice(choices))
    step = concept_step(probe, item.features, item.true, item.target)
    noise = random_like(step, np.random.default_rng([seed, 0xC7, *map(ord, item.sample.id)]))
    for alpha in alphas:
        item.edited[alpha] = answer_with(loaded, item.sample, item.positions, alpha * step, max_new_tokens)
        item.control[alpha] = answer_with(loaded, item.sample, item.positions, alpha * noise, max_new_tokens)
        moved = probe.logits(item.features + alpha * step)
        item.probe_flipped[alpha] = float(np.mean(np.array(probe.classes)[moved.argmax(1)] == item.target))


def answer_with(loaded: Any, sample: ExplainSample, positions: torch.Tensor, delta: np.ndarray | torch.Tensor,
                max_new_tokens: int | None) -> str:
    """The greedy answer with ``delta`` added to the decoder's input at ``positions``."""
    edit = DecoderInputEdit(positions, torch.as_tensor(np.asarray(delta), dtype=torch.float32))
    with edited_decoder_input(loaded.adapter, edit):
        text = generate_answer(loaded, sample.images, sample.question, max_new_tokens).text
    if edit.applied == 0 and positions.numel():
        raise RuntimeError("the concept edit never reached the decoder's input")
    return text


@register
class ConceptBottleneck(Explainer):
    """Per-patch linear probes for named concepts (object, colour, shape, position) on the projector's
    features and the vision tower's output; then interventions that move an object's features to
    another colour (shape) and regenerate. Cost: one prompt forward per sample, two logistic fits per
    site and concept, 1 + 2 x len(alphas) generations (7 by default) per edited sample, no backward.
    Koh et al., 2020 (arXiv 2007.04612); Yang et al., 2022 (2211.11158); Alain, Bengio, 2016
    (1610.01644); Kim et al., 2017 (1711.11279)."""

    id = "design.concept_bottleneck"
    title = "Concept bottleneck: concept probes on image features and concept interventions"
    group = GROUP
    model_needs = frozenset({"image_tokens"})  # its projector site is the decoder input at image-token positions
    scope = "dataset"
    needs = frozenset({Need.LABELLED_SET})
    citations = (KOH, LABO, ALAIN_BENGIO, TCAV)
    summary = (
        "Per-patch linear probes for named concepts (object, colour, shape, position) on the projector's "
        "features and the vision tower's output, against ground truth and shuffled labels; then concept "
        "interventions: the asked-about object's features moved along the probe direction from its true "
        "colour (shape) to another, and how often the regenerated answer names the new one, against a "
        "random direction of the same size."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        concepts: tuple[str, ...] = param(tuple(CONCEPTS), "concepts to probe (at least one)", choices=tuple(CONCEPTS))
        sites: tuple[str, ...] = param(SITES, "where patch features are read (at least one)", choices=SITES)
        min_coverage: float = param(DEFAULT_MIN_COVERAGE, "share of a cell an object must cover for the cell to be its",
                                    low=0.0, low_open=True, high=1.0)
        edit_coverage: float = param(DEFAULT_EDIT_COVERAGE, "interventions edit every cell the object covers this much",
                                     low=0.0, low_open=True, high=1.0)
        test_fraction: float = param(DEFAULT_TEST_FRACTION, "share of the samples held out of the probe fits",
                                     low=0.0, low_open=True, high=1.0, high_open=True)
        alphas: tuple[float, ...] = param(DEFAULT_ALPHAS, "intervention strengths in probe-margin steps (0: no edit)",
                                          low=0.0)
        intervene: bool = param(True, "edit the asked-about object's projector features and regenerate the answer")
        seed: int = param(0, "seed of the sample split, the shuffled labels, the edit targets and the controls")
        max_new_tokens: int | None = param(None, "answer length limit (null: the model's generation config)", low=1)
        vision_layer: int | None = param(None, "vision block of the vision site (null: the one the projector reads)")
        fast_attention: bool = param(True, "run the forwards with the fused attention kernel")

    def compute(self, model: LoadedModel, samples: Sequence[ExplainSample], params: Params) -> Explanation:
        """Probe ``concepts`` at ``sites``; cells count as an object's at ``min_coverage``; the
        interventions edit every cell the object covers at ``edit_coverage`` or more, at each of
        ``alphas`` (0 edits nothing); ``test_fraction`` of the samples are held out of the fit."""
        for name in ("concepts", "sites", "alphas"):
            if not getattr(params, name):
                raise ParamError(f"{self.id}: parameter {name}=[] must not be empty")
        concepts, sites = list(dict.fromkeys(params.concepts)), list(dict.fromkeys(params.sites))
        min_coverage, edit_coverage, test_fraction = params.min_coverage, params.edit_coverage, params.test_fraction
        alphas = list(params.alphas)
        intervene, seed, max_new_tokens = params.intervene, params.seed, params.max_new_tokens
        fast_attention = params.fast_attention
        if intervene and PROJECTOR_SITE not in sites:
            raise ParamError(f"{self.id}: intervene=True edits the projector features: add 'projector' to sites")
        if isinstance(samples, (ExplainSample, Prepared)) or not isinstance(samples, Sequence) or len(samples) < 2:
            raise MissingInput(f"{self.id}: give a list of at least 2 labelled samples (a dataset-scope explainer)")
        samples = [s.sample if isinstance(s, Prepared) else s for s in samples]
        objects = [sample_objects(s, self.id) for s in samples]
        adapter = model.adapter
        blocks = len(adapter.vision_layers())
        vision_layer = params.vision_layer
        if vision_layer is None:
            vision_layer = default_cam_layer(adapter)
        elif not -blocks <= vision_layer < blocks:
            raise ParamError(f"{self.id}: parameter vision_layer={vision_layer!r} must be a vision block index in "
                             f"{-blocks}..{blocks - 1}")
        vision_layer %= blocks

        with fused_attention(model.model, fast_attention):
            table = collect_cells(model, samples, objects, sites, vision_layer, min_coverage, self.id)
        split = SampleSplit.draw(len(samples), test_fraction, seed)
        probes, skipped = fit_probes(table, samples, objects, concepts, sites, split, seed)
        fitted = [c for c in concepts if c not in skipped]

        # interventions on the projector features
        interventions: list[Intervention] = []
        not_edited: list[dict[str, str]] = []
        if intervene:
            interventions, not_edited = plan_interventions(samples, objects, table.touched, table.features,
                                                           probes, edit_coverage)
            rng = np.random.default_rng([seed, 0x1E7])
            with fused_attention(model.model, fast_attention):
                for item in interventions:
                    run_intervention(model, item, probes[(PROJECTOR_SITE, item.concept)], alphas, rng, seed,
                                     max_new_tokens)
            not_edited += [{"id": i.sample.id, "reason": f"the unedited answer {i.answer!r} already names every "
                                                          f"{i.concept} but the true one"}
                           for i in interventions if not i.target]
            interventions = [i for i in interventions if i.target]

        exp = Explanation(
            self.id,
            {**params.as_dict(), "concepts": concepts, "sites": sites, "vision_layer": vision_layer},
            Target(text="", token_ids=[], tokens=[], positions=[], probs=[]),
        )
        if fitted:
            for key, attr in (("probe_accuracy", "accuracy"), ("probe_accuracy.shuffled", "shuffled_accuracy"),
                              ("probe_accuracy.majority", "majority_accuracy")):
                exp.add(key, [[getattr(probes[(s, c)], attr) for c in fitted] for s in sites], ("site", "concept"))
            for (site, concept), probe in probes.items():
                exp.scores[f"probe.{site}.{concept}"] = probe.accuracy
                exp.scores[f"probe.{site}.{concept}.shuffled"] = probe.shuffled_accuracy
        edits = [c for c in EDITABLE.values() if any(i.concept == c for i in interventions)]
        rates: dict[str, np.ndarray] = {}
        if interventions:
            def rate(items: list[Intervention], hit: Callable[[Intervention, float], bool]) -> list[float]:
                return [float(np.mean([hit(i, a) for i in items])) for a in alphas]

            measures: dict[str, Callable[[Intervention, float], bool]] = {
                "success": lambda i, a: is_correct(i.edited[a], i.target),
                "changed": lambda i, a: normalise(i.edited[a]) != normalise(i.answer),
                "control_success": lambda i, a: is_correct(i.control[a], i.target),
                "control_changed": lambda i, a: normalise(i.control[a]) != normalise(i.answer),
                "probe_flipped": lambda i, a: i.probe_flipped[a] > 0.5,
            }
            for name, hit in measures.items():
                rates[name] = np.array([rate([i for i in interventions if i.concept == c], hit) for c in edits])
                exp.add(f"intervention.{name}", rates[name], ("edit", "alpha"))
                overall = rate(interventions, hit)
                for alpha, value in zip(alphas, overall):
                    exp.scores[f"intervention.{name}@{alpha:g}"] = value
            exp.scores["intervention.success_rate"] = rate(interventions, measures["success"])[0]
            exp.scores["intervention.control_success_rate"] = rate(interventions, measures["control_success"])[0]
        exp.scores["interventions"] = float(len(interventions))
        exp.scores["cells"] = float(len(table.cells))
        exp.meta.update({
            "sites": {site: SITE_NOTES[site].format(layer=vision_layer) for site in sites},
            "concepts": {c: CONCEPTS[c].description for c in concepts},
            "probes": {f"{s}.{c}": p.summary() for (s, c), p in probes.items()},
            "skipped_concepts": skipped,
            "split": {"train": [samples[i].id for i in split.train], "test": [samples[i].id for i in split.test]},
            "step": "alpha x the step along w_target - w_true that mirrors the projector probe's margin per cell",
            "success_rate": f"at the first alpha ({alphas[0]:g}); every alpha in 'intervention.success@alpha'",
            "interventions": [
                {"id": i.sample.id, "concept": i.concept, "object": i.object, "true": i.true, "target": i.target,
                 "cells": len(i.positions), "answer": i.answer, "expected": i.sample.expected,
                 "edited": {f"{a:g}": t for a, t in i.edited.items()},
                 "control": {f"{a:g}": t for a, t in i.control.items()},
                 "probe_flipped": {f"{a:g}": v for a, v in i.probe_flipped.items()}}
                for i in interventions
            ],
            "not_edited": not_edited,
            "axis_labels": {"site": list(sites), "concept": fitted, "edit": edits,
                            "alpha": [f"{a:g}" for a in alphas]},
        })
        return exp
