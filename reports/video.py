"""Reading a video's frames with PyAV: evenly sampled, as RGB pictures, with one-line errors.

A vision-language model sees a clip as a handful of frames. Families whose processors take frames
as images get them that way (transformers' video processors need torchvision, which this package
never requires); :func:`family_frame_count` reads how many frames the family's own video processor
samples, where it has one, so that the clip is cut as the family would cut it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .errors import XmllmError
from .images import MAX_PIXELS

if TYPE_CHECKING:  # pragma: no cover
    from xmllm.explainers.models import LoadedModel

DEFAULT_FRAMES = 8
"""Frames taken from a clip when neither the caller nor the family's video processor says."""
MAX_FRAMES = 256
"""A bound on ``--frames`` (the model's context refuses far fewer on most families)."""


class VideoError(XmllmError):
    """A video that cannot be used; the message names the file."""


@dataclass
class Video:
    """The frames taken from one clip, with where they came from."""

    path: str
    frames: list[Image.Image] = field(repr=False)
    indices: list[int]
    """Each frame's index among the clip's decoded frames."""
    times: list[float]
    """Each frame's time in seconds from the start of the clip."""
    total: int
    """Frames the clip holds."""

    def labels(self) -> list[str]:
        """What a report writes under each frame: its time in the clip."""
        return [f"frame {i} · {t:.2f} s" for i, t in zip(self.indices, self.times)]


def sample_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``total`` frames (the centre of each of ``count``
    equal stretches; every frame when the clip holds no more than ``count``)."""
    if total <= count:
        return list(range(total))
    return [int((i + 0.5) * total / count) for i in range(count)]


def family_frame_count(processor: Any) -> int | None:
    """How many frames the family's own video processor samples (``num_frames``), if it says."""
    video = getattr(processor, "video_processor", None)
    value = getattr(video, "num_frames", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise VideoError("--video needs PyAV: pip install 'xmllm[video]'") from None
    return av


def load_video(path: str | Path, frames: int = DEFAULT_FRAMES) -> Video:
    """Decode ``path`` and keep ``frames`` evenly spaced frames as RGB pictures."""
    path = Path(path)
    if not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES:
        raise VideoError(f"--frames must be between 1 and {MAX_FRAMES}, got {frames}")
    if not path.is_file():
        raise VideoError(f"{path}: video not found")
    av = _av()
    try:
        total = _count(av, path)
        if total == 0:
            raise VideoError(f"{path}: the video holds no frames")
        wanted = sample_indices(total, frames)
        kept, times = _decode(av, path, set(wanted))
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise VideoError(f"{path}: not a readable video ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if len(kept) != len(wanted):  # the second pass decoded fewer frames than the first counted
        raise VideoError(f"{path}: the video decodes to {len(kept)} of the {len(wanted)} frames wanted")
    return Video(str(path), kept, wanted, times, total)


def _count(av: Any, path: Path) -> int:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream")
        return sum(1 for _ in container.decode(video=0))


def _decode(av: Any, path: Path, wanted: set[int]) -> tuple[list[Image.Image], list[float]]:
    frames: list[Image.Image] = []
    times: list[float] = []
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index not in wanted:
                continue
            if frame.width * frame.height > MAX_PIXELS:
                raise VideoError(f"{path}: frames too large ({frame.width}x{frame.height} pixels; limit {MAX_PIXELS})")
            frames.append(frame.to_image().convert("RGB"))
            times.append(float(frame.time) if frame.time is not None else float(index))
    return frames, times


def frames_for(loaded: "LoadedModel", clip: Video, question: str, frames: int | None, plan: Any) -> Video:
    """The clip cut to the frames asked for, or by default to as many as the family's video processor
    samples (else :data:`DEFAULT_FRAMES`) and the model's context holds with the answer;
    frames asked for that the context cannot hold are one line saying how many fit."""
    from xmllm.explainers.answering import context_length, token_limit

    fit = None
    limit = context_length(loaded)
    if limit is not None:
        answer = len(loaded.processor.tokenizer(plan.answer).input_ids) if plan.answer else token_limit(
            loaded, plan.max_new_tokens)
        one = int(loaded.adapter.build_inputs(clip.frames[:1], question)[0]["input_ids"].shape[1])
        two = int(loaded.adapter.build_inputs(clip.frames[:2] * (2 if len(clip.frames) < 2 else 1), question)[0]
                  ["input_ids"].shape[1])
        per_frame = max(two - one, 1)
        fit = max(0, (limit - answer - (one - per_frame)) // per_frame)
    wanted = frames or min(family_frame_count(loaded.processor) or DEFAULT_FRAMES, fit if fit is not None else DEFAULT_FRAMES)
    if fit == 0:
        raise XmllmError(f"video {clip.path}: one frame of {per_frame} tokens, the question and an answer of up to "
                         f"{answer} tokens exceed the model's context of {limit} positions")
    if fit is not None and wanted > fit:
        raise XmllmError(f"--frames {wanted}: {wanted} frames of {per_frame} tokens each, the question and "
                         f"an answer of up to {answer} tokens exceed the model's context of {limit} positions; "
                         f"{fit} frame{'s' if fit != 1 else ''} fit")
    return clip if wanted == len(clip.indices) or clip.total <= len(clip.indices) and wanted >= clip.total \
        else load_video(clip.path, wanted)


def video_record(clip: Video) -> dict[str, Any]:
    """What a run's manifest keeps of its video: the file, its hash, and every frame taken."""
    from .provenance import file_sha256

    return {"path": clip.path, "sha256": file_sha256(Path(clip.path)), "total_frames": clip.total,
            "frames": [{"index": i, "time": round(t, 4)} for i, t in zip(clip.indices, clip.times)]}
