"""Other libraries do not talk over xmllm: a build, an explain and a refused long question print
only lines of ours on stderr, and ``--verbose`` shows the libraries' own lines.

The rule for "a line of ours" (:func:`foreign_lines`): stderr is cut into lines at ``\\n`` and
``\\r`` (a progress bar redraws itself after ``\\r``) and terminal escapes (the cursor moves of
stacked bars) are removed; a line is ours when it is blank, starts with ``xmllm: `` (our messages
and errors, and a third-party warning we pass on once), or is a tqdm bar whose label is one of our
bars' (:data:`OUR_BARS`). Everything else, transformers' ``[transformers] ...`` lines and its
"Loading weights" bar included, is foreign.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xmllm.explainers import quiet

ROOT = Path(__file__).resolve().parents[1]
OUR_BARS = {"explaining", "examples", "case study"}
"""Labels of the bars of ``xmllm explain`` and ``xmllm build``."""
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_BAR = re.compile(r"^(?P<label>[^:|]+): +\d+%\|")
LONG_QUESTION = " ".join(["Is the red circle left of the blue square"] * 40) + "?"
"""Over the demo model's 256 positions (and its tokenizer's maximum): refused before any forward."""

LONG_CHECKS = os.environ.get("XMLLM_LONG_CHECKS") == "1"
long_check = pytest.mark.skipif(not LONG_CHECKS, reason="a long check: .ci/run runs it as its own step (XMLLM_LONG_CHECKS=1)")



def stderr_lines(text: str) -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]", _ESCAPE.sub("", text))]


def is_ours(line: str) -> bool:
    if not line or line.startswith(quiet.PREFIX):
        return True
    bar = _BAR.match(line)
    return bool(bar) and bar.group("label").strip() in OUR_BARS


def foreign_lines(text: str) -> list[str]:
    return [line for line in stderr_lines(text) if not is_ours(line)]


def xmllm(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != quiet.VERBOSE_ENV}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "xmllm.cli", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xmllm.explainers.demo.samples import generate_sample

    path = tmp_path_factory.mktemp("noise") / "scene.png"
    generate_sample(0, 0).image().save(path)
    return path


def test_the_rule_tells_our_lines_from_theirs() -> None:
    text = ("\rexplaining:   0%|          | 0/1 [00:00<?, ?explainer/s]\n"
            "Loading weights: 100%|##########| 98/98 [00:00<00:00, 5636.65it/s]\x1b[A\n"
            "[transformers] `past_key_values`/`cache_params` are deprecated. Use `cache` instead.\n"
            "\rcase study:  50%|#####     | 2/4\x1b[A\rxmllm: error: question: too long\n")
    assert foreign_lines(text) == [
        "Loading weights: 100%|##########| 98/98 [00:00<00:00, 5636.65it/s]",
        "[transformers] `past_key_values`/`cache_params` are deprecated. Use `cache` instead.",
    ]


def test_explain_prints_only_our_lines(tmp_path: Path, image: Path) -> None:
    done = xmllm("explain", "--image", str(image), "--question", "What colour is the triangle?",
                 "--explainers", "attention.raw", "--device", "cpu", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "report.html").is_file()
    assert foreign_lines(done.stderr) == []
    assert any(line.startswith("explaining: 100%") for line in stderr_lines(done.stderr))  # our bar stays


def test_a_refused_long_question_prints_our_one_line_only(tmp_path: Path, image: Path) -> None:
    done = xmllm("explain", "--image", str(image), "--question", LONG_QUESTION, "--explainers", "attention.raw",
                 "--device", "cpu", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert foreign_lines(done.stderr) == []
    messages = [line for line in stderr_lines(done.stderr) if line.startswith(quiet.PREFIX)]
    assert len(messages) == 1 and messages[0].startswith("xmllm: error: question: the prompt is "), messages
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@long_check
def test_models_and_a_video_explanation_print_only_our_lines(tmp_path: Path, image: Path) -> None:
    done = xmllm("models", "--json", cwd=tmp_path)  # builds every family's config
    assert done.returncode == 0 and foreign_lines(done.stderr) == [], done.stderr[-2000:]
    import av
    import numpy as np
    from PIL import Image

    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = 128, 128, "yuv420p"
        for _ in range(3):
            frame = np.asarray(Image.open(image).convert("RGB").resize((128, 128)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    done = xmllm("explain", "--video", str(clip), "--question", "What colour is the triangle?", "--explainers",
                 "attention.raw", "--device", "cpu", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 0 and foreign_lines(done.stderr) == [], done.stderr[-2000:]


def test_verbose_shows_the_libraries_own_lines(tmp_path: Path, image: Path) -> None:
    for args in (["--verbose", "explain"], ["explain", "--verbose"]):  # before or after the command
        done = xmllm(*args, "--image", str(image), "--question", LONG_QUESTION, "--explainers", "attention.raw",
                     "--device", "cpu", "--out", str(tmp_path / "run"), cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        foreign = foreign_lines(done.stderr)
        assert any(line.startswith("Loading weights") for line in foreign), foreign
        assert any("Token indices sequence length is longer than the specified maximum" in line
                   for line in foreign), foreign
        assert [line for line in stderr_lines(done.stderr) if line.startswith(quiet.PREFIX)] == [
            next(line for line in stderr_lines(done.stderr) if line.startswith("xmllm: error: question: the prompt is "))]


def test_a_build_prints_only_our_lines(tmp_path: Path) -> None:
    """The quickest build that loads the model (in both of its processes on a machine with two
    CPUs): one example and one case-study pair."""
    done = xmllm("build", "--explainers", "attention.raw", "--pairs", "1", "--cache", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "public"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "public" / "index.html").is_file()
    assert "model loaded" in done.stdout
    assert foreign_lines(done.stderr) == []
    labels = {m.group("label") for line in stderr_lines(done.stderr) if (m := _BAR.match(line))}
    assert labels == {"examples", "case study"}


def test_an_unknown_warning_is_shown_once_as_ours_and_a_harmless_one_not_at_all(
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(quiet, "_verbose_override", None)
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    quiet.route_library_output()
    logger = hf_logging.get_logger("transformers.xmllm_test")
    for _ in range(3):
        logger.warning("A new notice from transformers\nwith a second line")
        logger.warning("`past_key_values`/`cache_params` are deprecated. Use `cache` instead.")
    logging.getLogger("huggingface_hub.xmllm_test").warning("hub says hello")
    err = capfd.readouterr().err
    assert err.splitlines() == [
        "xmllm: transformers: A new notice from transformers (xmllm --verbose shows the rest)",
        "xmllm: huggingface_hub: hub says hello",
    ]
    seen: list[str] = []
    collector = logging.Handler()
    collector.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    root = hf_logging.get_logger()
    root.addHandler(collector)
    quiet.set_verbose(True)  # transformers' own handler back (its stream is whatever stderr it was made with)
    try:
        logger.warning("`past_key_values`/`cache_params` are deprecated. Use `cache` instead.")
        assert not capfd.readouterr().err.count(quiet.PREFIX)
        assert seen == ["`past_key_values`/`cache_params` are deprecated. Use `cache` instead."]
        assert not any(isinstance(h, quiet._Routed) for h in root.handlers)
        assert any(type(h) is logging.StreamHandler for h in root.handlers)
    finally:
        root.removeHandler(collector)
        quiet.set_verbose(False)
        monkeypatch.setattr(quiet, "_verbose_override", None)
    assert not any(type(h) is logging.StreamHandler for h in root.handlers)


def test_load_model_in_a_notebook_draws_no_loading_bar(capfd: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from xmllm.explainers.models import load_model

    monkeypatch.setattr(quiet, "_verbose_override", None)
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    capfd.readouterr()
    for _ in range(2):
        load_model("demo", device="cpu")
    assert capfd.readouterr().err == ""
