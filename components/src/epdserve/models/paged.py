"""Paged KV cache and attention over packed sequence chunks (model-agnostic).

A forward packs the new tokens of several sequences along one token axis of N rows. Their
keys and values go to fixed-size cache blocks; a sequence's block table lists its blocks in
order, so its token at position p lives in slot ``table[p // block_size] * block_size +
p % block_size``. Blocks can be shared between sequences (prefix caching).

Attention runs per sequence with the same `scaled_dot_product_attention` call that
`transformers`' sdpa attention makes for one sequence with a `DynamicCache`, so the outputs
match it bit for bit (the kernels are deterministic per shape, mask and GQA mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, use_gqa_in_sdpa


@dataclass
class AttentionMetadata:
    """Describes one forward over a batch of sequence chunks, packed along the token axis.

    positions [N] int64: absolute position of each packed token. slot_mapping [N] int64:
    block_id * block_size + offset where each token's K/V is written. Per sequence i:
    query_start[i], query_len[i]: its tokens in the packed batch; context_len[i]: its tokens
    in the cache AFTER this chunk (start + query_len); block_table[i]: its block ids (a list
    or tensor; stored as an int64 tensor on the device of `positions`).
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start: list[int]
    query_len: list[int]
    context_len: list[int]
    block_table: list[torch.Tensor] | list[Sequence[int]]

    block_size: int = 0   # set by `build`; needed to find the consecutive runs below

    def __post_init__(self) -> None:
        # Once here, not per layer: tables as tensors, and for each sequence the first block
        # of its context when those blocks are consecutive (its KV is then one slice).
        self.runs: list[int | None] = [
            _run_start(t, -(-n // self.block_size)) if self.block_size else None
            for t, n in zip(self.block_table, self.context_len)]
        self.block_table = [torch.as_tensor(t, dtype=torch.long, device=self.positions.device)
                            for t in self.block_table]

    @property
    def num_seqs(self) -> int:
        return len(self.query_len)

    @classmethod
    def build(cls, chunks: Sequence[tuple[Sequence[int], int, int]], block_size: int,
              device: torch.device | str = "cpu") -> AttentionMetadata:
        """Metadata for chunks given as (block_table, start, query_len) per sequence: the
        chunk holds positions start .. start+query_len-1, written into the table's blocks."""
        positions, slots, query_start = [], [], [0]
        for table, start, length in chunks:
            pos = torch.arange(start, start + length)
            blocks = torch.as_tensor(table, dtype=torch.long)[pos // block_size]
            positions.append(pos)
            slots.append(blocks * block_size + pos % block_size)
            query_start.append(query_start[-1] + length)
        return cls(
            positions=torch.cat(positions).to(device),
            slot_mapping=torch.cat(slots).to(device),
            query_start=query_start[:-1],
            query_len=[length for _, _, length in chunks],
            context_len=[start + length for _, start, length in chunks],
            block_table=[table for table, _, _ in chunks],
            block_size=block_size,
        )


def _run_start(table: Sequence[int] | torch.Tensor, count: int) -> int | None:
    """table[0] when table[:count] are consecutive block ids, else None."""
    ids = table[:count].tolist() if isinstance(table, torch.Tensor) else list(table[:count])
    return ids[0] if ids == list(range(ids[0], ids[0] + count)) else None


@dataclass
class KVCache:
    """Per-layer key and value tensors, each [num_blocks, block_size, num_kv_heads, head_dim]."""

    key: list[torch.Tensor]
    value: list[torch.Tensor]

    @property
    def block_size(self) -> int:
        return self.key[0].shape[1]

    @property
    def num_blocks(self) -> int:
        return self.key[0].shape[0]

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """One zeroed tensor holding everything; the per-layer tensors are views of it."""
        data = torch.zeros(2, num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                           dtype=dtype, device=device)
        return cls(key=list(data[0]), value=list(data[1]))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Bytes of one block across all layers, keys and values."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                    cache_v: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Write k, v [N, Hkv, D] into one layer's cache at `meta.slot_mapping`, then attend each
    sequence's queries (q [N, Hq, D]) to its first context_len cached tokens, causally
    (a query at absolute position p sees positions <= p). Returns [N, Hq, D]."""
    block_size, num_kv_heads, head_dim = cache_k.shape[1:]
    cache_k.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    cache_v.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    groups = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    for i in range(meta.num_seqs):
        start, length, context = meta.query_start[i], meta.query_len[i], meta.context_len[i]
        count, run = -(-context // block_size), meta.runs[i]
        # Consecutive blocks are read in place; scattered ones are gathered (a copy).
        blocks = slice(run, run + count) if run is not None else meta.block_table[i][:count]
        # [1, H, T, D] views of [T, H, D] rows: the layout transformers' attention sees.
        query = q[start:start + length].transpose(0, 1)[None]
        key = cache_k[blocks].flatten(0, 1)[:context].transpose(0, 1)[None]
        value = cache_v[blocks].flatten(0, 1)[:context].transpose(0, 1)[None]
        out[start:start + length] = _sdpa(query, key, value, groups, scale)[0].transpose(0, 1)
    return out


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: int,
          scale: float) -> torch.Tensor:
    """The sdpa call of `transformers.integrations.sdpa_attention` for one sequence whose
    T queries are the last T of its K keys: `is_causal` for a whole prompt, no mask for one
    query, an explicit causal mask offset by K - T otherwise (as its `sdpa_mask` builds)."""
    length, context = query.shape[2], key.shape[2]
    mask = None
    if 1 < length < context:
        offset = torch.arange(length, device=query.device)[:, None] + (context - length)
        mask = (offset >= torch.arange(context, device=query.device)[None, :])[None, None]
    extra = {}
    if groups > 1:
        if use_gqa_in_sdpa(mask, key, value):
            extra["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale, is_causal=length == context > 1, **extra)
