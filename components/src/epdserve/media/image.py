"""Image probing (processor side, header only) and decoding (worker side)."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from epdserve.media.types import MediaInfo
from epdserve.protocol.errors import EpdError


def probe_image(data: bytes) -> MediaInfo:
    """Size of an encoded image from its header; 400 when it is not an image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise EpdError.bad_request(f"cannot decode image ({len(data)} bytes): {exc}") from exc
    return MediaInfo("image", width=width, height=height)


def decode_image(data: bytes) -> Image.Image:
    """Fully decode an encoded image to RGB; 400 when the data is broken."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise EpdError.bad_request(f"cannot decode image ({len(data)} bytes): {exc}") from exc
