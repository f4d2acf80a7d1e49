"""Decoder MLP neurons: which ones drive an answer, what excites them, and which are specialised.

A *neuron* is one unit of a decoder block's MLP, read at the adapter's ``decoder.blocks.{i}.mlp``
points: its *value* is the unit's entry of the output projection's input (``.mlp.down``; ``act(gate)
* up`` in gated MLPs), its *activation* the activation function's output (``.mlp.act``,
``act(gate)``), as MMNeuron counts it. Zeroing the value at every position removes the neuron
exactly: its column of the output projection no longer reaches the residual stream (MMNeuron zeroes
``act(gate)``, the same thing). Neurons are numbered layer by layer (flat index = the layer's
offset + the unit) and labelled ``L{layer}.U{unit}``.

* ``neurons.top_activations`` (one sample): activation x gradient of the answer's log-probability
  at each neuron value, summed over positions (the first-order estimate of zeroing it, the score
  Schwettmann et al. rank multimodal neurons by), the image patches where each top neuron fires,
  and real ablations: the top k zeroed together and one at a time, against k random neurons.
* ``neurons.modality_specific`` (a sample set): MMNeuron's activation-probability entropy over
  domains (image vs text tokens, or question types), the lowest-entropy group, and the answer
  log-probability (and accuracy) when that group is zeroed against random groups of its size.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from xmllm import MissingInput

from ..answering import generate_answer, is_correct
from ..backward import inputs_only_gradients
from ..recompute import RECOMPUTE_CHOICES, RECOMPUTE_HELP, recomputed_blocks, recomputing, resolve
from xmllm.explainers.prepared import ExplainSample, Prepared, as_prepared
from ..explanation import Explanation, Target
from ..forward import (
    answer_ids,
    batch_size_for,
    eager_unless_fused,
    fused_attention,
    logprobs_at,
    repeat_inputs,
)
from ..hooks import Hooks
from ..memory import backward_copy_bytes
from ..models import LoadedModel
from ..models.errors import AdapterError
from ..models.layout import grid_names
from ..params import ExplainerParams, ParamError, param
from ..registry import Citation, Explainer, Need, register
from ..scaleplan import ScalePlan, costs, trials_for, with_batch_size

GROUP = "neurons"
VALUE_POINT = "decoder.blocks.{}.mlp.down"
"""Its input holds the neuron values: where attribution reads and ablation writes."""
ACTIVATION_POINT = "decoder.blocks.{}.mlp.act"
"""Its output is ``act(gate)``: what MMNeuron's activation probability counts."""

RANKINGS: tuple[str, ...] = ("attribution", "magnitude")
"""Top neurons by signed attribution (those that support the answer) or by its absolute value."""
DEFAULT_TOP_K = 10
DEFAULT_RANDOM_DRAWS = 8
"""Random groups of k neurons ablated as the baseline of the top-k ablation."""

DOMAIN_KINDS: tuple[str, ...] = ("modality", "question_type")
MODALITIES: tuple[str, ...] = ("image", "text")
THRESHOLDS: tuple[str, ...] = ("positive", "quantile")
"""Active means ``act(gate) > 0`` (MMNeuron, LAPE) or above the layer's ``quantile`` of activations."""
DOMAIN_POSITIONS: dict[str, str] = {
    "modality": "image: every image-feature token; text: the prompt's text tokens (markers and answer excluded)",
    "question_type": "every attended token of each sample's final sequence, counted for the sample's question type",
}
DEFAULT_QUANTILE = 0.9
TOP_RATE = 0.01
"""MMNeuron's share of all neurons kept as specific: the 1% with the lowest entropy."""
FILTER_RATE = 0.95
"""MMNeuron's filter: a neuron must reach this quantile of all activation probabilities in some domain."""
QUANTILE_VALUES_PER_SAMPLE = 4096
"""Activations drawn per sample and layer to estimate a layer's quantile threshold."""
DEFAULT_SPECIFIC_RANDOM_DRAWS = 3

ATTRIBUTION_NOTE = (
    "sum over positions of neuron value x d(sum of the answer tokens' log-probabilities)/d(value): "
    "the first-order estimate of the log-probability drop when the neuron is zeroed"
)
DROP_NOTE = "drop = log p(answer) - log p(answer | neurons zeroed at every position), summed over answer tokens"

SCHWETTMANN = Citation("Multimodal Neurons in Pretrained Text-Only Transformers", 2023, "2308.01544",
                       "Schwettmann, Chowdhury, Klein, Bau, Torralba")
PAN = Citation("Finding and Editing Multi-Modal Neurons in Pre-Trained Transformers", 2023, "2311.07470",
               "Pan, Cao, Wang, Yang, Wang")
GOH = Citation("Multimodal Neurons in Artificial Neural Networks (Distill)", 2021, None, "Goh et al.")
MMNEURON = Citation(
    "MMNeuron: Discovering Neuron-Level Domain-Specific Interpretation in Multimodal Large Language Model",
    2024, "2406.11193", "Huo, Yan, Hu, Yue, Hu",
)
LAPE = Citation("Language-Specific Neurons: The Key to Multilingual Capabilities in Large Language Models", 2024,
                "2402.16438", "Tang, Luo, Huang, Zhang, Wang, Zhao, Wei, Wen")
