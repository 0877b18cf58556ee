"""Plain descriptions of media items shared by the processor and the model families."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MediaInfo:
    """What the processor learns about one media item without decoding it fully."""

    modality: str
    width: int = 0
    height: int = 0
