"""The Python API: what the ``xmllm`` commands do, as functions for scripts and notebooks.

Every command is a thin wrapper over one of these, so a notebook and the command line give the
same numbers for the same inputs and seed::

    import xmllm

    model = xmllm.load_model("demo")
    run = xmllm.explain(model, "shapes.png", "What colour is the circle?",
                        ["relevancy.chefer", "gradient.integrated", "perturbation.occlusion"])
    run.answer["text"], run.answer["probs"]      # the answer and each token's probability
    run["perturbation.occlusion"].maps["image"]  # (answer token, row, col) array
    run                                          # in a notebook: maps, why panel, token table
    run.show(interactive=True)                   # the interactive report, inline
    run.save("runs/circle")                      # what `xmllm explain --out` writes
    again = xmllm.load_run("runs/circle")        # read back without the model
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xmllm.errors import XmllmError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from xmllm.audit.driver import AuditOutcome
    from .catalog import Catalog
    from .explainers.models import LoadedModel
    from .video import Video
    from .pipeline import Plan
    from xmllm.report.explained import Run

def load_model(spec: str | os.PathLike[str] = "demo", device: str = "auto", dtype: str = "auto",
               revision: str | None = None, *, device_map: Any = None, device_memory: Any = None,
               offload_folder: str | os.PathLike[str] | None = None) -> "LoadedModel":
    """Load a model with its processor and family adapter: ``"demo"`` (the embedded demo model),
    a local Hugging Face folder, or a hub id already in the local cache.

    ``device`` is ``auto`` (CUDA when present, else the CPU), ``cpu`` or ``cuda[:N]``; ``dtype`` is
    ``auto`` (bfloat16 on CUDA, float32 on the CPU), ``float32``, ``bfloat16`` or ``float16``;
    ``revision`` pins a hub id's branch, tag or commit (recorded in the provenance). Weights are read from safetensors only and remote code is never run. Explainers that need
    attention weights switch the model to eager attention themselves while they run.

    ``device_map="auto"`` shards a model too large for one GPU: its blocks spread over the GPUs
    within ``device_memory`` (``"0=20GiB,1=20GiB,cpu=64GiB"`` or ``{0: "20GiB", "cpu": "64GiB"}``),
    the rest kept in CPU memory and then on disk in ``offload_folder`` (default: a scratch folder
    under xmllm's cache, removed after), run one block at a time. It needs accelerate
    (``pip install xmllm[offload]``); ``device`` is then left ``auto``. Every explainer gives the
    same results as on one device; the provenance records the map.

    Example:

        model = xmllm.load_model("demo", device="cpu")
        model.provenance()["weights_sha256"][:12]
        big = xmllm.load_model("llava-hf/llava-1.5-13b-hf", device_map="auto",
                               device_memory="0=20GiB,cpu=64GiB")
    """
    from .explainers.models import load_model as _load

    return _load(spec, device=device, dtype=dtype, revision=revision, device_map=device_map,
                 device_memory=device_memory, offload_folder=offload_folder)


def _model(model: "LoadedModel | str | os.PathLike[str]", device: str, dtype: str,
           placed: Mapping[str, Any] | None = None) -> "LoadedModel":
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, device=device, dtype=dtype, **(placed or {}))
    if placed and any(value is not None for value in placed.values()):
        raise XmllmError("device_map, device_memory and offload_folder apply to a model loaded here: give them "
                         "to load_model for a loaded one")
    return model


def as_image(image: Any, what: str = "image") -> "Image.Image":
    """A PIL RGB image from a path, a PIL image or an array (H x W x 3 or H x W; uint8 0-255, or
    floats 0-1); a one-line error otherwise."""
    import numpy as np
    from PIL import Image

    from xmllm.images import load_image

    if isinstance(image, (str, os.PathLike)):
        return load_image(Path(image))
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = np.moveaxis(array, 0, -1)  # channels first (a tensor's layout)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3) or 0 in array.shape:
            raise XmllmError(f"{what}: an array image must be H x W or H x W x 3, got shape {tuple(array.shape)}")
        if array.dtype.kind == "f":
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
                raise XmllmError(f"{what}: a float array image must hold values in [0, 1]")
            array = np.round(array * 255)
        elif array.dtype.kind not in "ui" or array.min() < 0 or array.max() > 255:
            raise XmllmError(f"{what}: an integer array image must hold values 0-255")
        return Image.fromarray(array.astype(np.uint8)).convert("RGB")
    raise XmllmError(f"{what}: expected a file path, a PIL image or an array, not {type(image).__name__}")


def explain(
    model: "LoadedModel | str | os.PathLike[str]",
    image: Any = None,
    question: str | None = None,
    explainers: "Sequence[str] | Plan | None" = None,
    *,
    video: "str | os.PathLike[str] | Video | None" = None,
    frames: int | None = None,
    leaf: str | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    expected: str | None = None,
    sample_id: str | None = None,
    answer: str | None = None,
    contrast: str | None = None,
    max_new_tokens: int | None = None,
    max_memory: int | str | None = None,
    faithfulness: bool = True,
    device: str = "auto",
    dtype: str = "auto",
    device_map: Any = None,
    device_memory: Any = None,
    offload_folder: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> "Run":
    """Explain the model's answer to ``question`` about ``image`` with each explainer.

    ``model`` is a loaded model (:func:`load_model`) or a spec to load. ``image`` is a path, a PIL
    image or an array (or a list of them for several images). ``video`` (a file, instead of
    ``image``; or a clip decoded by :func:`xmllm.video.load_video`, used as it is where it holds the
    frames wanted) gives ``frames`` evenly spaced frames (default: as many as the family's video
    processor samples, else 8), decoded by PyAV and fed as pictures in order; the manifest records
    each frame's index and time. ``explainers`` names explainer ids
    (default: every sample-level one); ``leaf`` takes a catalog leaf's instead. ``params`` maps an
    explainer id to its parameters, checked against the explainer's declaration before any model
    work (``xmllm explainers ID`` lists them). The same inputs and seed give the same numbers.

    By default the model's own greedy answer is explained, generated up to ``max_new_tokens``
    (default: the model's generation config; the run records whether the answer ended or was cut).
    ``answer`` explains a given answer instead (scored by the model, its token probabilities
    shown). ``contrast`` explains "this answer rather than that one": each answer position's
    log-probability minus the contrast's, for every gradient, relevancy and perturbation
    explainer (the others are skipped, with the reason, as is any explainer whose inputs this
    sample lacks; one asked for alone is an error instead).

    ``explainers`` may instead be a :class:`~xmllm.pipeline.Plan` (:func:`xmllm.pipeline.make_plan`,
    as ``xmllm explain`` makes one to name its flags in errors): it then holds the parameters,
    seed, answer, contrast and token limit, and those arguments are left out.

    ``max_memory`` (bytes, or a size such as ``"20GB"``) bounds the tensor memory each explainer
    adds; they chunk their batches to fit it (default: the GPU's free memory, 1 GiB on a CPU).
    ``device_map``, ``device_memory`` and ``offload_folder`` shard and offload a model loaded here
    (see :func:`load_model`).

    Returns a :class:`~xmllm.report.explained.Run`: the answer with per-token probabilities
    (``run.answer``), each :class:`~xmllm.explainers.explanation.Explanation` by id (``run[id]``),
    provenance (``run.manifest``). In a notebook a run shows itself light (static maps, the why
    panel, the answer's tokens); ``run.show(interactive=True)`` shows the interactive report.

    Example:

        run = xmllm.explain(model, "shapes.png", "What colour is the diamond?", ["gradient.integrated"],
                            params={"gradient.integrated": {"n_steps": 16}}, contrast="blue")
    """
    from xmllm.explainers.prepared import ExplainSample
    from .pipeline import Plan, make_plan
    from .runner import resolve_explainers, run_explainers

    if isinstance(explainers, Plan):
        if leaf is not None or params or seed or answer is not None or contrast is not None \
                or max_new_tokens is not None:
            raise XmllmError("explain: give a plan's settings (params, seed, answer, contrast, max_new_tokens) "
                             "to make_plan, not beside the plan")
        plan = explainers
    else:
        if isinstance(explainers, str):
            explainers = [e.strip() for e in explainers.split(",") if e.strip()]
        ids = resolve_explainers(list(explainers) if explainers else None, leaf)
        plan = make_plan(ids, params, answer=answer, contrast=contrast, max_new_tokens=max_new_tokens, seed=seed)
    budget = _budget(max_memory)
    if question is None:
        raise XmllmError("question: must be a non-empty string")
    if (image is None) == (video is None):
        raise XmllmError("give an image (or a list of images) or a video, not both and not neither")
    if frames is not None and video is None:
        raise XmllmError("frames: applies to a video")
    clip = None
    if video is not None:  # read before the model loads: a bad video is one line, at once
        from .video import DEFAULT_FRAMES, Video, load_video

        clip = video if isinstance(video, Video) else load_video(video, frames or DEFAULT_FRAMES)
        images = clip.frames
        name = sample_id or Path(clip.path).stem
    else:
        images = [as_image(img, f"image {k}") for k, img in enumerate(image)] if isinstance(image, (list, tuple)) \
            else [as_image(image)]
        name = sample_id or (Path(image).stem if isinstance(image, (str, os.PathLike)) else "sample")
    loaded = _model(model, device, dtype, {"device_map": device_map, "device_memory": device_memory,
                                           "offload_folder": offload_folder})
    if clip is not None:
        from .video import frames_for, video_record

        clip = frames_for(loaded, clip, question, frames, plan)
        images = clip.frames
    sample = ExplainSample(images, question, id=name, expected=expected,
                           extra={"video": video_record(clip)} if clip is not None else {})
    from .explainers.memory import memory_budget

    with memory_budget(budget):
        return run_explainers(loaded, sample, plan, progress=progress, faithfulness=faithfulness)


def _budget(max_memory: int | str | None, what: str = "max_memory") -> int | None:
    from .explainers.memory import parse_memory

    return None if max_memory is None else parse_memory(max_memory, what)


def load_run(folder: str | os.PathLike[str]) -> "Run":
    """Read a run folder (written by :meth:`Run.save` or ``xmllm explain --out``) back, without
    the model: the same explanations, arrays equal to the saved ones, and the provenance."""
    from xmllm.report.explained import load_run as _load

    return _load(Path(folder))


def evaluate(
    model: "LoadedModel | str | os.PathLike[str]" = "demo",
    *,
    samples: str | os.PathLike[str] | None = None,
    demo: int | None = None,
    demo_pictures: int | None = None,
    explainers: Sequence[str] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    baseline: str | None = None,
    steps: int | None = None,
    sanity_samples: int | None = None,
    out: str | os.PathLike[str] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_memory: int | str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Which explainer to trust: score every image-map explainer against ground-truth masks
    (pointing game, relevance mass and rank, deletion and insertion against random floors, the
    model-randomisation check) over a JSONL sample set (``samples``), ``demo`` N grounded demo
    questions, or ``demo_pictures`` N demo questions over two pictures or a clip's three frames whose
    evidence is in one of them (also scored by image pointing). Returns the result (``evaluation.json``'s content); with ``out``, also writes
    ``evaluation.json``, ``table.txt`` and the "Which explainer to trust" page there.

    Example:

        result = xmllm.evaluate("demo", demo=50, explainers=["gradient.saliency"])
        result["summary"]["gradient.saliency"]["pointing_game"]
    """
    from .evaluation import SANITY_SAMPLES, EvaluationConfig, demo_samples, jsonl_samples
    from .evaluation import evaluate as _evaluate
    from .evaluation.scoring import check_options
    from .runner import resolve_explainers

    if sum(x is not None for x in (samples, demo, demo_pictures)) != 1:
        raise XmllmError("give one of samples (a JSONL sample set), demo (a number of demo questions) or "
                         "demo_pictures (a number of demo questions over several pictures)")
    check_options(baseline=baseline, steps=steps, sanity_samples=sanity_samples, demo=demo,
                  demo_pictures=demo_pictures, out=out)
    budget = _budget(max_memory)
    named = list(explainers or [])
    ids = resolve_explainers(named or None)
    config = EvaluationConfig(ids, {str(k): dict(v or {}) for k, v in (params or {}).items()}, explicit=bool(named),
                              seed=seed, baseline=baseline, steps=steps,
                              sanity_samples=SANITY_SAMPLES if sanity_samples is None else sanity_samples)
    planned = config.plan()  # every parameter checked here, before the samples and the model
    if samples is not None:
        sample_set = jsonl_samples(Path(samples))
        source = {"source": "jsonl", "path": str(samples)}
    elif demo is not None:
        sample_set = demo_samples(demo, seed)
        source = {"source": "demo", "seed": seed, "grounded_only": True}
    else:
        sample_set = demo_samples(demo_pictures, seed, pictures=True)
        source = {"source": "demo", "seed": seed, "grounded_only": True, "pictures": True}
    loaded = _model(model, device, dtype)
    from .explainers.memory import memory_budget

    with memory_budget(budget):
        result = _evaluate(loaded, sample_set, config, source, progress, planned)
    if out is not None:
        save_evaluation(result, Path(out))
    return result


def save_evaluation(result: dict[str, Any], out: Path) -> None:
    """Write ``evaluation.json``, ``table.txt`` and the trust page with its plots into ``out``."""
    from .evaluation import TABLE_NAME, save_result, text_table, write_page
    from xmllm.files import write_atomic

    save_result(result, out)
    write_atomic(out / TABLE_NAME, text_table(result))
    write_page(result, out)


def audit(config: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
          overrides: Mapping[str, Any] | None = None, fail_fast: bool = False, retry_failed: bool = False,
          progress: bool = True) -> "AuditOutcome":
    """Run the audit a YAML config describes (``xmllm run CONFIG``): explainers over a whole
    sample set, resumable, with per-sample reports, ``summary.html``, ``audit.json`` and a site
    section. ``overrides`` are dotted config keys (``{"executor.kind": "ray", "limit": 10}``).

    Example:

        outcome = xmllm.audit("audit.yaml", overrides={"limit": 20})
        outcome.summary, outcome.failed
    """
    from .audit import load_config, run_audit

    loaded = load_config(Path(config), dict(overrides or {}))
    return run_audit(loaded, Path(out) if out is not None else None, fail_fast=fail_fast,
                     retry_failed=retry_failed, progress=progress)


def catalog(path: str | os.PathLike[str] | None = None) -> "Catalog":  # xmllm.catalog(...) calls the package
    """The survey's taxonomy (Dang et al., arXiv 2412.02104) as a validated catalog: three
    perspectives, sixteen leaves, the cited methods, and the explainers that put each leaf into
    practice; ``path`` validates another catalog file instead.

    Example:

        [leaf.id for leaf in xmllm.catalog().leaves()][:3]
    """
    from .catalog import load_catalog

    return load_catalog(path)


def explainers() -> list[dict[str, Any]]:
    """Every registered explainer with its metadata and declared parameters (what
    ``xmllm explainers --json`` prints)."""
    from .explainers.registry import describe_all

    return describe_all()


__all__ = ["as_image", "audit", "catalog", "evaluate", "explain", "explainers", "load_model",
           "load_run", "save_evaluation"]
