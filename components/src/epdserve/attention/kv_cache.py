"""The paged KV cache: every layer's keys and values in one pool of fixed-size blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Per-layer key and value tensors, each [num_blocks, block_size, num_kv_heads, head_dim],
    views of `pool` [2 (K, V), num_layers, num_blocks, ...]: one tensor to register for
    transfers."""

    key: list[torch.Tensor]
    value: list[torch.Tensor]
    pool: torch.Tensor

    @property
    def block_size(self) -> int:
        return self.key[0].shape[1]

    @property
    def num_blocks(self) -> int:
        return self.key[0].shape[0]

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        """One tensor holding everything; the per-layer tensors are views of it.

        Zero-filled, so that every page is resident from the start (as vLLM allocates its
        pool): the prefix cache keeps used blocks, so new prompts get never-used blocks until
        the whole pool has been used once, and a first write into a page costs ~1.6 ms per MB
        here (see utils/memory.py): 15-30 ms of a bench prompt's prefill."""
        data = torch.zeros(2, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        return cls(key=list(data[0]), value=list(data[1]), pool=data)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one block across all layers, keys and values."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize
