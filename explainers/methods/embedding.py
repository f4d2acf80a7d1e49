"""Dataset-scope embedding explainers: linear probes for ground-truth attributes, and 2-D
projections of hidden states with the modality gap per layer.

Both read the model's own hidden states in one prompt forward per sample (no answer is
generated): the vision block that feeds the projector, the projected image features as the
decoder receives them (decoder block 0's input at image positions) and every decoder block's
output. An object's image positions come from the adapters, not from grid arithmetic: the
object's box is drawn on a black image, run through the model's own processor, and compared
with an all-black and an all-white image, which gives, per value of ``pixel_values``, the
fraction of it the object covers; the adapter's ``pixel_cell_map`` pools those fractions onto
sequence positions and ``vision_token_map`` onto vision-block tokens. Tiles, global views,
merged and pooled grids are all handled by the same code.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from xmllm import MissingInput

from ..backward import default_cam_layer
from ..citations import ALAIN_BENGIO, MMVP
from xmllm.explainers.prepared import ExplainSample
from ..explanation import Explanation, Target
from ..hooks import Hooks
from ..linear_probe import train_logistic
from ..models import LoadedModel
from ..models.errors import AdapterError
from ..params import ExplainerParams, ParamError, param
from ..registry import Citation, Explainer, Need, register

GROUP = "embedding"

VISION_SITE = "vision"
PROJECTOR_SITE = "projector"
DECODER_SITE = "decoder.{}"
INPUT_LAYER = "input"
"""Projection layer name of decoder block 0's input: projected image features and token embeddings."""

ROW_LABELS: tuple[str, ...] = ("top", "middle", "bottom")
COL_LABELS: tuple[str, ...] = ("left", "centre", "right")
"""Position attributes: the third of the image (by height, by width) holding the object's centre."""
IMAGE_ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "row", "col")
"""Per-object attributes, probed on the object's image positions."""
TEXT_ATTRIBUTES: tuple[str, ...] = ("count", "question_type")
"""Per-sample attributes (number of objects, question type), probed at the last prompt token."""
ATTRIBUTES: tuple[str, ...] = (*IMAGE_ATTRIBUTES, *TEXT_ATTRIBUTES)

DEFAULT_TEST_FRACTION = 0.3
DEFAULT_C = 1.0
"""Inverse L2 strength of the logistic-regression probes (scikit-learn's ``C``) on z-scored features."""
DEFAULT_MAX_ITER = 1000
DEFAULT_POINTS = 16
"""Points per sample and modality drawn into the projection (the modality gap uses every token)."""
LABEL_COVERAGE = 0.5
"""A projected image point is labelled with an object when that object covers at least this
share of its cell; otherwise it is ``background``."""
SPAN_EPSILON = 1e-6
"""Processed values whose black and white versions differ by less than this carry no pixel (padding)."""
ENCODING_BLACK, ENCODING_WHITE = (0, 0, 0), (255, 255, 255)

HEWITT_LIANG = Citation("Designing and Interpreting Probes with Control Tasks", 2019, "1909.03368",
                        "Hewitt, Liang")
MIND_THE_GAP = Citation(
    "Mind the Gap: Understanding the Modality Gap in Multi-modal Contrastive Representation Learning",
    2022, "2203.02053", "Liang, Zhang, Kwon, Yeung, Zou",
)
VL_INTERPRET = Citation("VL-InterpreT: An Interactive Visualization Tool for Interpreting Vision-Language "
                        "Transformers", 2022, "2203.17247", "Aflalo, Du, Tseng, et al.")


def empty_target() -> Target:
    """A dataset-scope result explains no single answer."""
    return Target(text="", token_ids=[], tokens=[], positions=[], probs=[])


# --- samples ---------------------------------------------------------------------------------------


def sample_list(explainer: str, samples: Any, minimum: int = 1) -> list[ExplainSample]:
    """``samples`` as a list of ExplainSample; one-line errors for anything else."""
    if isinstance(samples, ExplainSample):
        samples = [samples]
    items = list(samples) if isinstance(samples, Sequence) else None
    if items is None or not all(isinstance(s, ExplainSample) for s in items):
        raise MissingInput(f"{explainer} is dataset-scope: pass a list of samples, not {type(samples).__name__}")
    if len(items) < minimum:
        raise MissingInput(f"{explainer} needs at least {minimum} samples, got {len(items)}")
    return items


def objects_of(sample: ExplainSample, explainer: str) -> list[dict[str, Any]]:
    """The ground-truth objects of a sample (``extra["objects"]``), each checked."""
    objects = sample.extra.get("objects") if isinstance(sample.extra, Mapping) else None
    if objects is None:
        raise MissingInput(f"{explainer}: sample {sample.id!r} has no extra['objects'] (ground-truth objects needed)")
    if not isinstance(objects, list):
        raise MissingInput(f"{explainer}: sample {sample.id!r}: extra['objects'] must be a list, not "
                         f"{type(objects).__name__}")
    for k, obj in enumerate(objects):
        if not isinstance(obj, Mapping):
            raise MissingInput(f"{explainer}: sample {sample.id!r}: objects[{k}] is not an object")
        for key in ("shape", "colour"):
            if not isinstance(obj.get(key), str):
                raise MissingInput(f"{explainer}: sample {sample.id!r}: objects[{k}].{key} must be a string")
        for key in ("cx", "cy", "size"):
            value = obj.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise MissingInput(f"{explainer}: sample {sample.id!r}: objects[{k}].{key} must be a number")
    return list(objects)


def one_image(sample: ExplainSample, explainer: str) -> Image.Image:
    if len(sample.images) != 1:
        raise MissingInput(f"{explainer}: sample {sample.id!r} has {len(sample.images)} images; objects refer to one")
    return sample.images[0]


def position_label(value: float, extent: float, labels: Sequence[str]) -> str:
    """Which of ``len(labels)`` equal bands of ``[0, extent)`` holds ``value``."""
    band = int(np.clip(np.floor(value / extent * len(labels)), 0, len(labels) - 1))
    return labels[band]


def object_attributes(obj: Mapping[str, Any], width: int, height: int) -> dict[str, str]:
    return {
        "colour": str(obj["colour"]),
        "shape": str(obj["shape"]),
        "row": position_label(float(obj["cy"]), height, ROW_LABELS),
        "col": position_label(float(obj["cx"]), width, COL_LABELS),
    }


def object_name(obj: Mapping[str, Any]) -> str:
    return f"{obj['colour']} {obj['shape']}"


# --- where an object lies, in sequence positions ---------------------------------------------------


def box_image(size: tuple[int, int], obj: Mapping[str, Any] | None, fill: tuple[int, int, int]) -> Image.Image:
    """A black image of ``size`` with the object's box in ``fill`` (no object: all ``fill``)."""
    if obj is None:
        return Image.new("RGB", size, fill)
    image = Image.new("RGB", size, ENCODING_BLACK)
    half = float(obj["size"]) / 2
    box = (float(obj["cx"]) - half, float(obj["cy"]) - half, float(obj["cx"]) + half, float(obj["cy"]) + half)
    ImageDraw.Draw(image).rectangle(box, fill=fill)
    return image


def processed_pixels(adapter: Any, image: Image.Image, question: str) -> torch.Tensor:
    inputs, _ = adapter.build_inputs([image], question)
    return inputs["pixel_values"].detach().float().cpu()


