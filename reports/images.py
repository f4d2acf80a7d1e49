"""Reading images defensively: one-line errors, bounded size, every mode converted to RGB."""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import XmllmError

MAX_PIXELS = 40_000_000
"""Refuse images above this many pixels (a decompression bomb guard that raises, not warns)."""


class ImageError(XmllmError):
    """An image that cannot be used; the message names the file."""


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Open, verify and convert an image; CMYK, 16-bit, palette and alpha become ``mode``."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"{path}: image too large ({img.width}x{img.height} pixels; limit {MAX_PIXELS})")
                img.load()
                return _convert(img, mode)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path}: image too large (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a readable image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: corrupt or truncated image ({exc})") from None


def _convert(img: Image.Image, mode: str) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping everything to white
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        img = Image.fromarray((arr / top * 255.0).astype(np.uint8), mode="L")
    if img.mode in ("P", "PA") or "A" in img.getbands():
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert(mode)
