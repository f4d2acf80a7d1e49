"""Several images from the command line: ``--image`` repeated on explain and ask, order kept; a
missing one is one line naming it, exit 2, nothing written."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from xmllm.cli import main
from xmllm.explainers.demo.samples import generate_samples
from xmllm.provenance import sample_sha256


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two-images")
    paths = []
    for index, sample in enumerate(generate_samples(2, 0)):
        path = folder / f"picture-{index}.png"
        sample.image().save(path)
        paths.append(path)
    return paths


def test_explain_takes_two_images_in_order(two_images, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["explain", "--image", str(two_images[0]), "--image", str(two_images[1]), "--question",
            "what colour is the circle?", "--explainers", "attention.rollout", "--out", str(out)]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    saved = sorted(out.glob("image_*.png"))
    assert [p.name for p in saved] == ["image_0.png", "image_1.png"]
    for original, copy in zip(two_images, saved):  # the order given is the order kept
        assert np.array_equal(np.asarray(Image.open(original).convert("RGB")), np.asarray(Image.open(copy)))
    pictures = [Image.open(path).convert("RGB") for path in two_images]
    assert sample_sha256(pictures, "what colour is the circle?") in json.dumps(manifest)  # both, in order
    assert sample_sha256(pictures[::-1], "what colour is the circle?") not in json.dumps(manifest)
    arrays = np.load(out / "explanations.npz")
    assert any("image1" in name for name in arrays.files)  # a map over the second image's grid


def test_ask_takes_two_images(two_images, capsys):
    argv = ["ask", "--image", str(two_images[0]), "--image", str(two_images[1]), "--question",
            "what colour is the circle?", "--json"]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["answer"].strip() and row["tokens"]


def test_a_missing_image_is_one_line_and_writes_nothing(two_images, tmp_path, capsys):
    out = tmp_path / "run"
    missing = tmp_path / "nowhere.png"
    argv = ["explain", "--image", str(two_images[0]), "--image", str(missing), "--question",
            "what colour is the circle?", "--explainers", "attention.rollout", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]
    assert not out.exists()
