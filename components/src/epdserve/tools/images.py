"""Deterministic synthetic images for tests, benchmarks and examples."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def synthetic_png(seed: int, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    """A PNG of `size` (W, H): random 4x4 colour blocks plus noise.

    The coarse blocks make images of different seeds differ in content, not only in noise,
    so a tiny random model's greedy output depends on which image it saw. `mode` "RGBA" or
    "LA" adds an alpha channel running from transparent (left) to opaque (right); "P" is a
    palette image whose most frequent colour is transparent.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    blocks = rng.integers(0, 256, (4, 4, 3)).astype(np.float64)
    rows = np.arange(height) * 4 // height
    cols = np.arange(width) * 4 // width
    pixels = blocks[rows][:, cols] + rng.normal(0.0, 24.0, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1)))
        image = image.convert(mode[:-1])
        image.putalpha(alpha)
    elif mode == "P":
        image = image.quantize(16)
        image.info["transparency"] = max(image.getcolors() or [(0, 0)])[1]
    elif mode != "RGB":
        raise ValueError(f"mode must be RGB, RGBA, LA or P; got {mode!r}")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
