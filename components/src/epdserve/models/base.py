"""Contracts between model families and the rest of epdserve.

A family has two halves: what the processor needs (placeholders, chat-template parts; no
weights) and what a worker needs (media preprocessing, the model itself). Everything
family-specific lives under `models/`; callers only see these bases.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from epdserve.attention.kv_cache import KVCache
from epdserve.attention.paged import AttentionMetadata
from epdserve.kernels.cpu import CpuKernels
from epdserve.media.decode import decode_media
from epdserve.media.types import MediaInfo


class ModelFamily(ABC):
    """Processor-side knowledge of a model family, built from a HF model directory.

    `hf_config` is the `transformers` config of the directory. Subclasses set `model_types`
    (HF `model_type` values they serve) and `modalities`.
    """

    model_types: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()

    def __init__(self, model_dir: Path, hf_config: Any):
        self.model_dir = model_dir
        self.hf_config = hf_config

    @property
    @abstractmethod
    def context_length(self) -> int:
        """Maximum positions of the text decoder."""

    @property
    def vocab_size(self) -> int:
        """Rows of the text decoder's embedding: valid token ids are below it."""
        return self.hf_config.get_text_config().vocab_size

    @abstractmethod
    def placeholder_token_id(self, modality: str) -> int:
        """The token id the chat template emits once per `modality` item."""

    @abstractmethod
    def num_placeholders(self, info: MediaInfo) -> int:
        """Number of embedding rows the encoder yields for this item."""

    def expand_placeholder(self, modality: str, info: MediaInfo) -> tuple[list[int], list[bool] | None]:
        """The token ids that replace the item's single template placeholder, and which of them
        take the item's embedding rows, in order (None: all of them; else one flag a token,
        `num_placeholders(info)` of them set). Default: the placeholder once per row."""
        return [self.placeholder_token_id(modality)] * self.num_placeholders(info), None

    def template_part(self, modality: str) -> dict:
        """The content part the HF chat template expects for one media item."""
        return {"type": modality}

    def load_runner(
        self, dtype: torch.dtype | None, device: torch.device, kernels: CpuKernels | None = None
    ) -> MultimodalModel:
        """Load the weights for a worker onto `device`. `dtype=None` keeps the checkpoint's
        dtype. `kernels`: CPU kernels the model may use where they support its tensors."""
        raise NotImplementedError(f"{type(self).__name__} has no worker-side model yet")

    def load_encoder(
        self, dtype: torch.dtype | None, device: torch.device, kernels: CpuKernels | None = None
    ) -> MediaEncoder:
        """Load only the media encoder (towers and projectors, no text decoder weights) for an
        encode worker; arguments as for `load_runner`."""
        raise NotImplementedError(f"{type(self).__name__} has no separate encoder")


class MediaEncoder(ABC):
    """Media preprocessing and encoder: decoded media in, embeddings in the text decoder's
    input space out. Tensors are on `self.device`; H is the decoder's hidden size. Callers run
    `encode` under `torch.inference_mode()`.
    """

    device: torch.device
    dtype: torch.dtype

    @abstractmethod
    def preprocess(self, modality: str, items: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Turn decoded media into encoder inputs (e.g. `pixel_values`), batched along dim 0:
        the features of several calls concatenate (`torch.cat` per key) into one batch."""

    def features(self, modality: str, data: bytes) -> dict[str, torch.Tensor]:
        """Decode one encoded item and preprocess it as the model's HF processor does; 400 for
        media that cannot be decoded. Tens of ms for a photo: call it off the event loop."""
        return self.preprocess(modality, [decode_media(modality, data)])

    @abstractmethod
    def encode(self, modality: str, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Encoder outputs, one `[num_placeholders_i, H]` tensor per item, in order."""


class MultimodalModel(MediaEncoder):
    """Worker-side model: media encoder plus a causal text decoder over a paged KV cache.

    Hidden size is H, vocabulary V, N packed tokens. Callers run these methods under
    `torch.inference_mode()`.
    """

    @abstractmethod
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`[N]` token ids -> `[N, H]` input embeddings."""

    @abstractmethod
    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one KV block of `block_size` tokens takes across all layers."""

    @abstractmethod
    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> KVCache:
        """The worker's KV pool, allocated once."""

    @abstractmethod
    def forward(self, inputs_embeds: torch.Tensor, meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        """`[N, H]` embeddings of packed sequence chunks -> `[M, H]` final hidden states of
        the rows `meta.output_rows`; writes the chunks' K/V into `kv` at `meta.slot_mapping`."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[M, H]` final hidden states -> `[M, V]` float32 logits."""
