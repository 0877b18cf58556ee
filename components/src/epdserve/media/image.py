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
    """Fully decode an encoded image to RGB, as `transformers`' image processors convert it
    (`convert_to_rgb`): transparency (an alpha band, or a palette's transparent colour) is
    composited onto white, where `convert("RGB")` would drop it. 400 when the data is broken."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return _to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise EpdError.bad_request(f"cannot decode image ({len(data)} bytes): {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    if "A" not in img.getbands() and img.info.get("transparency") is None:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