def position_coverage(adapter: Any, inputs: Mapping[str, Any], image: Image.Image, question: str,
                      objects: Sequence[Mapping[str, Any]],
                      extremes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """``(objects, seq)``: the share of each position's pixel values that each object's box covers.

    Each object's box is processed like the real image (same size, so same resizing, cropping
    and tiling) and compared with all-black and all-white images; values the processor pads
    (no difference between black and white) and values no grid cell covers are left out.
    ``extremes`` caches the processed black and white images by image size across calls.
    """
    seq = int(inputs["input_ids"].shape[-1])
    cells = adapter.pixel_cell_map(inputs).detach().cpu().reshape(-1)
    cache = {} if extremes is None else extremes
    if image.size not in cache:
        cache[image.size] = tuple(processed_pixels(adapter, box_image(image.size, None, fill), question).reshape(-1)
                                  for fill in (ENCODING_BLACK, ENCODING_WHITE))
    black, white = cache[image.size]
    if black.numel() != cells.numel():
        raise ValueError(f"pixel_cell_map has {cells.numel()} values but pixel_values {black.numel()}")
    span = white - black
    valid = (span.abs() > SPAN_EPSILON) & (cells >= 0)
    index = cells[valid]
    counts = torch.zeros(seq, dtype=torch.float64).index_add_(0, index, torch.ones(index.numel(), dtype=torch.float64))
    out = torch.zeros(len(objects), seq, dtype=torch.float64)
    for k, obj in enumerate(objects):
        drawn = processed_pixels(adapter, box_image(image.size, obj, ENCODING_WHITE), question).reshape(-1)
        share = ((drawn - black)[valid] / span[valid]).clamp(0.0, 1.0).to(torch.float64)
        out[k].index_add_(0, index, share)
    return out / counts.clamp_min(1.0)


# --- hidden states of one prompt forward -----------------------------------------------------------


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class PromptStates:
    """One sample's prompt forward: inputs, positions and the hidden states read on the way."""

    inputs: Any
    image_positions: torch.Tensor
    text_positions: torch.Tensor
    vision: torch.Tensor | None
    """``(vision tokens, hidden)`` of the vision block that feeds the projector."""
    vision_map: torch.Tensor | None
    """``(vision tokens,)``: the decoder position each vision token feeds (-1: none)."""
    decoder_input: torch.Tensor
    """``(seq, hidden)``: decoder block 0's input (image positions: the projected features)."""
    blocks: list[torch.Tensor] = field(default_factory=list)
    """Per decoder block, ``(seq, hidden)`` of its output (the residual stream after it)."""

    @property
    def seq_len(self) -> int:
        return int(self.decoder_input.shape[0])


@contextlib.contextmanager
def _hooks(adapter: Any, store: dict[str, Any], vision: bool) -> Iterator[None]:
    def keep(key: str):
        def hook(_module: Any, _args: Any, output: Any) -> None:
            if key in store:
                raise RuntimeError(f"{key} ran twice in one prompt forward")
            store[key] = _first(output).detach()

        return hook

    def keep_input(_module: Any, args: Any, kwargs: Any) -> None:
        store["input"] = (args[0] if args else kwargs["hidden_states"]).detach()

    blocks = adapter.decoder_layers()
    with Hooks() as hooks:
        hooks.add(blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True))
        for i, block in enumerate(blocks):
            hooks.add(block.register_forward_hook(keep(f"block{i}")))
        if vision:
            layer = default_cam_layer(adapter)
            hooks.add(adapter.vision_layers()[layer].register_forward_hook(keep("vision")))
        yield


@torch.inference_mode()
def prompt_states(loaded: Any, sample: ExplainSample, vision: bool = True) -> PromptStates:
    """Run the prompt (images + question) once and keep every site's hidden states on the CPU."""
    adapter = loaded.adapter
    inputs, _ = adapter.build_inputs(sample.images, sample.question)
    store: dict[str, Any] = {}
    with _hooks(adapter, store, vision and "pixel_values" in inputs):
        loaded.model(**inputs, use_cache=False)
    layouts = adapter.image_layouts(inputs)
    images = torch.cat([l.all_positions for l in layouts]) if layouts else torch.empty(0, dtype=torch.long)
    count = len(adapter.decoder_layers())
    blocks = [store[f"block{i}"][0].float().cpu() for i in range(count)]
    vision_acts = vision_map = None
    if "vision" in store:
        vision_map = adapter.vision_token_map(inputs).detach().cpu()
        acts = store["vision"]
        if tuple(vision_map.shape) != tuple(acts.shape[:-1]):
            raise ValueError(f"vision block output {tuple(acts.shape)} does not match the vision-token map "
                             f"{tuple(vision_map.shape)}")
        vision_acts = acts.float().cpu().reshape(-1, acts.shape[-1])
        vision_map = vision_map.reshape(-1)
    return PromptStates(inputs, images, adapter.text_positions(inputs), vision_acts, vision_map,
                        store["input"][0].float().cpu(), blocks)


