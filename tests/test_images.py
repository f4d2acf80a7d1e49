"""Images from users: every mode becomes RGB; broken or oversized files get a one-line error."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xmllm import images
from xmllm.images import ImageError, load_image


def test_modes_are_converted_to_rgb(tmp_path):
    Image.new("CMYK", (10, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((10, 10), 40000, dtype=np.uint16)).save(tmp_path / "grey16.png")
    Image.new("P", (10, 10), 3).save(tmp_path / "palette.png")
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    cmyk = np.asarray(load_image(tmp_path / "cmyk.jpg"))
    assert cmyk.shape == (10, 10, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60  # red
    grey = np.asarray(load_image(tmp_path / "grey16.png"))
    assert grey.shape == (10, 10, 3) and grey.min() == 255  # the brightest value maps to white, not clipped noise
    assert load_image(tmp_path / "palette.png").mode == "RGB"
    assert np.asarray(load_image(tmp_path / "clear.png")).min() == 255  # transparent composites onto white


def test_broken_files_get_one_line_errors(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    cases = {
        "missing.png": "image not found",
        "truncated.png": "corrupt or truncated image",
        "text.png": "not a readable image",
    }
    for name, message in cases.items():
        with pytest.raises(ImageError) as err:
            load_image(tmp_path / name)
        assert name in str(err.value) and message in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(ImageError, match="image too large"):
        load_image(tmp_path / "ok.png")
