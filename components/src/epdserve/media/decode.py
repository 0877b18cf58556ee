"""Encoded media bytes -> decoded items, for every role that encodes media itself."""

from __future__ import annotations

from PIL import Image

from epdserve.media.image import decode_image
from epdserve.protocol.errors import EpdError

DECODERS = {"image": decode_image}


def decode_media(modality: str, data: bytes) -> Image.Image:
    """Decode one item; 400 for media this worker cannot decode. Takes tens of ms for a photo:
    call it off the event loop."""
    decode = DECODERS.get(modality)
    if decode is None:
        raise EpdError.bad_request(f"this worker cannot decode {modality}")
    return decode(data)
