"""``xmllm explain``: run explainers on one image and question, save arrays, a manifest, the
image and a self-contained HTML report."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from xmllm.errors import XmllmError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="explain the model's answer to a question about an image")
    p.add_argument("--model", default="demo", help="'demo', a local folder or a hub id (default demo)")
    add_picture_options(p)
    p.add_argument("--question", required=True, help="the question")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--explainers", default="", help="comma-separated explainer ids (default: all sample-level ones)")
    group.add_argument("--leaf", help="a catalog leaf id: run its implemented explainers")
    p.add_argument("--param", action="append", default=[], metavar="ID.NAME=VALUE",
                   help="an explainer parameter, e.g. perturbation.occlusion.window=2 (repeatable; VALUE as JSON; 'xmllm explainers ID' lists an explainer's parameters)")
    p.add_argument("--expected", help="the expected answer, if known (recorded in the manifest)")
    p.add_argument("--answer", metavar="TEXT", help="explain this answer instead of the model's own (scored by the model)")
    p.add_argument("--contrast", metavar="TEXT", help="explain the answer rather than TEXT: log p(answer) - log p(TEXT) "
                                                      "per answer position (gradient, relevancy, perturbation)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="the generated answer's token limit (default: the model's; the run says if it was hit)")
    p.add_argument("--seed", type=int, default=0)
    add_model_options(p)
    add_dispatch_options(p)
    add_memory_option(p)
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: explanations.npz, manifest.json, the image and report.html")
    p.set_defaults(func=run)


def add_picture_options(p: argparse.ArgumentParser) -> None:
    """``--image`` (repeatable) or ``--video`` with ``--frames``: what the question is about."""
    p.add_argument("--image", type=Path, action="append", default=[],
                   help="image file; repeat it for several images, in the order the question refers to them")
    p.add_argument("--video", type=Path, default=None,
                   help="a video file instead of images: evenly spaced frames, decoded by PyAV (pip install xmllm[video])")
    p.add_argument("--frames", type=int, default=None, metavar="N",
                   help="frames taken from --video (default: as many as the family's video processor samples, else 8)")


def pictures(args: argparse.Namespace) -> tuple[Any, dict]:
    """The images (checked readable) or the video arguments of the API, before any model work;
    one line naming the flag or file otherwise."""
    from ..images import load_image

    if bool(args.image) == (args.video is not None):
        raise XmllmError("give --image (repeatable) or --video: one of them")
    if args.frames is not None and args.video is None:
        raise XmllmError("--frames applies to --video")
    if args.video is not None:
        from ..video import DEFAULT_FRAMES, load_video

        # decoded now (a bad video is one line, at once) and handed on decoded, not read again
        return None, {"video": load_video(args.video, args.frames or DEFAULT_FRAMES), "frames": args.frames}
    for path in args.image:  # every picture readable before any output (a bad one is one line)
        load_image(path)
    return (args.image[0] if len(args.image) == 1 else list(args.image)), {}


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, as every command that loads a model takes them."""
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and activations (default auto: bfloat16 on CUDA, float32 on the CPU)")


def add_dispatch_options(p: argparse.ArgumentParser) -> None:
    """``--device-map``, ``--device-memory`` and ``--offload-folder``: shard the model over GPUs
    and offload the rest to CPU memory and disk (accelerate's dispatch; ``pip install xmllm[offload]``)."""
    p.add_argument("--device-map", default=None, choices=("auto", "balanced", "balanced_low_0", "sequential"),
                   help="spread the model's blocks over the GPUs, the rest in CPU memory and then on disk "
                        "(needs accelerate: pip install xmllm[offload]; replaces --device)")
    p.add_argument("--device-memory", metavar="DEVICE=SIZE,...", default=None,
                   help="weights each device may hold under --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB "
                        "(DEVICE: a GPU index, cuda:N, mps or cpu; what does not fit goes to disk)")
    p.add_argument("--offload-folder", type=Path, metavar="DIR", default=None,
                   help="where --device-map keeps blocks offloaded to disk (default: a scratch folder under "
                        "xmllm's cache, removed after)")


