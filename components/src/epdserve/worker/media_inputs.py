"""Encoded media bytes -> encoder inputs, shared by every role that encodes media itself."""

from __future__ import annotations

import torch

from epdserve.media.image import decode_image
from epdserve.models.base import MediaEncoder
from epdserve.protocol.errors import EpdError

DECODERS = {"image": decode_image}


def media_features(encoder: MediaEncoder, modality: str, data: bytes) -> dict[str, torch.Tensor]:
    """Decode one item and preprocess it as the model's HF processor does; 400 for media this
    worker cannot decode. Takes tens of ms for a photo: call it off the event loop."""
    decode = DECODERS.get(modality)
    if decode is None:
        raise EpdError.bad_request(f"this worker cannot decode {modality}")
    return encoder.preprocess(modality, [decode(data)])