def weighted_mean(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
    """``sum_i w_i x_i / sum_i w_i`` over rows, or None when no weight is positive."""
    total = float(weights.sum())
    if total <= 0.0:
        return None
    return (weights.to(states.dtype) @ states) / total


def object_features(states: PromptStates, coverage: torch.Tensor,
                    sites: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """One object's feature vector at every site: hidden states averaged over its positions,
    weighted by the share of each position's pixels it covers (vision: over the vision tokens
    that feed those positions)."""
    weights = coverage.to(torch.float32)
    if float(weights.sum()) <= 0.0:
        return None
    out: dict[str, torch.Tensor] = {}
    for site in sites:
        if site == VISION_SITE:
            mapped = states.vision_map
            token_weights = torch.where(mapped >= 0, weights[mapped.clamp_min(0)], torch.zeros_like(weights[:1]))
            value = weighted_mean(states.vision, token_weights)
        elif site == PROJECTOR_SITE:
            value = weighted_mean(states.decoder_input, weights)
        else:
            value = weighted_mean(states.blocks[int(site.split(".")[1])], weights)
        if value is None:
            return None
        out[site] = value
    return out


# --- probes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """Held-out accuracy of one linear probe and of its shuffled-label control."""

    accuracy: float
    control_accuracy: float
    chance: float
    """Accuracy of always answering the training set's most frequent label."""
    n_train: int
    n_test: int
    classes: tuple[str, ...]
    converged: bool = True


def sample_groups(samples: Sequence[ExplainSample]) -> np.ndarray:
    """A group index per sample: a sample and its MMVP partner (``extra["pair"]``) share one, so
    that a near-copy of a test image never sits in the training split."""
    ids = [s.id for s in samples]
    parent = {i: i for i in ids}

    def root(i: str) -> str:
        while parent[i] != i:
            i = parent[i]
        return i

    for s in samples:
        partner = s.extra.get("pair") if isinstance(s.extra, Mapping) else None
        if isinstance(partner, str) and partner in parent:
            a, b = sorted((root(s.id), root(partner)))
            parent[b] = a
    roots = [root(i) for i in ids]
    order = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    return np.asarray([order[r] for r in roots], dtype=int)


def split_groups(n_groups: int, test_fraction: float, seed: int) -> np.ndarray:
    """A boolean test mask over ``n_groups`` samples, fixed by ``seed`` (at least one of each)."""
    if n_groups < 2:
        raise MissingInput(f"a held-out split needs at least 2 independent samples (pairs count once), got {n_groups}")
    n_test = min(n_groups - 1, max(1, int(round(test_fraction * n_groups))))
    order = np.random.default_rng([seed, 0x5B17]).permutation(n_groups)
    test = np.zeros(n_groups, dtype=bool)
    test[order[:n_test]] = True
    return test


def control_labels(labels: Sequence[str], seed: int) -> np.ndarray:
    """The control task's labels: the same labels shuffled across examples by ``seed``."""
    y = np.asarray([str(v) for v in labels], dtype=object)
    return y[np.random.default_rng([seed, 0xC0]).permutation(y.size)]


def fit_probe(features: np.ndarray, labels: Sequence[str], test: np.ndarray, seed: int = 0, c: float = DEFAULT_C,
              max_iter: int = DEFAULT_MAX_ITER) -> ProbeResult:
    """Train a linear probe on the rows where ``test`` is False, score it where True, and the same
    for a control whose labels are shuffled across all rows (seeded): a probe that only reads
    the label from the features falls to chance there (Hewitt & Liang's selectivity)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray([str(v) for v in labels], dtype=object)
    test = np.asarray(test, dtype=bool)
    if x.ndim != 2 or x.shape[0] != y.size or test.shape != (y.size,):
        raise ValueError(f"probe inputs disagree: features {x.shape}, {y.size} labels, test mask {test.shape}")
    train = ~test
    if not train.any() or not test.any():
        raise ValueError("a probe needs at least one training and one test example")
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    z = (x - mean) / np.where(std > 0, std, 1.0)
    shuffled = control_labels(y, seed)
    model = train_logistic(z[train], y[train], c, max_iter)
    control = train_logistic(z[train], shuffled[train], c, max_iter)
    values, counts = np.unique(y[train], return_counts=True)
    majority = values[np.argmax(counts)]
    return ProbeResult(
        accuracy=float(np.mean(model.predict(z[test]) == y[test])),
        control_accuracy=float(np.mean(control.predict(z[test]) == shuffled[test])),
        chance=float(np.mean(y[test] == majority)),
        n_train=int(train.sum()),
        n_test=int(test.sum()),
        classes=tuple(str(v) for v in values),
        converged=model.converged and control.converged,
    )


@dataclass
class ProbeData:
    """Features and labels gathered over a sample set: per object, and per sample (text)."""

    object_rows: dict[str, list[np.ndarray]]
    object_labels: dict[str, list[str]]
    object_owner: list[int]
    text_rows: dict[str, list[np.ndarray]]
    text_labels: dict[str, list[str]]
    skipped: list[str] = field(default_factory=list)

    def examples(self, attr: str) -> tuple[dict[str, np.ndarray], list[str], np.ndarray]:
        """Per site the feature matrix, the labels, and each example's sample index."""
        if attr in self.object_labels:
            rows, labels, owners = self.object_rows, self.object_labels[attr], self.object_owner
        else:
            rows, labels = self.text_rows, self.text_labels[attr]
            owners = list(range(len(labels)))
        width = len(labels)
        features = {site: np.stack(v) if v else np.zeros((0, 0)) for site, v in rows.items()}
        if any(f.shape[0] != width for f in features.values()):
            raise RuntimeError(f"probe data for {attr!r} disagree in length")
        return features, labels, np.asarray(owners, dtype=int)


def collect_probe_data(loaded: Any, samples: Sequence[ExplainSample], attributes: Sequence[str],
                       sites: Sequence[str], explainer: str) -> ProbeData:
    """One prompt forward per sample: each object's features at every site, and the last prompt
    token's at every decoder block, with their labels."""
    image_attrs = [a for a in attributes if a in IMAGE_ATTRIBUTES]
    text_attrs = [a for a in attributes if a in TEXT_ATTRIBUTES]
    text_sites = [s for s in sites if s.startswith(DECODER_SITE.format(""))]
    data = ProbeData({s: [] for s in sites}, {a: [] for a in image_attrs}, [],
                     {s: [] for s in text_sites}, {a: [] for a in text_attrs})
    extremes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for index, s in enumerate(samples):
        objs = objects_of(s, explainer)
        states = prompt_states(loaded, s, vision=bool(image_attrs))
        if text_attrs:
            last = states.seq_len - 1
            for site in text_sites:
                data.text_rows[site].append(states.blocks[int(site.split(".")[1])][last].numpy())
            for a in text_attrs:
                data.text_labels[a].append(str(len(objs)) if a == "count" else str(s.extra["question_type"]))
        if not image_attrs or not objs:
            continue
        if not states.image_positions.numel() or states.vision is None:
            raise AdapterError(f"{explainer}: sample {s.id!r}: the model saw no image tokens")
        image = s.images[0]
        cover = position_coverage(loaded.adapter, states.inputs, image, s.question, objs, extremes)
        for obj, weights in zip(objs, cover):
            feats = object_features(states, weights, sites)
            if feats is None:
                data.skipped.append(f"{s.id}: {object_name(obj)}")
                continue
            for site in sites:
                data.object_rows[site].append(feats[site].numpy())
            labels = object_attributes(obj, image.width, image.height)
            for a in image_attrs:
                data.object_labels[a].append(labels[a])
            data.object_owner.append(index)
    return data


def decoder_sites(count: int) -> list[str]:
    return [DECODER_SITE.format(i) for i in range(count)]


@register
class LinearProbe(Explainer):
    """Held-out accuracy of logistic-regression probes for objects' colour, shape and position (vision
    block, projector, every decoder block) and for the object count and question type (last prompt
    token), each against a shuffled-label control. Cost: one prompt forward per sample, no generation,
    no backward; the processor once per object; two logistic fits per attribute and site.
    Alain, Bengio, 2016 (arXiv 1610.01644); Hewitt, Liang, 2019 (1909.03368); Tong et al., 2024 (2401.06209)."""

    id = "embedding.probe"
    title = "Linear probes for ground-truth attributes across the vision tower, projector and decoder"
    group = GROUP
    model_needs = frozenset({"image_tokens"})  # it reads decoder states at image-token positions
    scope = "dataset"
    needs = frozenset({Need.LABELLED_SET})
    citations = (ALAIN_BENGIO, HEWITT_LIANG, MMVP)
    summary = (
        "Logistic-regression probes for each object's colour, shape and position (row and column "
        "third of its centre) on its image positions at the vision block feeding the projector, "
        "the projected features and every decoder block, and for the object count and question "
        "type at the last prompt token of every decoder block. Held-out accuracy on a split of "
        "samples fixed by the seed, with a shuffled-label control for each probe."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        seed: int = param(0, "seed of the train/test split by sample and of the control's shuffled labels")
        test_fraction: float = param(DEFAULT_TEST_FRACTION, "share of the samples (pairs count once) held out",
                                     low=0.0, high=1.0, low_open=True, high_open=True)
        C: float = param(DEFAULT_C, "inverse L2 strength of the logistic-regression probes", low=0.0, low_open=True)
        max_iter: int = param(DEFAULT_MAX_ITER, "iteration limit of each probe's solver", low=1)
        attributes: tuple[str, ...] | None = param(
            None, "attributes to probe (null: all, question_type only when every sample has one)", choices=ATTRIBUTES)

    def compute(self, model: LoadedModel, samples: Sequence[ExplainSample], params: Params) -> Explanation:
        seed, test_fraction, c, max_iter = params.seed, params.test_fraction, params.C, params.max_iter
        samples = sample_list(self.id, samples, minimum=2)
        for s in samples:
            objects_of(s, self.id)
            one_image(s, self.id)
        wanted = self._attributes(params.attributes, samples)
        group_of = sample_groups(samples)
        test_samples = split_groups(int(group_of.max()) + 1, test_fraction, seed)[group_of]
        layers = len(model.adapter.decoder_layers())
        sites = [VISION_SITE, PROJECTOR_SITE, *decoder_sites(layers)]
        data = collect_probe_data(model, samples, wanted, sites, self.id)

        accuracy = np.full((len(wanted), len(sites)), np.nan)
        control = np.full_like(accuracy, np.nan)
        chance = np.full(len(wanted), np.nan)
        probes: dict[str, Any] = {}
        not_converged: list[str] = []
        for a_index, attr in enumerate(wanted):
            features, labels, owners = data.examples(attr)
            test = test_samples[owners]
            where = "image" if attr in IMAGE_ATTRIBUTES else "last_prompt_token"
            if not test.any() or test.all():
                probes[attr] = {"position": where, "examples": int(test.size),
                                "skipped": "no examples on one side of the split"}
                continue
            for site, values in features.items():
                result = fit_probe(values, labels, test, seed, c, max_iter)
                j = sites.index(site)
                accuracy[a_index, j], control[a_index, j] = result.accuracy, result.control_accuracy
                if not result.converged:
                    not_converged.append(f"{attr}@{site}")
            chance[a_index] = result.chance
            probes[attr] = {"position": where, "examples": int(test.size), "classes": list(result.classes),
                            "n_train": result.n_train, "n_test": result.n_test}

        exp = Explanation(
            self.id,
            {**params.as_dict(), "attributes": list(wanted)},
            empty_target(),
            meta={
                "attributes": list(wanted),
                "sites": sites,
                "site_descriptions": self._site_descriptions(model.adapter, layers),
                "probes": probes,
                "samples": len(samples),
                "objects": len(data.object_owner),
                "test_samples": [s.id for s, t in zip(samples, test_samples) if t],
                "skipped_objects": data.skipped,
                "not_converged": not_converged,
                "model_type": model.adapter.model_type,
                "probe": "multinomial logistic regression with an L2 penalty (scikit-learn, lbfgs) on features "
                         "z-scored with the training split's statistics",
                "control": "the same probe trained and tested on labels shuffled across all examples (seeded), "
                           "same split; accuracy minus control is the selectivity",
                "chance": "accuracy of always answering the training split's most frequent label",
                "split": "by sample, a sample and its pair together (an image's objects never straddle train and "
                         "test), fixed by the seed",
                "positions": "object features: hidden states averaged over the object's positions weighted by the "
                             "share of each position's pixels its box covers; count and question_type: the last prompt token",
                "position_labels": {"row": list(ROW_LABELS), "col": list(COL_LABELS)},
                "nan": "attribute not probed at that site (text attributes have no vision or projector site)",
            },
        )
        exp.add("accuracy", accuracy, ("attribute", "site"))
        exp.add("control_accuracy", control, ("attribute", "site"))
        exp.add("selectivity", accuracy - control, ("attribute", "site"))
        exp.add("chance", chance, ("attribute",))
        best_site: dict[str, str] = {}
        for a_index, attr in enumerate(wanted):
            row = accuracy[a_index]
            if np.isfinite(row).any():
                best = int(np.nanargmax(row))
                best_site[attr] = sites[best]
                exp.scores[f"{attr}.best_accuracy"] = float(row[best])
                exp.scores[f"{attr}.best_selectivity"] = float(np.nanmax(row - control[a_index]))
                exp.scores[f"{attr}.chance"] = float(chance[a_index])
        exp.meta["best_site"] = best_site
        exp.scores["samples"] = float(len(samples))
        exp.scores["objects"] = float(len(data.object_owner))
        return exp

    def _attributes(self, attributes: tuple[str, ...] | None, samples: Sequence[ExplainSample]) -> list[str]:
        """The attributes to probe: the declared ones (each already one of ATTRIBUTES), or all."""
        has_type = all(isinstance(s.extra.get("question_type"), str) for s in samples)
        if attributes is None:
            return [a for a in ATTRIBUTES if a != "question_type" or has_type]
        if not attributes:
            raise ParamError(f"{self.id}: parameter attributes=[] must name at least one of {', '.join(ATTRIBUTES)}")
        if "question_type" in attributes and not has_type:
            raise MissingInput(f"{self.id}: attribute 'question_type' needs extra['question_type'] on every sample")
        return list(dict.fromkeys(attributes))

    @staticmethod
    def _site_descriptions(adapter: Any, layers: int) -> dict[str, str]:
        out = {
            VISION_SITE: f"output of vision.blocks.{default_cam_layer(adapter)}, the vision block the projector reads",
            PROJECTOR_SITE: "the projected image features as the decoder receives them (decoder block 0's input)",
        }
        for i in range(layers):
            out[DECODER_SITE.format(i)] = f"output of decoder.blocks.{i} (the residual stream after it)"
        return out


# --- projections and the modality gap -----------------------------------------------------------------


def pca(points: np.ndarray, components: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Principal-component coordinates ``(n, components)``, the components ``(components, d)`` and
    their explained-variance ratios, by SVD of the centred points.

    Signs are fixed (each component's largest-magnitude loading positive), so the same points
    always give the same picture. Missing components (fewer points or dimensions) are zero.
    """
    x = np.asarray(points, dtype=np.float64)
    n, d = x.shape
    centred = x - x.mean(axis=0, keepdims=True)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(components, vt.shape[0])
    axes = vt[:k].copy()
    biggest = np.argmax(np.abs(axes), axis=1)
    signs = np.sign(axes[np.arange(k), biggest])
    axes *= np.where(signs == 0, 1.0, signs)[:, None]
    coords = np.zeros((n, components))
    coords[:, :k] = centred @ axes.T
    full_axes = np.zeros((components, d))
    full_axes[:k] = axes
    variance = singular**2
    ratios = np.zeros(components)
    total = variance.sum()
    if total > 0:
        ratios[:k] = variance[:k] / total
    return coords, full_axes, ratios


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def modality_gap(image_sum: np.ndarray, image_count: int, text_sum: np.ndarray, text_count: int) -> float:
    """Liang et al.'s gap: the distance between the modalities' centroids of unit-length embeddings,
    from running sums of unit vectors (0 for identical distributions, at most 2)."""
    if image_count == 0 or text_count == 0:
        return float("nan")
    return float(np.linalg.norm(image_sum / image_count - text_sum / text_count))


@register
class HiddenStateProjection(Explainer):
    """Image-token and text-token hidden states at the decoder's input and after every decoder block,
    projected on each layer's first two principal components, and the modality gap per layer (distance
    between the centroids of unit-length image and text states). Cost: one prompt forward per sample,
    no generation, no backward; one SVD per layer over the drawn points.
    Liang et al., 2022 (arXiv 2203.02053); Aflalo et al., 2022 (2203.17247)."""

    id = "embedding.projection"
    title = "2-D projections of hidden states per layer, and the modality gap"
    group = GROUP
    model_needs = frozenset({"image_tokens"})  # it projects decoder states at image-token positions
    scope = "dataset"
    citations = (MIND_THE_GAP, VL_INTERPRET)
    summary = (
        "Image-token and text-token hidden states of every sample at the decoder's input and after "
        "every decoder block, projected onto each layer's first two principal components (points "
        "labelled by modality and by the object under the cell or the token's text), with the "
        "modality gap per layer: the distance between the centroids of unit-length image-token and "
        "text-token embeddings."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        seed: int = param(0, "seed of the points drawn per sample")
        image_points: int = param(DEFAULT_POINTS, "image-token points drawn per sample into the projection", low=1)
        text_points: int = param(DEFAULT_POINTS, "text-token points drawn per sample into the projection", low=1)

    def compute(self, model: LoadedModel, samples: Sequence[ExplainSample], params: Params) -> Explanation:
        seed, image_points, text_points = params.seed, params.image_points, params.text_points
        samples = sample_list(self.id, samples)
        tokenizer = model.adapter.tokenizer
        special = torch.as_tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        count = len(model.adapter.decoder_layers())
        layers = [INPUT_LAYER, *decoder_sites(count)]
        picked: list[list[np.ndarray]] = [[] for _ in layers]
        sums = {m: [None] * len(layers) for m in ("image", "text")}
        counts = {"image": 0, "text": 0}
        point_sample, point_modality, point_label, point_position = [], [], [], []
        extremes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for index, s in enumerate(samples):
            states = prompt_states(model, s, vision=False)
            images, texts = states.image_positions, plain_text_positions(states, special)
            rng = np.random.default_rng([seed, index])
            chosen = {"image": _subset(rng, images, image_points), "text": _subset(rng, texts, text_points)}
            labels = {"image": self._image_labels(model, s, states, chosen["image"], extremes),
                      "text": [tokenizer.convert_ids_to_tokens(int(states.inputs["input_ids"][0, p]))
                               for p in chosen["text"].tolist()]}
            for li, hidden in enumerate([states.decoder_input, *states.blocks]):
                for modality, positions in (("image", images), ("text", texts)):
                    if positions.numel():
                        total = unit_rows(hidden[positions].double()).sum(0).numpy()
                        sums[modality][li] = total if sums[modality][li] is None else sums[modality][li] + total
                picked[li].append(hidden[torch.cat([chosen["image"], chosen["text"]])].double().numpy())
            counts["image"] += int(images.numel())
            counts["text"] += int(texts.numel())
            for modality in ("image", "text"):
                for p, label in zip(chosen[modality].tolist(), labels[modality]):
                    point_sample.append(s.id)
                    point_modality.append(modality)
                    point_label.append(str(label))
                    point_position.append(int(p))
        if len(point_sample) < 2:
            raise MissingInput(f"{self.id}: {len(point_sample)} point(s) in all; a projection needs at least 2")
        coords = np.zeros((len(layers), len(point_sample), 2))
        ratios = np.zeros((len(layers), 2))
        gaps = np.zeros(len(layers))
        for li in range(len(layers)):
            coords[li], _, ratios[li] = pca(np.concatenate(picked[li]))
            gaps[li] = modality_gap(sums["image"][li], counts["image"], sums["text"][li], counts["text"])
        exp = Explanation(
            self.id,
            params.as_dict(),
            empty_target(),
            meta={
                "layers": layers,
                "layer_descriptions": layer_descriptions(count),
                "point_sample": point_sample,
                "point_modality": point_modality,
                "point_label": point_label,
                "point_position": point_position,
                "point_labels": [f"{sid}@{pos}" for sid, pos in zip(point_sample, point_position)],
                "xy_labels": ["PC1", "PC2"],
                "component_labels": ["PC1", "PC2"],
                "image_tokens": counts["image"],
                "text_tokens": counts["text"],
                "projection": "PCA per layer over the drawn points (centred, SVD, component signs fixed)",
                "modality_gap": "||mean(unit image-token states) - mean(unit text-token states)|| over every prompt "
                                "token of every sample (Liang et al. 2022); 0 = same centroid, at most 2",
                "text_tokens_kept": "the prompt's text tokens but special ones (BOS, registered role markers), "
                                    "whose states are outliers that would dominate the projection",
                "labels": "image points: the object covering at least half the cell, else 'background' ('image' "
                          "without ground truth); text points: the token",
                "model_type": model.adapter.model_type,
            },
        )
        exp.add("projection", coords, ("layer", "point", "xy"))
        exp.add("explained_variance", ratios, ("layer", "component"))
        exp.add("modality_gap", gaps, ("layer",))
        for name, gap in zip(layers, gaps):
            if np.isfinite(gap):
                exp.scores[f"modality_gap.{name}"] = float(gap)
        exp.scores["points"] = float(len(point_sample))
        return exp

    def _image_labels(self, model: Any, s: ExplainSample, states: PromptStates, positions: torch.Tensor,
                      extremes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
        objs = s.extra.get("objects") if isinstance(s.extra, Mapping) else None
        if not positions.numel():
            return []
        if not objs or len(s.images) != 1:
            return ["image"] * int(positions.numel())
        objs = objects_of(s, self.id)
        cover = position_coverage(model.adapter, states.inputs, s.images[0], s.question, objs, extremes)[:, positions]
        best = cover.argmax(dim=0)
        return [object_name(objs[int(b)]) if float(cover[b, j]) >= LABEL_COVERAGE else "background"
                for j, b in enumerate(best.tolist())]


def plain_text_positions(states: PromptStates, special: torch.Tensor) -> torch.Tensor:
    """The prompt's text positions whose tokens are not special tokens."""
    ids = torch.as_tensor(states.inputs["input_ids"][0]).cpu()[states.text_positions]
    return states.text_positions[~torch.isin(ids, special)]


def layer_descriptions(count: int) -> dict[str, str]:
    out = {INPUT_LAYER: "decoder block 0's input: projected image features and token embeddings"}
    out.update({DECODER_SITE.format(i): f"output of decoder.blocks.{i}" for i in range(count)})
    return out


def _subset(rng: np.random.Generator, positions: torch.Tensor, limit: int) -> torch.Tensor:
    """At most ``limit`` of ``positions``, drawn without replacement, in sequence order."""
    if positions.numel() <= limit:
        return positions.clone()
    keep = np.sort(rng.choice(positions.numel(), size=limit, replace=False))
    return positions[torch.as_tensor(keep, dtype=torch.long)]
