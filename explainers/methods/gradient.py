"""Gradient explainers over pixels: saliency, input x gradient, integrated gradients, Grad-CAM.

The target is each answer token's log-probability at its generating position, in one
teacher-forced forward of the final sequence, with every input but ``pixel_values`` fixed; the
whole answer's target is their sum. Pixel attributions are pooled onto every image grid
through the adapter's ``pixel_cell_map`` (Grad-CAM's token scores through its
``vision_token_map``), so one code path serves tiles, merges and dynamic resolutions.

Two engines compute the same numbers. ``captum`` calls Captum's Saliency, InputXGradient and
IntegratedGradients once per answer token, as Captum and Inseq do: T forward and backward
passes (T x n_steps for integrated gradients). ``batched`` (the default) runs one forward per
input (per batch of interpolation points) and takes all T tokens' gradients from that one
retained graph, optionally ``token_batch`` tokens per vectorised backward; the tests check it
against Captum. Because gradients and these attributions are linear in the target, the whole
answer's map is the sum of the per-token ones, at no extra cost.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from xmllm import MissingInput

from ..backward import default_cam_layer, inputs_only_gradients
from xmllm.explainers.prepared import Prepared
from ..explanation import Explanation
from ..forward import eager_unless_fused, fused_attention, logprobs_at, repeat_inputs
from ..hooks import Hooks
from ..masking import baseline_pixels, default_blur_radius
from ..memory import backward_copy_bytes, copies_within, device_type, most_copies, recompute_copy_bytes
from ..models import LoadedModel
from ..models.layout import ImageLayout, grid_names
from ..params import ExplainerParams, ParamError, param
from ..recompute import RECOMPUTE_CHOICES, RECOMPUTE_HELP, recomputed_blocks, resolve
from ..registry import Citation, Explainer, Need, register
from ..scaleplan import ScalePlan, costs

GROUP = "gradient"
POOLS: tuple[str, ...] = ("abs_sum", "sum", "l2")
"""How pixel (or vision-token) scores combine within a cell: sum of |x|, sum of x, sqrt(sum x^2)."""
ENGINES: tuple[str, ...] = ("batched", "captum")
IG_BASELINES: tuple[str, ...] = ("black", "mean", "blur")
IG_METHOD = "gausslegendre"
"""Captum's quadrature for the path integral: exact for polynomials of degree < 2 n_steps."""
DEFAULT_STEPS = 64
"""Path points: on the demo model a black baseline still leaves gaps of a few percent below this."""
GAP_FLOOR = 1e-3
"""Log-probability change (nats) below which a token's completeness gap is not judged: its map is noise-sized."""
GAP_WARNING = 0.05
"""Relative completeness gap above which the explanation's meta advises more path points."""
DEFAULT_INTERNAL_BATCH = 8
"""Most interpolated inputs per forward in integrated gradients on a CPU (fewer where the memory
budget says so; on a GPU up to the device's cap)."""
DEFAULT_TOKEN_BATCH = 1
"""Answer tokens per backward pass over the one retained forward graph. Above 1, the tokens of a
chunk share one vectorised backward (``is_grads_batched``): on a CPU that measured slower than
one plain backward per token (576-token LLaVA, 32 tokens: 44 s at 8 against 27 s at 1); it is
there for accelerators, at the memory of ``token_batch`` gradients at once."""

TOKEN_AXES = ("answer_token", "row", "col")
ANSWER_AXES = ("row", "col")
TARGET_NOTE = (
    "log-probability of each answer token at its generating position (teacher-forced final "
    "sequence, every input but pixel_values fixed); '.answer' maps: the sum over answer tokens"
)

