"""``xmllm explain --out`` on file systems that refuse writes: a real read-only mount and a real
full disk (tmpfs mounts, made when the test runs as root; skipped with the reason otherwise).
Root ignores permission bits, so only a real mount shows what a user on one sees.

Either way: exit status 2, one line naming the folder (no traceback), and nothing left where the
run folder was to go: no half-written run without its report and no staging folder beside it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from xmllm.files import write_dir

CHEAP = "inference.uncertainty"
"""One cheap explainer on the demo model: the run folder holds arrays, the manifest, the image and a report."""
SPARE_BYTES = 96 * 1024
"""Room left on the "nearly full" disk: enough for the arrays, the manifest and the image, not the report."""


def _mount(where: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (this test runs as uid %d)" % os.geteuid())
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {done.stderr.strip() or done.returncode}")


def _unmount(where: Path) -> None:
    if os.path.ismount(where):
        subprocess.run(["umount", str(where)], check=False)
        if os.path.ismount(where):  # something still holds it open
            subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def mounted(tmp_path):
    """``mounted(options)``: a fresh tmpfs folder mounted with ``options``; unmounted afterwards."""
    made: list[Path] = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt{len(made)}"
        where.mkdir()
        made.append(where)
        _mount(where, options)
        return where

    try:
        yield mount
    finally:
        for where in made:
            _unmount(where)


def _fill(disk: Path, leave: int) -> None:
    """Write one file on ``disk`` until at most ``leave`` bytes are free."""
    chunk = b"\0" * 4096
    with open(disk / "filler", "wb") as fh:
        try:
            while True:
                st = os.statvfs(disk)
                if st.f_bavail * st.f_frsize <= leave:
                    break
                fh.write(chunk)
                fh.flush()
        except OSError:  # the disk filled up in this chunk
            pass


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("input") / "red.png"
    Image.new("RGB", (64, 64), (210, 30, 30)).save(path)
    return path


def explain(image: Path, out: Path) -> subprocess.CompletedProcess:
    """The real command in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "xmllm.cli", "explain", "--model", "demo", "--device", "cpu",
                           "--image", str(image), "--question", "What colour is the square?", "--explainers", CHEAP,
                           "--out", str(out)], capture_output=True, text=True, timeout=600)


def the_only_line(stderr: str) -> str:
    """Stderr's last line, asserting it is an xmllm one-line error with no traceback above it."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("xmllm: error: "), stderr
    return lines[-1]


def test_a_read_only_file_system_is_refused_before_any_model_work(mounted, image):
    disk = mounted("ro,size=1m")
    out = disk / "run"
    done = explain(image, out)
    assert done.returncode == 2, done.stderr
    line = the_only_line(done.stderr)
    assert str(out) in line and "Read-only file system" in line
    # refused before the model loaded: the error is all there is on stderr (no progress bar, no model output)
    assert [line for line in done.stderr.splitlines() if line.strip()] == [line]
    assert os.listdir(disk) == []


@pytest.mark.parametrize("spare", [0, SPARE_BYTES], ids=["full", "room-for-the-arrays-only"])
def test_a_full_disk_leaves_no_half_written_run(mounted, image, spare):
    """A full disk is refused before the model loads; one with room for the arrays but not the
    report fills during the save. Either way one line naming the folder, and neither the arrays
    without a report nor a staging folder left."""
    disk = mounted("size=1m")
    _fill(disk, spare)
    out = disk / "run"
    done = explain(image, out)
    assert done.returncode == 2, done.stderr
    line = the_only_line(done.stderr)
    assert str(out) in line and "No space left on device" in line
    if spare == 0:  # nothing else on stderr: refused before any model work
        assert [line for line in done.stderr.splitlines() if line.strip()] == [line]
    else:  # the run was computed, then could not be saved
        assert "explaining" in done.stderr
    assert os.listdir(disk) == ["filler"]


def test_a_rerun_replaces_the_run_folder_whole_and_leaves_no_staging(tmp_path, image):
    out = tmp_path / "runs" / "one"
    for _ in range(2):
        done = explain(image, out)
        assert done.returncode == 0, done.stderr
        assert sorted(os.listdir(out)) == ["explanations.npz", "image_0.png", "manifest.json", "report.html"]
        assert os.listdir(out.parent) == ["one"]


def test_an_earlier_run_folder_holding_other_files_is_refused_before_the_model(tmp_path, image):
    """The run folder is replaced whole, so files a user put into an earlier one would be lost."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    done = explain(image, out)
    assert done.returncode == 2
    line = the_only_line(done.stderr)
    assert "an earlier run's folder that also holds other files (notes.txt" in line
    assert (out / "notes.txt").read_text() == "mine"


def test_write_dir_removes_its_staging_and_the_parents_it_made_when_the_fill_fails(tmp_path):
    final = tmp_path / "new" / "deeper" / "run"

    def fill(staged: Path) -> None:
        (staged / "explanations.npz").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_dir(final, fill)
    assert os.listdir(tmp_path) == []
    # an earlier folder stays as it was when the new one cannot be finished
    final.mkdir(parents=True)
    (final / "report.html").write_text("earlier")
    with pytest.raises(OSError):
        write_dir(final, fill)
    assert os.listdir(final.parent) == ["run"] and (final / "report.html").read_text() == "earlier"
