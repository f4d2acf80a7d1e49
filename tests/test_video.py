"""Video input (#25 items 1 and 6): frames decoded by PyAV, sampled evenly, as pictures in order;
a video that does not decode, holds no frames or is missing is one line naming it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xmllm.video import VideoError, family_frame_count, load_video, sample_indices

av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")

WIDTH, HEIGHT = 64, 48


def bar_at(index: int) -> np.ndarray:
    """Frame ``index`` of the test clip: a white bar that moves right by 3 pixels a frame."""
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    frame[:, index * 3 : index * 3 + 6] = 255
    return frame


def write_clip(path: Path, frames: int, rate: int = 10, codec: str = "mpeg4") -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(bar_at(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("video") / "clip.mp4", 20)


def test_sampling_spreads_frames_evenly():
    assert sample_indices(20, 4) == [2, 7, 12, 17]
    assert sample_indices(3, 8) == [0, 1, 2]  # a short clip: every frame
    assert sample_indices(8, 8) == list(range(8))


def test_frames_come_back_in_order_at_their_times(clip):
    video = load_video(clip, frames=4)
    assert video.total == 20 and video.indices == [2, 7, 12, 17]
    assert video.times == pytest.approx([0.2, 0.7, 1.2, 1.7])
    assert all(frame.size == (WIDTH, HEIGHT) and frame.mode == "RGB" for frame in video.frames)
    for frame, index in zip(video.frames, video.indices):  # the bar is where that frame drew it (lossy codec)
        columns = np.asarray(frame, dtype=np.float64).mean(axis=(0, 2))
        assert abs(int(np.argmax(columns)) - (index * 3 + 2.5)) <= 3
    assert video.labels()[0] == "frame 2 · 0.20 s"


def test_a_missing_undecodable_or_empty_video_is_one_line(tmp_path):
    with pytest.raises(VideoError, match="video not found") as err:
        load_video(tmp_path / "nowhere.mp4")
    assert str(tmp_path / "nowhere.mp4") in str(err.value)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoError) as err:
        load_video(junk)
    assert str(junk) in str(err.value) and "\n" not in str(err.value) and "not a readable video" in str(err.value)
    empty = write_clip(tmp_path / "empty.mp4", 0)
    with pytest.raises(VideoError) as err:
        load_video(empty)
    assert str(empty) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(VideoError, match="--frames"):
        load_video(tmp_path / "junk.mp4", frames=0)


def test_the_family_frame_count_is_read_from_its_video_processor():
    class VideoProcessor:
        num_frames = 16

    class Processor:
        video_processor = VideoProcessor()

    assert family_frame_count(Processor()) == 16
    assert family_frame_count(object()) is None


# --- the command line and the API on the demo model ---------------------------------------------------


@pytest.fixture(scope="module")
def demo_clip(tmp_path_factory) -> tuple[Path, str]:
    """Four demo scenes as a 2-frames-a-second clip, and a question about them."""
    from xmllm.explainers.demo.samples import generate_samples

    samples = generate_samples(4, 0)
    path = tmp_path_factory.mktemp("demo-clip") / "scenes.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = 128, 128, "yuv420p"
        for sample in samples:
            pixels = np.asarray(sample.image().convert("RGB").resize((128, 128)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path, samples[0].text


def test_explain_a_video_takes_the_frames_that_fit_and_records_them(demo_clip, tmp_path, capsys):
    import json

    from xmllm.cli import main

    clip, question = demo_clip
    out = tmp_path / "run"
    argv = ["explain", "--video", str(clip), "--question", question, "--explainers",
            "relevancy.chefer,perturbation.occlusion", "--out", str(out)]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    video = manifest["video"]
    # the demo's context (256 positions) holds 3 frames of 64 image tokens with the question and answer
    assert [f["index"] for f in video["frames"]] == sample_indices(4, 3) and video["total_frames"] == 4
    assert [f["time"] for f in video["frames"]] == pytest.approx([i / 2 for i in sample_indices(4, 3)])
    assert len(manifest["sample"]["images"]) == 3 and len(manifest["layouts"]) == 3
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "frame 0 (0.00 s)" in report and 'id="why-strips"' in report


def test_too_many_frames_or_a_bad_video_is_one_line_and_writes_nothing(demo_clip, tmp_path, capsys):
    from xmllm.cli import main

    clip, question = demo_clip
    out = tmp_path / "run"
    cases = [
        (["--video", str(clip), "--frames", "8"], "3 frames fit"),
        (["--video", str(clip), "--image", str(clip)], "one of them"),
        (["--image", str(clip), "--frames", "2"], "--frames applies to --video"),
    ]
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video" * 64)
    cases.append((["--video", str(junk)], str(junk)))
    for flags, said in cases:
        capsys.readouterr()
        code = main(["explain", *flags, "--question", question, "--explainers", "attention.raw", "--out", str(out)])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("xmllm: error")]
        assert code == 2 and len(lines) == 1 and said in lines[0], (flags, lines)
        assert not out.exists()


def test_ask_answers_about_a_video(demo_clip, capsys):
    import json

    from xmllm.cli import main

    clip, question = demo_clip
    assert main(["ask", "--video", str(clip), "--frames", "2", "--question", question, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["answer"].strip() and row["tokens"]


def test_the_api_takes_a_video(demo_clip):
    import xmllm

    clip, question = demo_clip
    run = xmllm.explain("demo", question=question, video=clip, frames=2, explainers=["gradient.saliency"])
    assert [f["index"] for f in run.manifest["video"]["frames"]] == sample_indices(4, 2)
    assert len(run.images) == 2 and "image1.image" in run["gradient.saliency"].maps


def test_a_decoded_clip_is_not_decoded_again(demo_clip, monkeypatch):
    """The command line decodes the clip once to check it and hands the decoded frames on; the API
    takes them as they are (the same run as from the file), without reading the file again."""
    import xmllm
    import xmllm.video as video

    clip, question = demo_clip
    decoded = video.load_video(clip, 2)
    calls = []
    real = video._decode
    monkeypatch.setattr(video, "_decode", lambda *a: calls.append(a) or real(*a))
    run = xmllm.explain("demo", question=question, video=decoded, frames=2, explainers=["gradient.saliency"])
    assert calls == []  # it holds the frames wanted
    again = xmllm.explain("demo", question=question, video=clip, frames=2, explainers=["gradient.saliency"])
    assert len(calls) == 1
    assert run.manifest["video"] == again.manifest["video"]
    assert np.array_equal(run["gradient.saliency"].maps["image1.image"], again["gradient.saliency"].maps["image1.image"])