def dispatch_options(args: argparse.Namespace) -> dict:
    """The ``load_model`` arguments of ``--device-map``, ``--device-memory`` and ``--offload-folder``,
    checked before any model work (one line naming the flag otherwise)."""
    from ..explainers.models.dispatch import make_dispatch

    device_map = getattr(args, "device_map", None)
    memory = getattr(args, "device_memory", None)
    folder = getattr(args, "offload_folder", None)
    dispatch = make_dispatch(device_map, memory, folder, flag="--device-map", memory_flag="--device-memory")
    if dispatch is None:
        return {}
    if getattr(args, "device", "auto") != "auto":
        raise XmllmError(f"--device {args.device} and --device-map: give one (the device map places every block)")
    return {"device_map": dispatch}


def add_memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="tensor memory each explainer may add, e.g. 20GB or 512MiB; batches are chunked to fit "
                        "(default: the GPU's free memory, 1 GiB on a CPU)")


def check_out(out: Path) -> None:
    """``--out`` before any model work: a new folder, an empty one, or an earlier run's (replaced
    whole), on a file system that takes writes (an empty file is made and removed where the run
    folder will be staged: beside ``out``, or in its nearest existing ancestor)."""
    from xmllm.audit.store import OutputError
    from xmllm.files import check_writable
    from xmllm.report.explained import ARRAYS, MANIFEST, REPORT

    if out.exists() and not out.is_dir():
        raise XmllmError(f"--out {out}: exists and is not a folder")
    if out.is_dir():
        if os.path.ismount(out):
            raise XmllmError(f"--out {out}: a mount point, which cannot be replaced by a renamed folder; "
                             f"name a folder inside it")
        ours = {MANIFEST, ARRAYS, REPORT}
        others = sorted(p.name for p in out.iterdir()
                        if p.name not in ours and not (p.name.startswith("image_") and p.suffix == ".png")
                        and not (p.name.startswith(".") and p.is_file()))
        if others:
            what = "an earlier run's folder that also holds" if (out / MANIFEST).is_file() else "a folder with"
            raise XmllmError(f"--out {out}: {what} other files ({others[0]}, ...), which the run folder, written "
                             f"whole, would replace; choose a new or empty folder")
    try:
        check_writable(out.parent if out.is_dir() else out)
    except OSError as exc:
        raise OutputError(out, exc) from None


def run(args: argparse.Namespace) -> int:
    """Every check once, before the model loads: the output folder and device here, the explainers,
    parameters, answer, contrast and token limit in the plan (naming the flags), the question and
    image in the API."""
    from tqdm import tqdm

    from ..api import explain
    from ..explainers.memory import parse_memory
    from ..explainers.models import resolve_device
    from ..pipeline import make_plan
    from ..runner import parse_params, resolve_explainers
    from xmllm.audit.store import OutputError

    budget = parse_memory(args.max_memory) if args.max_memory is not None else None
    placed = dispatch_options(args)
    check_out(args.out)
    try:
        resolve_device(args.device)
    except XmllmError as exc:
        raise XmllmError(f"--device: {exc}") from None
    ids = resolve_explainers([e.strip() for e in args.explainers.split(",") if e.strip()] or None, args.leaf)
    plan = make_plan(ids, parse_params(args.param), answer=args.answer, contrast=args.contrast,
                     max_new_tokens=args.max_new_tokens, seed=args.seed, flags=True)
    images, clip = pictures(args)
    with tqdm(total=len(ids), desc="explaining", unit="explainer", file=sys.stderr) as bar:
        run = explain(args.model, images, args.question, plan, **clip, expected=args.expected, device=args.device,
                      dtype=args.dtype, max_memory=budget, **placed,
                      progress=lambda eid: (bar.set_postfix_str(eid), bar.update(1)))
    try:
        folder = run.save(args.out)
    except OSError as exc:  # a disk that filled up during the run: nothing of the run is left
        raise OutputError(args.out, exc) from None
    for eid, why in (run.manifest.get("skipped") or {}).items():
        print(f"skipped {eid}: {why}", file=sys.stderr)
    for warning in run.manifest.get("warnings") or []:
        print(f"xmllm: warning: {warning}", file=sys.stderr)
    print(f"answer: {run.answer.get('text', '')!r}")
    print(f"wrote {folder / 'explanations.npz'} and {folder / 'manifest.json'} ({len(run.ids)} of {len(ids)} explainers)")
    print(f"report: {folder / 'report.html'}")
    return 0
