"""Contracts between model families and the rest of epdserve.

A family has two halves: what the processor needs (placeholders, chat-template parts; no
weights) and what a worker needs (media preprocessing, the model itself). Everything
family-specific lives under `models/`; callers only see these bases.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from PIL import Image

from epdserve.attention.kv_cache import KVCache
from epdserve.attention.paged import AttentionMetadata
from epdserve.kernels.cpu import CpuKernels
from epdserve.media.decode import decode_media
from epdserve.media.types import MediaInfo

# Per-request processor options (`mm_processor_kwargs`), checked by `ModelFamily.check_mm_kwargs`.
MMKwargs = Mapping[str, Any]
NO_MM_KWARGS: MMKwargs = MappingProxyType({})


@dataclass(frozen=True)
class Expansion:
    """The prompt tokens that replace one media item's template placeholder.

    `embed_mask`: which of `token_ids` take the item's embedding rows, in order (None: all).
    `grid`: the item's (temporal, height, width) patch grid as the HF processor reports it
    (`image_grid_thw`), for models whose positions follow the item's layout (M-RoPE)."""

    token_ids: list[int]
    embed_mask: list[bool] | None = None
    grid: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class MediaSpan:
    """Where one media item's placeholders sit in a prompt, and its patch grid (`Expansion`)."""

    offset: int
    length: int
    grid: tuple[int, int, int] | None


@dataclass(frozen=True)
class RopePositions:
    """Rotary positions of a sequence whose positions are not its token indices (M-RoPE):
    `prompt` [A, L] int64 for its L prompt tokens on A axes (None where the prompt's KV is
    never computed: a decode worker loads it), and token index i >= L at `i + delta` on every
    axis."""

    prompt: torch.Tensor | None
    delta: int

    def at(self, start: int, count: int) -> torch.Tensor:
        """[A, count] int64 positions of token indices start .. start + count - 1; [1, count]
        past the prompt (the axes agree there: broadcast it)."""
        end = start + count
        num_prompt = 0 if self.prompt is None else self.prompt.shape[1]
        tail = (torch.arange(max(start, num_prompt), max(end, num_prompt)) + self.delta)[None]
        if start >= num_prompt:
            return tail
        assert self.prompt is not None
        return torch.cat([self.prompt[:, start:end], tail.expand(self.prompt.shape[0], -1)], dim=1)


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

    def expand_placeholder(self, modality: str, info: MediaInfo, mm_kwargs: MMKwargs = NO_MM_KWARGS) -> Expansion:
        """What replaces the item's single template placeholder (`num_placeholders` embedding
        rows), with `mm_kwargs` already checked. Default: the placeholder once per row."""
        return Expansion([self.placeholder_token_id(modality)] * self.num_placeholders(info))

    def check_mm_kwargs(self, mm_kwargs: MMKwargs) -> dict[str, Any]:
        """`mm_kwargs` (server defaults merged with the request's) as the family accepts them,
        canonical (the same options always compare equal); ValueError names a key that is not
        allowed or a value out of bounds. Default: no options."""
        if mm_kwargs:
            raise ValueError(f"this model takes no mm_processor_kwargs; got {sorted(mm_kwargs)}")
        return {}

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
    def preprocess(
        self, modality: str, items: list[Image.Image], mm_kwargs: MMKwargs = NO_MM_KWARGS
    ) -> dict[str, torch.Tensor]:
        """Turn decoded media into encoder inputs (e.g. `pixel_values`), batched along dim 0:
        the features of several calls concatenate (`torch.cat` per key) into one batch.
        `mm_kwargs`: checked processor options (`ModelFamily.check_mm_kwargs`)."""

    def features(self, modality: str, data: bytes, mm_kwargs: MMKwargs = NO_MM_KWARGS) -> dict[str, torch.Tensor]:
        """Decode one encoded item and preprocess it as the model's HF processor does; 400 for
        media that cannot be decoded. Tens of ms for a photo: call it off the event loop."""
        return self.preprocess(modality, [decode_media(modality, data)], mm_kwargs)

    @abstractmethod
    def encode(self, modality: str, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Encoder outputs, one `[num_placeholders_i, E]` tensor per item, in order: E is the
        decoder's embedding width (`MultimodalModel.embed`)."""


class MultimodalModel(MediaEncoder):
    """Worker-side model: media encoder plus a causal text decoder over a paged KV cache.

    Hidden size is H, vocabulary V, N packed tokens. Input embeddings are E wide: E = H, or
    more for models whose media embeddings carry more than the input row (Qwen3-VL's
    deepstack features: E = (1 + layers fed) * H; text tokens have zeros there). Callers run
    these methods under `torch.inference_mode()`.
    """

    @abstractmethod
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`[N]` token ids -> `[N, E]` input embeddings."""

    def rope_positions(self, token_ids: list[int], media: list[MediaSpan]) -> RopePositions | None:
        """Rotary positions of a prompt whose media sit at `media`, for models whose positions
        are not the token indices (then `forward` reads `meta.rope_positions`); None for the
        others. Pure: the same prompt always gives the same positions."""
        return None

    @abstractmethod
    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one KV block of `block_size` tokens takes across all layers."""

    @abstractmethod
    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> KVCache:
        """The worker's KV pool, allocated once."""

    @abstractmethod
    def forward(self, inputs_embeds: torch.Tensor, meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        """`[N, E]` embeddings of packed sequence chunks -> `[M, H]` final hidden states of
        the rows `meta.output_rows`; writes the chunks' K/V into `kv` at `meta.slot_mapping`."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[M, H]` final hidden states -> `[M, V]` float32 logits."""
