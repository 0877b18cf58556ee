"""A worker-side model put together from a media encoder and a paged text decoder."""

from __future__ import annotations

from typing import Protocol

import torch
from PIL import Image

from epdserve.attention.kv_cache import KVCache
from epdserve.attention.paged import AttentionMetadata
from epdserve.models.base import NO_MM_KWARGS, MediaEncoder, MMKwargs, MultimodalModel


class PagedDecoder(Protocol):
    """A text decoder run over packed chunks with a paged KV cache (`PagedLlama`'s interface):
    N packed tokens, M output rows, hidden size H, vocabulary V."""

    dtype: torch.dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[N] token ids -> [N, H] input embeddings."""

    def allocate_cache(self, num_blocks: int, block_size: int) -> KVCache:
        """An empty cache of `num_blocks` blocks in this decoder's shapes, dtype and device."""

    def forward(self, inputs_embeds: torch.Tensor, meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        """[N, H] embeddings -> [M, H] final hidden states of `meta.output_rows`."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, H] final hidden states -> [M, V] float32 logits."""


class PagedMultimodalModel(MultimodalModel):
    """`MultimodalModel` whose media half is `vision` and whose text half is `text`."""

    def __init__(self, text: PagedDecoder, vision: MediaEncoder, device: torch.device, dtype: torch.dtype):
        self.text = text
        self.vision = vision
        self.device = device
        self.dtype = dtype

    def preprocess(
        self, modality: str, items: list[Image.Image], mm_kwargs: MMKwargs = NO_MM_KWARGS
    ) -> dict[str, torch.Tensor]:
        return self.vision.preprocess(modality, items, mm_kwargs)

    def encode(self, modality: str, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return self.vision.encode(modality, features)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.text.embed(token_ids.to(self.device))

    def kv_bytes_per_block(self, block_size: int) -> int:
        t = self.text
        return KVCache.bytes_per_block(t.num_layers, block_size, t.num_kv_heads, t.head_dim, t.dtype)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> KVCache:
        return self.text.allocate_cache(num_blocks, block_size)

    def forward(self, inputs_embeds: torch.Tensor, meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        return self.text.forward(inputs_embeds, meta, kv)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.text.logits(hidden)