SIMONYAN = Citation(
    "Deep Inside Convolutional Networks: Visualising Image Classification Models and Saliency Maps",
    2013, "1312.6034", "Simonyan, Vedaldi, Zisserman",
)
SHRIKUMAR = Citation(
    "Not Just a Black Box: Learning Important Features Through Propagating Activation Differences",
    2016, "1605.01713", "Shrikumar, Greenside, Shcherbina, Kundaje",
)
SUNDARARAJAN = Citation("Axiomatic Attribution for Deep Networks", 2017, "1703.01365", "Sundararajan, Taly, Yan")
SELVARAJU = Citation(
    "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
    2016, "1610.02391", "Selvaraju et al.",
)
CAPTUM = Citation("Captum: A unified and generic model interpretability library for PyTorch", 2020, "2009.07896",
                  "Kokhlikyan et al.")


# --- the input -------------------------------------------------------------------------------------


def _pixels(prep: Prepared, explainer: str) -> torch.Tensor:
    pixels = prep.inputs.get("pixel_values")
    if pixels is None or not prep.layouts:
        raise MissingInput(f"{explainer}: sample {prep.sample.id!r} has no image to attribute to")
    if not pixels.is_floating_point():
        raise MissingInput(f"{explainer}: pixel_values of dtype {pixels.dtype} cannot be differentiated")
    return pixels


# --- the objective and its gradients ---------------------------------------------------------------


class PixelObjective:
    """``f(x)``: a batch of pixel_values ``(B, *pixel_values.shape)`` -> answer log-probs ``(B, T)``.

    Every other input is the prepared final sequence's, repeated per copy; the copies' images
    follow each other along the pixel_values' first axis, as the models read them.
    """

    def __init__(self, prep: Prepared) -> None:
        self.prep = prep
        self.pixels = prep.inputs["pixel_values"]
        self.fixed = {k: v for k, v in prep.inputs.items() if k != "pixel_values"}
        self.token_ids = prep.target_ids()  # (T,), or (2, T) with a contrast
        self.forwards = 0

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[-1])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        copies = batch.shape[0]
        inputs = repeat_inputs(self.fixed, copies) if copies > 1 else dict(self.fixed)
        inputs["pixel_values"] = batch.reshape(copies * self.pixels.shape[0], *self.pixels.shape[1:])
        self.forwards += 1
        return logprobs_at(self.prep.model, inputs, self.prep.logit_positions, self.token_ids)

    def summed(self, batch: torch.Tensor) -> torch.Tensor:
        """The whole answer's log-probability, ``(B,)``."""
        return self(batch).sum(dim=-1)


def cotangents(num_tokens: int, copies: int, per_token: bool, device: torch.device) -> torch.Tensor:
    """``(K, copies, T)`` output weights: one-hot per answer token (K = T), or all ones (K = 1)."""
    if per_token:
        return torch.eye(num_tokens, device=device).unsqueeze(1).expand(num_tokens, copies, num_tokens)
    return torch.ones(1, copies, num_tokens, device=device)


def vjp(outputs: torch.Tensor, wrt: torch.Tensor, weights: torch.Tensor, token_batch: int) -> torch.Tensor | None:
    """``(K, *wrt.shape)``: the gradient of ``(weights[k] * outputs).sum()`` for every k.

    Chunks of ``token_batch`` rows go through one vectorised backward pass; a model with an
    operation autograd cannot batch falls back to one pass per row. None when ``wrt`` does
    not reach ``outputs``.
    """
    parts: list[torch.Tensor] = []
    for start in range(0, weights.shape[0], token_batch):
        chunk = weights[start : start + token_batch].contiguous()
        batched = chunk.shape[0] > 1
        try:
            (grad,) = torch.autograd.grad(outputs, wrt, chunk if batched else chunk[0], retain_graph=True,
                                          allow_unused=True, is_grads_batched=batched)
        except RuntimeError:
            if not batched:
                raise
            rows = [torch.autograd.grad(outputs, wrt, row, retain_graph=True, allow_unused=True)[0] for row in chunk]
            grad = None if rows[0] is None else torch.stack(rows)
        if grad is None:
            return None
        parts.append(grad.float() if batched else grad.float().reshape(1, *wrt.shape))
    return torch.cat(parts)



# --- pooling onto grids ----------------------------------------------------------------------------