MINER = Citation(
    "MINER: Mining the Underlying Pattern of Modality-Specific Neurons in Multimodal Large Language Models",
    2024, "2410.04819", "Huang, Huo, Yan, Wang, Yue, Hu",
)


# --- the neuron space ------------------------------------------------------------------------------


def _width(module: nn.Module) -> int:
    width = getattr(module, "in_features", None)
    if width is None:
        weight = getattr(module, "weight", None)
        if weight is None:
            raise AdapterError(f"{type(module).__name__}: cannot tell how many neurons feed it")
        width = weight.shape[-1]
    return int(width)


@dataclass(frozen=True)
class NeuronSpace:
    """Every decoder MLP neuron of a model, numbered layer by layer."""

    values: tuple[nn.Module, ...]
    """Per layer, the module whose input holds the neuron values (``.mlp.down``)."""
    activations: tuple[nn.Module, ...] | None
    """Per layer, the activation function (``.mlp.act``), where the adapter names one."""
    widths: tuple[int, ...]

    @property
    def layers(self) -> int:
        return len(self.widths)

    @property
    def offsets(self) -> list[int]:
        return [0, *np.cumsum(self.widths).tolist()]

    @property
    def total(self) -> int:
        return int(sum(self.widths))

    def locate(self, flat: int) -> tuple[int, int]:
        """(layer, unit) of flat neuron ``flat``."""
        offsets = self.offsets
        layer = int(np.searchsorted(offsets, flat, side="right")) - 1
        if not 0 <= layer < self.layers:
            raise IndexError(f"neuron {flat} is outside 0..{self.total - 1}")
        return layer, int(flat - offsets[layer])

    def label(self, flat: int) -> str:
        layer, unit = self.locate(flat)
        return f"L{layer}.U{unit}"

    def table(self, flat_values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``(..., total)`` -> ``(..., layers, max width)``; padding (uneven widths) gets ``fill``."""
        width = max(self.widths)
        out = flat_values.new_full((*flat_values.shape[:-1], self.layers, width), fill)
        for layer, chunk in enumerate(flat_values.split(list(self.widths), dim=-1)):
            out[..., layer, : chunk.shape[-1]] = chunk
        return out


def neuron_space(adapter: Any, explainer: str) -> NeuronSpace:
    """The adapter's ``.mlp.down`` (and ``.mlp.act``) points of every decoder block."""
    points = adapter.hook_points()
    layers = len(adapter.decoder_layers())
    missing = [VALUE_POINT.format(i) for i in range(layers) if VALUE_POINT.format(i) not in points]
    if missing:
        raise AdapterError(f"{explainer}: the {adapter.model_type} adapter names no MLP neuron point {missing[0]!r}")
    values = tuple(points[VALUE_POINT.format(i)] for i in range(layers))
    acts = [points.get(ACTIVATION_POINT.format(i)) for i in range(layers)]
    return NeuronSpace(values, tuple(acts) if all(a is not None for a in acts) else None,
                       tuple(_width(m) for m in values))


@contextlib.contextmanager
def on_values(space: NeuronSpace, fn: Callable[[int, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call ``fn(layer, values)`` on each layer's neuron values; a returned tensor replaces them."""

    def hook_for(layer: int):
        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            out = fn(layer, args[0])
            return None if out is None else (out, *args[1:])

        return hook

    with Hooks() as hooks:
        for i, m in enumerate(space.values):
            hooks.add(m.register_forward_pre_hook(hook_for(i)))
        yield


@contextlib.contextmanager
def on_activations(space: NeuronSpace, fn: Callable[[int, torch.Tensor], None], explainer: str) -> Iterator[None]:
    """Call ``fn(layer, act(gate))`` on each layer's activation-function output (read only)."""
    if space.activations is None:
        raise AdapterError(f"{explainer}: this adapter names no MLP activation point ({ACTIVATION_POINT.format(0)!r})")

    def hook_for(layer: int):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            fn(layer, output)

        return hook

    with Hooks() as hooks:
        for i, m in enumerate(space.activations):
            hooks.add(m.register_forward_hook(hook_for(i)))
        yield


class Ablation:
    """Zeroes chosen neurons at every position, a different set per batch row; use with
    :func:`on_values`. Rows with nothing to zero pass through untouched."""

    def __init__(self, space: NeuronSpace) -> None:
        self.space = space
        self.keep: list[torch.Tensor] | None = None

    def set(self, groups: Sequence[Sequence[int]]) -> None:
        """One group of flat neuron indices per batch row."""
        if not any(len(g) for g in groups):
            self.keep = None
            return
        keep = torch.ones(len(groups), self.space.total)
        for row, group in enumerate(groups):
            if len(group):
                keep[row, torch.as_tensor(list(group), dtype=torch.long)] = 0.0
        self.keep = [chunk.unsqueeze(1) for chunk in keep.split(list(self.space.widths), dim=1)]

    def __call__(self, layer: int, values: torch.Tensor) -> torch.Tensor | None:
        if self.keep is None:
            return None
        keep = self.keep[layer]
        if keep.shape[0] != values.shape[0]:
            raise RuntimeError(f"ablation set for {keep.shape[0]} rows, the forward has {values.shape[0]}")
        return values * keep.to(device=values.device, dtype=values.dtype)


@torch.inference_mode()
def ablated_logprobs(prep: Prepared, space: NeuronSpace, groups: Sequence[Sequence[int]], batch_size: int,
                     full: bool = False) -> torch.Tensor:
    """Each answer token's log-probability with each group of neurons zeroed, in real forwards of
    the final sequence: ``(len(groups), T)``, or with ``full`` ``(len(groups), T, vocab)``."""
    ablation = Ablation(space)
    ids = None if full else answer_ids(prep)
    out = []
    with on_values(space, ablation):
        for start in range(0, len(groups), batch_size):
            chunk = groups[start : start + batch_size]
            ablation.set(chunk)
            batch = repeat_inputs(dict(prep.inputs), len(chunk))
            out.append(logprobs_at(prep.model, batch, prep.logit_positions, ids).cpu())
    return torch.cat(out) if out else torch.empty(0)


def generate_ablated(loaded: Any, sample: ExplainSample, space: NeuronSpace, group: Sequence[int],
                     max_new_tokens: int | None) -> str:
    """The model's greedy answer with ``group`` zeroed at every position (prompt and new tokens)."""
    ablation = Ablation(space)
    ablation.set([group])
    with on_values(space, ablation):
        return generate_answer(loaded, sample.images, sample.question, max_new_tokens).text


def random_groups(total: int, size: int, draws: int, seed: int, exclude: Sequence[int] = ()) -> list[list[int]]:
    """``draws`` groups of ``size`` neurons drawn uniformly without replacement, outside ``exclude``."""
    pool = torch.ones(total, dtype=torch.bool)
    pool[torch.as_tensor(list(exclude), dtype=torch.long)] = False
    candidates = torch.nonzero(pool).flatten()
    if candidates.numel() < size:
        raise ParamError(f"cannot draw {size} random neurons from the {candidates.numel()} left")
    generator = torch.Generator().manual_seed(seed)
    return [sorted(candidates[torch.randperm(candidates.numel(), generator=generator)[:size]].tolist())
            for _ in range(draws)]


# --- neurons.top_activations -------------------------------------------------------------------------


@dataclass
class TopNeurons:
    """What one forward and backward leave of the neuron values: every neuron's attribution summed
    over positions, and for the top ``k`` (best first) their values and attributions at each position."""

    attribution: torch.Tensor  # (total,) float32, layer by layer
    top: list[int]
    value_at: torch.Tensor  # (k, seq) float32, as attribution_at
    attribution_at: torch.Tensor
    logprob: float


class _RunningTop:
    """The best ``k`` neurons over the layers offered so far, and their columns: exactly the first
    ``k`` of a stable descending sort of every neuron's key (ties to the lower flat index), without
    keeping any layer's ``(seq, width)`` values once it has been offered."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.keys: torch.Tensor | None = None
        self.flats: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.attributions: torch.Tensor | None = None

    def offer(self, offset: int, key: torch.Tensor, values: torch.Tensor, attributions: torch.Tensor) -> None:
        order = torch.argsort(key, descending=True, stable=True)[: self.k]
        parts = [(key[order], order + offset, values[:, order].T, attributions[:, order].T)]
        if self.keys is not None:
            parts.insert(0, (self.keys, self.flats, self.values, self.attributions))
        keys, flats, vals, atts = (torch.cat(column) for column in zip(*parts))
        by_flat = torch.argsort(flats, stable=True)  # ties go to the lower flat index, as one global sort
        best = by_flat[torch.argsort(keys[by_flat], descending=True, stable=True)[: self.k]]
        self.keys, self.flats, self.values, self.attributions = keys[best], flats[best], vals[best], atts[best]


def top_neurons(prep: Prepared, space: NeuronSpace, top_k: int, signed: bool,
                recompute: bool = False) -> TopNeurons:
    """Activation x gradient of the summed answer log-probability at every neuron value, from one
    forward and one backward, streamed: each layer's values and gradients are reduced to its
    neurons' sums and its best ``top_k`` columns as the backward reaches it and then dropped, so no
    two layers' ``(seq, width)`` gradients are alive at once (with ``recompute`` the values are the
    block's recomputed ones, so none are kept from the forward either). ``signed``: rank by the
    attribution, else by its magnitude."""
    sums: list[torch.Tensor | None] = [None] * space.layers
    forward: dict[int, torch.Tensor] = {}  # kept blocks: a value until its gradient arrives
    again: dict[int, torch.Tensor] = {}  # recomputed blocks: the value the backward's recomputation made
    ran: set[int] = set()
    running, first = _RunningTop(top_k), []  # first: the first block's value, the backward's input

    def arrive(layer: int, grad: torch.Tensor) -> None:
        value = again.pop(layer, None) if recompute else forward.pop(layer, None)
        if value is None:
            raise RuntimeError(f"{VALUE_POINT.format(layer)}: its value is gone before its gradient arrived")
        acts = value[0].float()
        per_position = acts * grad[0].float()
        sums[layer] = per_position.sum(0)
        running.offer(int(space.offsets[layer]), sums[layer] if signed else sums[layer].abs(), acts, per_position)

    def keep(layer: int, x: torch.Tensor) -> torch.Tensor:
        if recomputing() is not None:  # the backward's recomputation: the same graph start, nothing recorded
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            again[layer] = x.detach()
            return x
        if layer in ran:
            raise RuntimeError(f"{VALUE_POINT.format(layer)} ran twice in one forward")
        ran.add(layer)
        if not x.requires_grad:  # the first block under frozen parameters: start the graph here
            x = x.detach().requires_grad_(True)
        if layer == 0:
            first.append(x)  # the backward's input: its gradient is the backward's result
        else:
            x.register_hook(lambda grad, layer=layer: arrive(layer, grad))
        forward.update({layer: x.detach()} if not recompute or layer == 0 else {})
        return x

    with inputs_only_gradients(prep.model), torch.enable_grad(), on_values(space, keep), \
            recomputed_blocks(prep.adapter, recompute):
        target = logprobs_at(prep.model, dict(prep.inputs), prep.logit_positions, answer_ids(prep)).sum()
        missing = [i for i in range(space.layers) if i not in ran]
        if missing:
            raise RuntimeError(f"{VALUE_POINT.format(missing[0])} did not run in the forward")
        (grad,) = torch.autograd.grad(target, first, allow_unused=True)
    again.update({0: forward.pop(0)} if recompute else {})
    for layer in range(space.layers):  # a value the answer does not depend on: no gradient, attribution 0
        if layer == 0 and grad is not None:
            arrive(0, grad)
        elif sums[layer] is None:
            value, width = (again if recompute else forward).pop(layer, None), space.widths[layer]
            acts = value[0].float() if value is not None else torch.zeros(prep.seq_len, width, device=target.device)
            sums[layer] = torch.zeros(width, device=acts.device)
            running.offer(int(space.offsets[layer]), sums[layer], acts, torch.zeros_like(acts))
    return TopNeurons(torch.cat(sums), running.flats.tolist(), running.values, running.attributions,  # type: ignore[arg-type]
                      float(target.detach()))


@register
class TopActivations(Explainer):
    """Decoder MLP neurons ranked by activation x gradient of the answer's log-probability, where each
    top neuron fires on the image and the prompt, and real ablations: the top k zeroed together and one
    by one, against random groups of k. Cost: one forward and one backward, then 2 + top_k +
    random_draws ablated copies of the sequence (20 by default), batched. Schwettmann et al., 2023
    (arXiv 2308.01544); Pan et al., 2023 (2311.07470); Goh et al., 2021 (Distill, no arXiv id)."""

    id = "neurons.top_activations"
    model_needs = frozenset({"mlp_neurons", "image_tokens"})  # a unit is one entry of every block's MLP, read at image tokens too
    title = "Top answer neurons: activation x gradient, their patches, their ablation"
    group = GROUP
    needs = frozenset({Need.GRADIENTS})
    citations = (SCHWETTMANN, PAN, GOH)
    summary = (
        "Decoder MLP neurons ranked by activation x gradient of the answer's log-probability (summed over "
        "positions), the image patches where each top neuron fires and where it matters, and real "
        "ablations: the top k zeroed together and one by one, against k random neurons."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        top_k: int = param(DEFAULT_TOP_K, "neurons kept, ablated together and one by one", low=1)
        rank_by: str = param("attribution", "rank by signed attribution (support for the answer) or its absolute value",
                             choices=RANKINGS)
        random_draws: int = param(DEFAULT_RANDOM_DRAWS, "random groups of top_k neurons ablated as the baseline", low=1)
        seed: int = param(0, "seed of the random groups")
        batch_size: int | None = param(None, "ablated copies per forward (null: as many as the device's budget fits)",
                                       low=1)
        fast_attention: bool = param(True, "run the forwards with the fused attention kernel")
        recompute: bool | str = param("auto", RECOMPUTE_HELP, choices=RECOMPUTE_CHOICES)

    @classmethod
    def scale_plan(cls, prep: Prepared, full_layers: int) -> ScalePlan:
        """As it is: every ablated group (2 + top_k + random_draws) is one copy of one forward."""
        copies = batch_size_for(prep, None)
        groups = 2 + DEFAULT_TOP_K + DEFAULT_RANDOM_DRAWS
        copies = min(copies, groups)
        return ScalePlan({}, f"the peak is one forward's: {copies} copies", copies, trials_for(copies), with_batch_size,
                         cost=costs(1 + groups, 1))

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        """``top_k`` neurons by ``rank_by``; ``random_draws`` random groups of ``top_k`` (seeded by
        ``seed``) as the ablation baseline; ``batch_size`` ablated copies per forward."""
        top_k, rank_by, random_draws, seed = params.top_k, params.rank_by, params.random_draws, params.seed
        fast_attention = params.fast_attention
        prep = sample
        batch_size = batch_size_for(prep, params.batch_size, eager=eager_unless_fused(prep, fast_attention))
        space = neuron_space(prep.adapter, self.id)
        if top_k >= space.total:
            raise ParamError(f"{self.id}: parameter top_k={top_k} must be below the model's {space.total} MLP neurons")

        eager = eager_unless_fused(prep, fast_attention)
        recompute = resolve(params.recompute, lambda: backward_copy_bytes(prep, eager=eager), prep.loaded.device,
                            model=prep.model)
        with fused_attention(prep.model, fast_attention):
            found = top_neurons(prep, space, top_k, rank_by == "attribution", recompute)
        attribution, top, logprob = found.attribution, found.top, found.logprob
        located = [space.locate(n) for n in top]
        value_at, attribution_at = found.value_at, found.attribution_at  # (k, seq) each

        others = random_groups(space.total, top_k, random_draws, seed, exclude=top)
        groups = [[], top, *[[n] for n in top], *others]
        with fused_attention(prep.model, fast_attention):
            logp = ablated_logprobs(prep, space, groups, batch_size, full=True)  # (G, T, V)
        ids = answer_ids(prep)
        token_logp = logp[:, torch.arange(ids.numel()), ids]  # (G, T)
        totals = token_logp.sum(-1).double()
        base = float(totals[0])
        drops = base - totals
        singles = drops[2 : 2 + top_k]
        random_drops = drops[2 + top_k :]
        kept = (logp[1].argmax(-1) == ids).float().mean()

        exp = Explanation(
            self.id,
            {**params.as_dict(), "batch_size": batch_size, "recompute": recompute},
            prep.target(),
        )
        exp.add("attribution", space.table(attribution), ("layer", "unit"))
        exp.add("top.attribution", attribution[top], ("neuron",))
        exp.add("top.single_drop", singles, ("neuron",))
        exp.add("random_drop", random_drops, ("draw",))
        for name, grid in grid_names(prep.layouts):
            exp.add(name, grid.gather(value_at), ("neuron", "row", "col"))
            exp.add(f"{name}.attribution", grid.gather(attribution_at), ("neuron", "row", "col"))
        text = prep.text_positions
        exp.add("prompt", value_at[:, text], ("neuron", "prompt_token"))
        exp.add("prompt.attribution", attribution_at[:, text], ("neuron", "prompt_token"))
        image = prep.image_positions
        exp.scores.update({
            "logprob": base,
            "logprob_backward": logprob,
            "logprob_top_ablated": float(totals[1]),
            "drop_top": float(drops[1]),
            "predicted_drop_top": float(attribution[top].sum()),
            "drop_random": float(random_drops.mean()),
            "drop_random_std": float(random_drops.std(unbiased=False)),
            "random_at_least_top": float((random_drops >= drops[1]).double().mean()),
            "answer_tokens_kept_top": float(kept),
            "neurons_total": float(space.total),
        })
        labels = [space.label(n) for n in top]
        exp.meta.update({
            "target": ATTRIBUTION_NOTE,
            "drop": DROP_NOTE,
            "value_point": VALUE_POINT,
            "neurons": [
                {"label": labels[j], "layer": l, "unit": u, "point": VALUE_POINT.format(l),
                 "attribution": float(attribution[n]), "single_drop": float(singles[j]),
                 "max_image_value": float(value_at[j, image].max()) if image.numel() else None,
                 "max_text_value": float(value_at[j, text].max()) if text.numel() else None}
                for j, (n, (l, u)) in enumerate(zip(top, located))
            ],
            "random_groups": [[space.label(n) for n in g] for g in others],
            "axis_labels": {"neuron": labels, "draw": [f"random.{i}" for i in range(random_draws)]},
            "widths": list(space.widths),
            "image_maps": "neuron values (row 'image') and value x gradient ('.attribution') at each grid cell",
        })
        return exp


# --- neurons.modality_specific -----------------------------------------------------------------------


def count_active(activations: torch.Tensor, threshold: float | torch.Tensor = 0.0) -> torch.Tensor:
    """``(tokens, neurons)`` -> how many tokens each neuron is active on (above ``threshold``)."""
    return (activations > threshold).sum(0)


def domain_probabilities(activations: torch.Tensor, domain_of_token: torch.Tensor, domains: int,
                         threshold: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Per domain, the share of its tokens on which each neuron is active: ``(domains, neurons)``
    from an activation table ``(tokens, neurons)`` and each token's domain (-1: none)."""
    probs = torch.zeros(domains, activations.shape[-1], dtype=torch.float64)
    for d in range(domains):
        rows = activations[domain_of_token == d]
        if rows.shape[0]:
            probs[d] = count_active(rows, threshold).double() / rows.shape[0]
    return probs


def specificity_entropy(probs: torch.Tensor) -> torch.Tensor:
    """MMNeuron's / LAPE's entropy of each neuron's activation probabilities normalised over the
    domains ``(domains, neurons)``: 0 for a neuron active in one domain only, log(domains) for one
    equally active everywhere, and log(domains) for a neuron never active (no evidence of a domain)."""
    total = probs.sum(0, keepdim=True)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    p = probs / safe
    logs = torch.where(p > 0, p.clamp_min(1e-300).log(), torch.zeros_like(p))
    entropy = -(p * logs).sum(0)
    return torch.where(total[0] > 0, entropy, torch.full_like(entropy, math.log(probs.shape[0])))


def select_specific(probs: torch.Tensor, entropy: torch.Tensor, size: int, filter_rate: float = FILTER_RATE
                    ) -> tuple[torch.Tensor, int]:
    """MMNeuron's selection: among neurons that reach the ``filter_rate`` quantile of all activation
    probabilities in some domain, the ``size`` with the lowest entropy (ties by index). Returns the
    flat indices and the number of candidates."""
    flat = probs.flatten()
    cut = float(torch.quantile(flat.float(), filter_rate)) if flat.numel() else 0.0
    strongest = probs.max(0).values
    candidates = torch.nonzero((strongest >= cut) & (strongest > 0)).flatten()
    order = torch.argsort(entropy[candidates], stable=True)
    return candidates[order[:size]], int(candidates.numel())


class DomainCounter:
    """Streams activation counts per domain out of each forward: nothing of size tokens x neurons
    is kept beyond the hook call."""

    def __init__(self, space: NeuronSpace, domains: int, thresholds: Sequence[float]) -> None:
        self.space = space
        self.counts = [torch.zeros(domains, w, dtype=torch.float64) for w in space.widths]
        self.tokens = torch.zeros(domains, dtype=torch.float64)
        self.thresholds = list(thresholds)
        self.current: dict[int, torch.Tensor] = {}

    def start(self, positions: dict[int, torch.Tensor]) -> None:
        self.current = positions
        for d, pos in positions.items():
            self.tokens[d] += pos.numel()

    def __call__(self, layer: int, activations: torch.Tensor) -> None:
        row = activations[0]
        for d, pos in self.current.items():
            picked = row.index_select(0, pos.to(row.device))
            self.counts[layer][d] += count_active(picked, self.thresholds[layer]).double().cpu()

    def probabilities(self) -> torch.Tensor:
        """``(domains, total)`` over every neuron, flat."""
        counts = torch.cat(self.counts, dim=1)
        return counts / self.tokens.clamp_min(1.0)[:, None]


def _all_positions(prep: Prepared) -> torch.Tensor:
    mask = prep.inputs.get("attention_mask")
    if mask is None:
        return torch.arange(prep.seq_len)
    return torch.nonzero(mask[0].detach().cpu().bool()).flatten()


def _domain_names(kind: str, preps: Sequence[Prepared], explainer: str) -> list[str]:
    if kind == "modality":
        return list(MODALITIES)
    names = []
    for prep in preps:
        qtype = prep.sample.extra.get("question_type")
        if not isinstance(qtype, str) or not qtype:
            raise MissingInput(f"{explainer}: sample {prep.sample.id!r} has no extra['question_type']; "
                               "domains='question_type' needs samples labelled with their question type")
        names.append(qtype)
    return sorted(set(names))


def _positions(prep: Prepared, kind: str, names: list[str]) -> dict[int, torch.Tensor]:
    if kind == "modality":
        return {MODALITIES.index("image"): prep.image_positions, MODALITIES.index("text"): prep.text_positions}
    return {names.index(prep.sample.extra["question_type"]): _all_positions(prep)}


@torch.inference_mode()
def layer_quantiles(preps: Sequence[Prepared], space: NeuronSpace, quantile: float, seed: int,
                    explainer: str) -> list[float]:
    """Each layer's ``quantile`` of ``act(gate)`` over the samples' tokens, from a seeded draw of
    at most :data:`QUANTILE_VALUES_PER_SAMPLE` values per sample and layer."""
    drawn: list[list[torch.Tensor]] = [[] for _ in range(space.layers)]
    generator = torch.Generator().manual_seed(seed)

    def keep(layer: int, activations: torch.Tensor) -> None:
        flat = activations[0].reshape(-1).float().cpu()
        take = torch.randperm(flat.numel(), generator=generator)[:QUANTILE_VALUES_PER_SAMPLE]
        drawn[layer].append(flat[take])

    with on_activations(space, keep, explainer):
        for prep in preps:
            prep.forward(use_cache=False)
    return [float(np.quantile(torch.cat(values).numpy(), quantile)) for values in drawn]


@torch.inference_mode()
def count_domains(preps: Sequence[Prepared], space: NeuronSpace, kind: str, names: list[str],
                  thresholds: Sequence[float], explainer: str) -> DomainCounter:
    """One forward per sample, counting each neuron's active tokens per domain."""
    counter = DomainCounter(space, len(names), thresholds)
    with on_activations(space, counter, explainer):
        for prep in preps:
            counter.start(_positions(prep, kind, names))
            prep.forward(use_cache=False)
    return counter


def ablation_groups(space: NeuronSpace, specific: list[int], owner: list[int], names: list[str], draws: int,
                    seed: int) -> dict[str, list[int]]:
    """``none``, the whole ``specific`` group, each domain's part of it, and ``draws`` random
    groups of the same size drawn from the other neurons."""
    groups: dict[str, list[int]] = {"none": [], "specific": specific}
    for d, name in enumerate(names):
        members = [n for n, o in zip(specific, owner) if o == d]
        if members:
            groups[f"specific.{name}"] = members
    for i, group in enumerate(random_groups(space.total, len(specific), draws, seed, exclude=specific)):
        groups[f"random.{i}"] = group
    return groups


def ablation_outcomes(preps: Sequence[Prepared], space: NeuronSpace, groups: Sequence[Sequence[int]],
                      batch_size: int, accuracy: bool, max_new_tokens: int | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(groups, samples)`` answer log-probability drops (teacher-forced on each sample's own
    answer) and, with ``accuracy``, whether the answer regenerated under each ablation is right
    (every group alike, ``none`` included, under the same length limit)."""
    drops = torch.zeros(len(groups), len(preps), dtype=torch.float64)
    correct = torch.zeros(len(groups), len(preps), dtype=torch.float64)
    for j, prep in enumerate(preps):
        totals = ablated_logprobs(prep, space, groups, batch_size).sum(-1).double()
        drops[:, j] = totals[0] - totals
        if accuracy:
            for g, group in enumerate(groups):
                text = generate_ablated(prep.loaded, prep.sample, space, group, max_new_tokens)
                correct[g, j] = float(is_correct(text, str(prep.sample.expected)))
    return drops, correct


@register
class ModalitySpecific(Explainer):
    """MMNeuron's activation-probability entropy of every decoder MLP neuron across domains (image vs text
    tokens, or question types), and the answer's log-probability (and accuracy) with the low-entropy
    group zeroed, against random groups. Cost: one forward per sample (two with threshold 'quantile'),
    then per sample one ablated copy per group, batched, and with accuracy one generation per group; no
    backward. Huo et al., 2024 (arXiv 2406.11193); Tang et al., 2024 (2402.16438); Huang et al., 2024 (2410.04819)."""

    id = "neurons.modality_specific"
    model_needs = frozenset({"mlp_neurons", "image_tokens"})  # a unit is one entry of every block's MLP, read at image tokens too
    title = "Modality- and domain-specific neurons (activation-probability entropy) and their ablation"
    group = GROUP
    scope = "dataset"
    citations = (MMNEURON, LAPE, MINER)
    summary = (
        "MMNeuron's activation-probability entropy of every decoder MLP neuron across domains (image vs "
        "text tokens, or question types), the low-entropy specialised group, and the answer "
        "log-probability and accuracy when that group is zeroed, against random groups of the same size."
    )

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        domains: str = param("modality", "image vs text tokens, or each sample's extra['question_type']",
                             choices=DOMAIN_KINDS)
        threshold: str = param("positive", "active means act(gate) > 0, or above the layer's quantile",
                               choices=THRESHOLDS)
        quantile: float = param(DEFAULT_QUANTILE, "the layer quantile of activations a neuron must exceed (threshold "
                                "'quantile')", low=0.0, low_open=True, high=1.0, high_open=True)
        top_rate: float = param(TOP_RATE, "share of all neurons kept as the specific group (unless top_k)",
                                low=0.0, low_open=True, high=1.0, high_open=True)
        filter_rate: float = param(FILTER_RATE, "quantile of activation probabilities a candidate must reach in a domain",
                                   low=0.0, high=1.0, high_open=True)
        top_k: int | None = param(None, "size of the specific group (null: top_rate of all neurons)", low=1)
        random_draws: int = param(DEFAULT_SPECIFIC_RANDOM_DRAWS, "random groups of the same size ablated as the baseline",
                                  low=1)
        seed: int = param(0, "seed of the quantile estimate and the random groups")
        accuracy: bool | None = param(None, "regenerate answers under each ablation (null: when every sample has an "
                                            "expected answer)")
        max_new_tokens: int | None = param(None, "regenerated answers' length limit (null: the model's generation config)",
                                           low=1)
        batch_size: int | None = param(None, "ablated copies per forward (null: as many as the device's budget fits)",
                                       low=1)
        fast_attention: bool = param(True, "run the forwards with the fused attention kernel")

    def compute(self, model: LoadedModel, samples: Sequence[ExplainSample], params: Params) -> Explanation:
        """``domains``: image vs text tokens, or each sample's ``extra['question_type']``; ``threshold``: active
        means ``act(gate) > 0`` or above the layer's ``quantile``; the group is the ``top_k`` (default:
        ``top_rate`` of all neurons) lowest-entropy neurons among those reaching the ``filter_rate``
        quantile of activation probabilities; ``accuracy`` regenerates answers under each ablation
        (default: when every sample has an expected answer)."""
        domains, threshold, quantile = params.domains, params.threshold, params.quantile
        top_rate, filter_rate, top_k = params.top_rate, params.filter_rate, params.top_k
        random_draws, seed, accuracy = params.random_draws, params.seed, params.accuracy
        max_new_tokens, fast_attention = params.max_new_tokens, params.fast_attention
        if isinstance(samples, (ExplainSample, Prepared)) or not isinstance(samples, Sequence) or not samples:
            raise MissingInput(f"{self.id}: give a non-empty list of samples (a dataset-scope explainer)")
        preps = [as_prepared(model, s) for s in samples]
        batch_size = batch_size_for(preps[0], params.batch_size)
        space = neuron_space(preps[0].adapter, self.id)
        names = _domain_names(domains, preps, self.id)
        size = max(1, round(top_rate * space.total)) if top_k is None else top_k
        has_expected = all(p.sample.expected for p in preps)
        if accuracy and not has_expected:
            missing = next(p.sample.id for p in preps if not p.sample.expected)
            raise MissingInput(f"{self.id}: accuracy=True but sample {missing!r} has no expected answer")
        accuracy = has_expected if accuracy is None else accuracy

        with fused_attention(preps[0].model, fast_attention):
            thresholds = (layer_quantiles(preps, space, quantile, seed, self.id) if threshold == "quantile"
                          else [0.0] * space.layers)
            counter = count_domains(preps, space, domains, names, thresholds, self.id)
        probs = counter.probabilities()
        entropy = specificity_entropy(probs)
        specific, candidates = select_specific(probs, entropy, size, filter_rate)
        if specific.numel() == 0:
            raise ParamError(f"{self.id}: no neuron is active above the filter in any domain; nothing to select")
        specific_list = specific.tolist()
        owner = probs[:, specific].argmax(0).tolist()
        groups = ablation_groups(space, specific_list, owner, names, random_draws, seed)
        group_names = list(groups)
        with fused_attention(preps[0].model, fast_attention):
            drops, correct = ablation_outcomes(preps, space, list(groups.values()), batch_size, accuracy,
                                               max_new_tokens)

        exp = Explanation(
            self.id,
            {**params.as_dict(), "quantile": quantile if threshold == "quantile" else None, "accuracy": accuracy,
             "batch_size": batch_size},
            Target(text="", token_ids=[], tokens=[], positions=[], probs=[]),
        )
        exp.add("activation_probability", space.table(probs), ("domain", "layer", "unit"))
        exp.add("entropy", space.table(entropy, fill=math.log(len(names))), ("layer", "unit"))
        share = torch.zeros(space.layers, len(names))
        for n, d in zip(specific_list, owner):
            share[space.locate(n)[0], d] += 1
        exp.add("specific_count", share, ("layer", "domain"))
        exp.add("ablation_drop", drops, ("group", "sample"))
        exp.add("ablation_drop.mean", drops.mean(1), ("group",))
        randoms = [i for i, g in enumerate(group_names) if g.startswith("random.")]
        scores: dict[str, float] = {
            "neurons_total": float(space.total),
            "candidates": float(candidates),
            "group_size": float(len(specific_list)),
            "drop_random": float(drops[randoms].mean()),
        }
        for g, name in enumerate(group_names):
            if not name.startswith("random.") and name != "none":
                scores[f"drop_{name}"] = float(drops[g].mean())
        if accuracy:
            exp.add("accuracy", correct.mean(1), ("group",))
            scores["accuracy"] = float(correct[0].mean())
            scores["accuracy_random"] = float(correct[randoms].mean())
            for g, name in enumerate(group_names):
                if not name.startswith("random.") and name != "none":
                    scores[f"accuracy_{name}"] = float(correct[g].mean())
        if domains == "question_type":
            sample_domain = torch.tensor([names.index(p.sample.extra["question_type"]) for p in preps])
            by_domain = torch.stack([drops[:, sample_domain == d].mean(1) for d in range(len(names))], dim=1)
            exp.add("ablation_drop.by_domain", by_domain, ("group", "domain"))
        exp.scores.update(scores)
        exp.meta.update({
            "domains": names,
            "domain_tokens": {name: int(counter.tokens[d]) for d, name in enumerate(names)},
            "domain_positions": DOMAIN_POSITIONS[domains],
            "activation_point": ACTIVATION_POINT,
            "ablation_point": VALUE_POINT,
            "thresholds": thresholds,
            "drop": DROP_NOTE,
            "entropy": "of activation probabilities normalised over domains; never-active neurons get log(domains)",
            "specific": [
                {"label": space.label(n), "layer": space.locate(n)[0], "unit": space.locate(n)[1],
                 "domain": names[d], "entropy": float(entropy[n]),
                 "probabilities": {name: float(probs[k, n]) for k, name in enumerate(names)}}
                for n, d in zip(specific_list, owner)
            ],
            "groups": {name: [space.label(n) for n in members] for name, members in groups.items()},
            "samples": [{"id": p.sample.id, "answer": p.answer.text, "expected": p.sample.expected,
                         "question_type": p.sample.extra.get("question_type")} for p in preps],
            "axis_labels": {"domain": names, "group": group_names, "sample": [p.sample.id for p in preps]},
            "widths": list(space.widths),
        })
        return exp
