"""Deterministic synthetic images for tests, benchmarks and examples."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def synthetic_png(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A PNG of `size` (W, H): random 4x4 colour blocks plus noise.

    The coarse blocks make images of different seeds differ in content, not only in noise,
    so a tiny random model's greedy output depends on which image it saw.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    blocks = rng.integers(0, 256, (4, 4, 3)).astype(np.float64)
    rows = np.arange(height) * 4 // height
    cols = np.arange(width) * 4 // width
    pixels = blocks[rows][:, cols] + rng.normal(0.0, 24.0, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