def pool_positions(values: torch.Tensor, cell_map: torch.Tensor, seq_len: int, pool: str) -> torch.Tensor:
    """``(K, *shape)`` scores -> ``(K, seq_len)`` per sequence position, by the cell map ``(*shape)``."""
    index = cell_map.reshape(-1).to(values.device)
    keep = index >= 0
    flat = values.reshape(values.shape[0], -1)[:, keep].float()
    if pool == "abs_sum":
        flat = flat.abs()
    elif pool == "l2":
        flat = flat.square()
    out = torch.zeros(values.shape[0], seq_len, device=values.device).index_add_(1, index[keep], flat)
    return out.sqrt() if pool == "l2" else out



def add_grid_maps(exp: Explanation, layouts: list[ImageLayout], per_position: torch.Tensor, per_token: bool) -> None:
    """``per_position`` (K, seq): K = T answer tokens plus the answer (last row), or the answer alone."""
    for name, grid in grid_names(layouts):
        cells = grid.gather(per_position.cpu())
        if per_token:
            exp.add(name, cells[:-1], TOKEN_AXES)
        exp.add(f"{name}.answer", cells[-1], ANSWER_AXES)


def off_grid_fraction(values: torch.Tensor, cell_map: torch.Tensor) -> float:
    """Share of the |attribution| on pixel values that no grid cell covers (padding, margins)."""
    total = float(values.abs().sum())
    if total == 0.0:
        return 0.0
    off = cell_map.to(values.device) < 0
    return float(values.abs().reshape(values.shape[0], *cell_map.shape)[:, off].sum()) / total


def with_answer(per_target: torch.Tensor, per_token: bool) -> torch.Tensor:
    """Per-token rows plus their sum (the whole answer, by linearity), or the single answer row."""
    return torch.cat([per_target, per_target.sum(0, keepdim=True)]) if per_token else per_target


# --- the pixel-attribution explainers --------------------------------------------------------------


class _PixelAttribution(Explainer):
    """Shared driver: attribute per target, pool onto every grid, score.

    Its :class:`Params` hold what every pixel method shares (pooling, per-token maps, the engine);
    a method with options of its own extends them (integrated gradients: the path)."""

    group = GROUP
    supports_contrast = True
    needs = frozenset({Need.GRADIENTS})
    model_needs = frozenset({"pixel_cells"})  # pixel gradients pool onto cells through the pixel map
    default_pool: str = "sum"

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        pool: str | None = param(None, "how pixel scores combine within a grid cell (null: abs_sum for saliency, "
                                       "sum otherwise)", choices=POOLS)
        per_token: bool = param(True, "a map per answer token besides the whole answer's")
        engine: str = param("batched", "all tokens' gradients from one retained graph, or Captum once per token",
                            choices=ENGINES)
        token_batch: int = param(DEFAULT_TOKEN_BATCH, "answer tokens per vectorised backward pass", low=1)
        fast_attention: bool = param(True, "run the forward with the fused attention kernel (nothing quadratic in "
                                           "the sequence kept for the backward)")
        recompute: bool | str = param("auto", RECOMPUTE_HELP, choices=RECOMPUTE_CHOICES)

    def attribute(self, objective: PixelObjective, x: torch.Tensor,
                  params: Params) -> tuple[torch.Tensor, dict[str, float], dict[str, Any]]:
        """``(K, *pixel_values.shape)`` attributions (K = T per token, or 1 for the answer)."""
        raise NotImplementedError

    def recorded(self, prep: Prepared, params: Params) -> dict[str, Any]:
        """The parameters as the explanation records them: as used, defaults resolved."""
        return {**params.as_dict(), "pool": params.pool or self.default_pool,
                "recompute": uses_recompute(prep, params)}  # a bool already where compute resolved it

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        prep = sample
        pixels = _pixels(prep, self.id)
        params = replace(params, recompute=uses_recompute(prep, params))  # resolved once, recorded as used
        used = self.recorded(prep, params)
        pool, per_token = used["pool"], params.per_token
        cell_map = prep.adapter.pixel_cell_map(prep.inputs)
        objective = PixelObjective(prep)
        x = pixels.detach().unsqueeze(0)
        with inputs_only_gradients(prep.model), fused_attention(prep.model, params.fast_attention), \
                recomputed_blocks(prep.adapter, params.recompute):
            attr, scores, meta = self.attribute(objective, x, params)
        answer = attr.sum(0)
        pooled = pool_positions(with_answer(attr, per_token), cell_map, prep.position_count, pool)
        exp = Explanation(
            self.id,
            used,
            prep.target(),
            scores={**scores, "off_grid_fraction": off_grid_fraction(answer.unsqueeze(0), cell_map)},
            meta={"target": TARGET_NOTE, "model_type": prep.adapter.model_type, "pool": pool,
                  "pixel_values_shape": list(pixels.shape), "forward_passes": objective.forwards, **meta},
        )
        add_grid_maps(exp, prep.layouts, pooled, per_token)
        return exp


def _gradients_at(objective: PixelObjective, x: torch.Tensor, per_token: bool,
                  token_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, *pixels) gradients at ``x`` (1, *pixels) from one forward, and the log-probs (T,)."""
    leaf = x.detach().requires_grad_(True)
    out = objective(leaf)
    weights = cotangents(objective.num_tokens, 1, per_token, out.device)
    grads = vjp(out, leaf, weights, token_batch)
    if grads is None:
        raise ValueError("pixel_values do not reach the answer's log-probability")
    return grads[:, 0], out.detach()[0]


def _captum_per_target(attribution: Any, objective: PixelObjective, x: torch.Tensor, per_token: bool,
                       **kwargs: Any) -> torch.Tensor:
    """Captum's ``attribute`` once per answer token (or once on the summed answer): (K, *pixels)."""
    x = x.detach().requires_grad_(True)
    if per_token:
        rows = [attribution(objective).attribute(x, target=t, **kwargs) for t in range(objective.num_tokens)]
    else:
        rows = [attribution(objective.summed).attribute(x, **kwargs)]
    return torch.cat([r.detach().float() for r in rows])


def _logprobs(objective: PixelObjective, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return objective(x)[0].float()


@register
class Saliency(_PixelAttribution):
    """The gradient of each answer token's log-probability (and the whole answer's) with respect to the
    pixel values, pooled per grid cell (sum of absolute values by default).

    Cost: one forward and one backward per answer token (the batched engine: one forward for all).
    Simonyan, Vedaldi and Zisserman, 2013 (arXiv 1312.6034); Captum, 2020 (arXiv 2009.07896).
    """

    id = "gradient.saliency"
    title = "Pixel saliency: gradient of each answer token's log-probability"
    citations = (SIMONYAN, CAPTUM)
    summary = (
        "The gradient of each answer token's log-probability (and the whole answer's) with respect "
        "to the pixel values, pooled per grid cell as the sum of absolute values by default."
    )
    default_pool = "abs_sum"
    noise_hint = "explain a contrast (--contrast OTHER): the gradient of a saturated probability is near zero"
    evaluation_params: ClassVar[Mapping[str, Any]] = {"per_token": False}

    def attribute(self, objective, x, params):
        if params.engine == "captum":
            from captum.attr import Saliency as CaptumSaliency

            grads = _captum_per_target(CaptumSaliency, objective, x, params.per_token, abs=False)
            values = _logprobs(objective, x)
        else:
            grads, values = _gradients_at(objective, x, params.per_token, params.token_batch)
        return grads, {"answer_logprob": float(values.sum())}, {}


@register
class InputXGradient(_PixelAttribution):
    """Pixel values times the gradient of each answer token's log-probability (a first-order Taylor
    contribution against an all-zero input), summed per grid cell by default.

    Cost: one forward and one backward per answer token (the batched engine: one forward for all).
    Shrikumar et al., 2016 (arXiv 1605.01713); Captum, 2020 (arXiv 2009.07896).
    """

    id = "gradient.input_x_gradient"
    title = "Input x gradient over pixels"
    citations = (SHRIKUMAR, CAPTUM)
    summary = (
        "Pixel values times the gradient of each answer token's log-probability (first-order "
        "Taylor contribution against an all-zero input), summed per grid cell by default."
    )
    noise_hint = ("explain a contrast (--contrast OTHER): the gradient of a saturated probability "
                  "is near zero")
    evaluation_params: ClassVar[Mapping[str, Any]] = {"per_token": False}

    def attribute(self, objective, x, params):
        if params.engine == "captum":
            from captum.attr import InputXGradient as CaptumInputXGradient

            attr = _captum_per_target(CaptumInputXGradient, objective, x, params.per_token)
            values = _logprobs(objective, x)
        else:
            grads, values = _gradients_at(objective, x, params.per_token, params.token_batch)
            attr = grads * x.float()
        return attr, {"answer_logprob": float(values.sum())}, {}


@register
class IntegratedGradients(_PixelAttribution):
    """Gradients averaged along the straight path from a baseline image to the input, times the
    difference: attributions that sum to the change in log-probability, the gap reported.

    Cost: one backward per answer token and path point (n_steps, 64 by default), the points batched
    into forwards. Sundararajan, Taly and Yan, 2017 (arXiv 1703.01365); Captum, 2020 (arXiv 2009.07896).
    """

    id = "gradient.integrated"
    title = "Integrated gradients over pixels"
    citations = (SUNDARARAJAN, CAPTUM)
    summary = (
        "Gradients averaged along the straight path from a baseline image (black, mean colour or "
        "blurred, through the model's processor) to the input, times the difference; attributions "
        "sum to the change in log-probability (completeness), and the gap is reported."
    )
    evaluation_params: ClassVar[Mapping[str, Any]] = {"per_token": False}
    """The default path points are kept: with 8, the whole answer's completeness gap was 50% (median)
    on demo questions over two pictures, 25% with 16, 5% with 32, 0.2% with 64; an evaluation at 8
    scored the quadrature's error, not the method."""

    @classmethod
    def scale_plan(cls, prep: Prepared, full_layers: int) -> ScalePlan:
        """One chunk of path points: the peak is one chunk's, whatever n_steps."""
        points = path_batch(prep, cls.Params())
        answer = len(prep.answer.token_ids)
        return ScalePlan({"n_steps": points}, f"n_steps {points} (one chunk of {points} path points; {DEFAULT_STEPS} "
                         "by default, chunked the same way)", cost=costs(DEFAULT_STEPS + 2, DEFAULT_STEPS * answer))

    @dataclass(frozen=True)
    class Params(_PixelAttribution.Params):
        n_steps: int = param(DEFAULT_STEPS, "points on the path (Gauss-Legendre quadrature)", low=1)
        internal_batch_size: int | None = param(None, "path points per forward (null: as many as the memory budget "
                                                      "fits, at most 8 on a CPU)", low=1)
        baseline: str = param("black", "the image the path starts from, through the model's processor",
                              choices=IG_BASELINES)
        blur_radius: float | None = param(None, "blur baseline's radius in pixels (null: half a grid cell)",
                                          low=0.0, low_open=True)

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        params = replace(params, recompute=uses_recompute(sample, params))  # the path batch depends on it
        if params.internal_batch_size is None:  # resolved once, recorded as used
            params = replace(params, internal_batch_size=path_batch(sample, params))
        return super().compute(model, sample, params)

    def recorded(self, prep: Prepared, params: Params) -> dict[str, Any]:
        used = super().recorded(prep, params)
        if params.baseline != "blur":  # a radius only means something for the blur baseline
            del used["blur_radius"]
        elif params.blur_radius is None:  # record the radius actually used
            used["blur_radius"] = default_blur_radius(prep)
        used["method"] = IG_METHOD
        return used

    def attribute(self, objective, x, params):
        steps, batch = params.n_steps, params.internal_batch_size
        per_token, token_batch = params.per_token, params.token_batch
        radius = params.blur_radius if params.baseline == "blur" else None
        base = baseline_pixels(objective.prep, params.baseline, blur_radius=radius)
        base = base.detach().unsqueeze(0)
        if params.engine == "captum":
            from captum.attr import IntegratedGradients as CaptumIG

            attr = _captum_per_target(CaptumIG, objective, x, per_token, baselines=base, n_steps=steps,
                                      method=IG_METHOD, internal_batch_size=batch)
        else:
            attr = _path_integral(objective, x, base, steps, batch, per_token, token_batch)
        at_input, at_base = _logprobs(objective, x), _logprobs(objective, base)
        change = at_input - at_base  # (T,)
        sums = attr.reshape(attr.shape[0], -1).sum(-1)
        expected = change if per_token else change.sum(0, keepdim=True)
        gaps = (sums - expected).abs()
        answer_gap = float((sums.sum() - change.sum()).abs())
        scores = {
            "answer_logprob": float(at_input.sum()),
            "baseline_logprob": float(at_base.sum()),
            "completeness_gap": answer_gap,
            "completeness_gap_relative": answer_gap / max(float(change.sum().abs()), torch.finfo(torch.float32).tiny),
            "completeness_gap_max_token": float(gaps.max()),
        }
        meta = {"completeness": "|sum of attributions - (f(input) - f(baseline))|, f the log-probability",
                "token_logprob_change": change.tolist()}
        # every token's gap against its own change, not only the whole answer's (one token can miss
        # most of its change while the sum looks fine); changes under GAP_FLOOR are noise-sized
        relative = gaps / expected.abs().clamp_min(GAP_FLOOR)
        scores["completeness_gap_relative_max_token"] = float(relative.max())
        labels = list(objective.prep.answer.tokens) if per_token else ["the whole answer"]
        missed = [(labels[k], float(r)) for k, r in enumerate(relative) if r > GAP_WARNING]
        if per_token and scores["completeness_gap_relative"] > GAP_WARNING:
            missed.append(("the whole answer", scores["completeness_gap_relative"]))
        if missed:
            worst = ", ".join(f"{name!r} {share:.0%}" for name, share in missed[:4])
            meta["warning"] = (f"attributions miss part of the log-probability change ({worst}"
                               f"{', ...' if len(missed) > 4 else ''}): increase n_steps (now {steps})")
        return attr, scores, meta


def uses_recompute(prep: Prepared, params: Any) -> bool:
    """``params.recompute`` resolved: "auto" recomputes where one kept backward does not fit the budget."""
    eager = eager_unless_fused(prep, params.fast_attention)
    return resolve(params.recompute, lambda: backward_copy_bytes(prep, eager=eager), prep.loaded.device,
                   model=prep.model)


def path_batch(prep: Prepared, params: Any) -> int:
    """Path points per forward that fit the memory budget: each keeps one backward's activations and
    its gradients for every answer token (float32); the accumulated attributions are fixed. At most
    ``n_steps``, and :data:`DEFAULT_INTERNAL_BATCH` on a CPU."""
    pixels = int(prep.inputs["pixel_values"].numel())
    targets = int(prep.target_ids().shape[-1]) if params.per_token else 1
    eager = eager_unless_fused(prep, params.fast_attention)
    kept = recompute_copy_bytes if uses_recompute(prep, params) else backward_copy_bytes
    per_point = kept(prep, eager=eager) + 2 * targets * pixels * 4
    device = prep.loaded.device
    cap = DEFAULT_INTERNAL_BATCH if device_type(device) == "cpu" else most_copies(device)
    return copies_within(per_point, device, fixed=targets * pixels * 4, most=min(cap, params.n_steps))


def _path_integral(objective: PixelObjective, x: torch.Tensor, base: torch.Tensor, n_steps: int, batch: int,
                   per_token: bool, token_batch: int) -> torch.Tensor:
    """Integrated gradients with Captum's quadrature: one forward per ``batch`` path points and one
    retained graph for all answer tokens, instead of Captum's forward per token and point."""
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters(IG_METHOD)
    sizes = torch.tensor(step_sizes(n_steps), dtype=torch.float32)
    points = torch.tensor(alphas(n_steps), dtype=torch.float32)
    delta = (x - base).float()
    total: torch.Tensor | None = None
    for start in range(0, n_steps, batch):
        alpha = points[start : start + batch].to(x.device)
        shape = (-1, *([1] * (x.dim() - 1)))
        path = (base.float() + alpha.view(shape) * delta).to(x.dtype).requires_grad_(True)
        out = objective(path)  # (k, T)
        weights = cotangents(objective.num_tokens, path.shape[0], per_token, out.device)
        grads = vjp(out, path, weights, token_batch)  # (K, k, *pixels)
        if grads is None:
            raise ValueError("pixel_values do not reach the answer's log-probability")
        weighted = (grads * sizes[start : start + batch].to(grads.device).view(1, *shape)).sum(1)
        total = weighted if total is None else total + weighted
    return total * delta


# --- Grad-CAM on a vision block --------------------------------------------------------------------



def gradcam_scores(acts: torch.Tensor, grads: torch.Tensor, token_map: torch.Tensor,
                   image_of_token: torch.Tensor) -> torch.Tensor:
    """Grad-CAM per vision token: ``relu(sum_c w_c a_c)``, ``w_c`` the mean gradient over the
    tokens of the same image (tokens feeding no cell, e.g. the class token, left out): (K, M).

    ``acts`` (M, D), ``grads`` (K, M, D), ``token_map`` / ``image_of_token`` (M,).
    """
    cams = torch.zeros(grads.shape[0], acts.shape[0], device=acts.device)
    for image in torch.unique(image_of_token[image_of_token >= 0]).tolist():
        picked = image_of_token == image
        weights = grads[:, picked].mean(dim=1)  # (K, D)
        cams[:, picked] = torch.relu(torch.einsum("md,kd->km", acts[picked], weights))
    return cams


@contextlib.contextmanager
def keep_output(module: torch.nn.Module, store: list[torch.Tensor]) -> Iterator[None]:
    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        store.append(output[0] if isinstance(output, (tuple, list)) else output)

    with Hooks() as hooks:
        hooks.add(module.register_forward_hook(hook))
        yield


@register
class GradCAM(Explainer):
    """Grad-CAM on the patch tokens of a vision block's output: channel weights are the mean gradient
    over the image's patch tokens, the map relu(sum_c w_c a_c) per token, pooled onto each grid cell.

    Cost: one forward and one backward per answer token (all from one retained graph).
    Selvaraju et al., 2016 (arXiv 1610.02391).
    """

    id = "gradient.gradcam"
    title = "Grad-CAM on a vision-tower block"
    group = GROUP
    supports_contrast = True
    needs = frozenset({Need.GRADIENTS})
    model_needs = frozenset({"pixel_cells", "vision_blocks"})  # a vision block's output; cells through the pixel map
    citations = (SELVARAJU,)
    summary = (
        "Grad-CAM on the patch tokens of a vision block's output: channel weights are the mean "
        "gradient of the answer token's log-probability over the image's patch tokens, the map "
        "relu(sum_c w_c a_c) per token (class token excluded), pooled onto each grid cell."
    )
    noise_hint = "explain a contrast (--contrast OTHER) or pick another layer (--param gradient.gradcam.layer=N)"
    evaluation_params: ClassVar[Mapping[str, Any]] = {"per_token": False}

    @dataclass(frozen=True)
    class Params(ExplainerParams):
        layer: int | None = param(None, "vision block to explain, negative from the end (null: the last one the "
                                        "decoder reads)")
        pool: str = param("sum", "how vision-token scores combine within a grid cell", choices=POOLS)
        per_token: bool = param(True, "a map per answer token besides the whole answer's")
        token_batch: int = param(DEFAULT_TOKEN_BATCH, "answer tokens per vectorised backward pass", low=1)
        fast_attention: bool = param(True, "run the forward with the fused attention kernel (nothing quadratic in "
                                           "the sequence kept for the backward)")
        recompute: bool | str = param("auto", RECOMPUTE_HELP, choices=RECOMPUTE_CHOICES)

    def compute(self, model: LoadedModel, sample: Prepared, params: Params) -> Explanation:
        prep = sample
        pool, per_token, token_batch = params.pool, params.per_token, params.token_batch
        pixels = _pixels(prep, self.id)
        blocks = prep.adapter.vision_layers()
        index = self._layer(params.layer, prep.adapter, len(blocks))
        token_map = prep.adapter.vision_token_map(prep.inputs).to(pixels.device)
        objective = PixelObjective(prep)
        store: list[torch.Tensor] = []
        recompute = uses_recompute(prep, params)
        with inputs_only_gradients(prep.model), fused_attention(prep.model, params.fast_attention), \
                recomputed_blocks(prep.adapter, recompute), keep_output(blocks[index], store):
            leaf = pixels.detach().unsqueeze(0).requires_grad_(True)  # keeps the blocks in the graph
            out = objective(leaf)
            if len(store) != 1:
                raise ValueError(f"{self.id}: vision block {index} ran {len(store)} times in one forward")
            act = store[0]
            weights = cotangents(objective.num_tokens, 1, per_token, out.device)
            grads = vjp(out, act, weights, token_batch)
        if grads is None:
            raise ParamError(f"{self.id}: layer={index}: this vision block's output does not reach the answer "
                             f"(the model reads vision block {default_cam_layer(prep.adapter)})")
        if tuple(token_map.shape) != tuple(act.shape[:-1]):
            raise ValueError(f"{self.id}: vision block output {tuple(act.shape)} does not match the vision-token map "
                             f"{tuple(token_map.shape)}")
        hidden = act.shape[-1]
        flat_map = token_map.reshape(-1)
        grads = with_answer(grads.reshape(grads.shape[0], -1, hidden), per_token)
        cams = gradcam_scores(act.detach().float().reshape(-1, hidden), grads, flat_map,
                              _image_of(prep, flat_map))
        pooled = pool_positions(cams, flat_map, prep.position_count, pool)
        exp = Explanation(
            self.id, {"layer": index, "pool": pool, "per_token": per_token, "token_batch": token_batch,
                      "fast_attention": params.fast_attention, "recompute": recompute},
            prep.target(),
            scores={"answer_logprob": float(out.detach().sum())},
            meta={"target": TARGET_NOTE, "model_type": prep.adapter.model_type, "layer_name": f"vision.blocks.{index}",
                  "vision_layers": len(blocks), "activation_shape": list(act.shape),
                  "weights": "per image: mean gradient over the tokens that feed its grid cells"},
        )
        add_grid_maps(exp, prep.layouts, pooled, per_token)
        return exp

    def _layer(self, layer: int | None, adapter: Any, count: int) -> int:
        """The block index, checked against the model's vision depth (negative from the end)."""
        if layer is None:
            return default_cam_layer(adapter)
        if not -count <= layer < count:
            raise ParamError(f"{self.id}: parameter layer={layer!r} must be a vision block index in "
                             f"{-count}..{count - 1}")
        return layer % count


def _image_of(prep: Prepared, token_map: torch.Tensor) -> torch.Tensor:
    """For each vision token, the index of the image whose grid it feeds (-1: none)."""
    lookup = torch.full((prep.position_count,), -1, dtype=torch.long)
    for index, layout in enumerate(prep.layouts):
        lookup[layout.all_positions] = index
    lookup = lookup.to(token_map.device)
    return torch.where(token_map >= 0, lookup[token_map.clamp_min(0)], torch.full_like(token_map, -1))

