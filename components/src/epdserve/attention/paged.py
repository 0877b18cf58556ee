"""Paged KV cache and attention over packed sequence chunks (model-agnostic).

A forward packs the new tokens of several sequences along one token axis of N rows. Their
keys and values go to fixed-size cache blocks; a sequence's block table lists its blocks in
order, so its token at position p lives in slot ``table[p // block_size] * block_size +
p % block_size``. Blocks can be shared between sequences (prefix caching).

Attention runs per sequence with the `scaled_dot_product_attention` call that
`transformers`' sdpa attention makes for one sequence with a `DynamicCache`, except that a
one-query attention puts the query heads of a KV head in one call and may merge block runs.
Outputs match `transformers` to float rounding (fp32 logits within ~1e-6), not bit for bit:
batching already changes every matmul's row count, which changes BLAS rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, use_gqa_in_sdpa

from epdserve.kernels.cpu import CpuKernels
from epdserve.kernels.decode_batch import DecodeBatch

MAX_RUNS = 4  # beyond this many block runs, one gather costs less than attending run by run
MIN_RUNS_CONTEXT = 256  # below this many positions too: the gather is cheap, the merge is not


@dataclass
class AttentionMetadata:
    """Describes one forward over a batch of sequence chunks, packed along the token axis.

    positions [N] int64: absolute position of each packed token. slot_mapping [N] int64:
    block_id * block_size + offset where each token's K/V is written. Per sequence i:
    query_start[i], query_len[i]: its tokens in the packed batch; context_len[i]: its tokens
    in the cache AFTER this chunk (start + query_len); kv_blocks[i]: the cache blocks holding
    that context, as a slice when their ids are consecutive (read in place), else as a list
    of such runs for a one-query chunk on CPU with at most `MAX_RUNS` runs over at least
    `MIN_RUNS_CONTEXT` positions (each run read in place, the results merged), else as an
    index tensor (gathered, a copy); masks[i]: the boolean causal mask of a chunk that is
    neither a whole prompt nor one token, else None. Everything is built once per forward,
    not per layer.

    output_rows [M] int64: the rows whose final hidden states the forward returns, the last
    token of each chunk that samples. `outputs` attends only those rows (one query per
    sequence, over the same context; its positions and slot_mapping are empty, as the full
    pass writes the K/V); None when they are all the rows (a decode step).

    decode: the one-query chunks again as a `DecodeBatch` (CPU only), for `CpuKernels`.

    rope_positions [A, N] int64: the rotary positions of models whose positions have several
    axes (M-RoPE), set by the caller; None: rotary positions are `positions`.
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start: list[int]
    query_len: list[int]
    context_len: list[int]
    kv_blocks: list[slice | list[slice] | torch.Tensor]
    masks: list[torch.Tensor | None]
    output_rows: torch.Tensor
    outputs: AttentionMetadata | None = None
    decode: DecodeBatch | None = None
    rope_positions: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_len)

    @classmethod
    def build(
        cls,
        chunks: Sequence[tuple[Sequence[int], int, int]],
        block_size: int,
        device: torch.device | str = "cpu",
        samples: Sequence[bool] | None = None,
    ) -> AttentionMetadata:
        """Metadata for chunks given as (block_table, start, query_len) per sequence: the
        chunk holds positions start .. start+query_len-1, written into the table's blocks.
        `samples[i]`: chunk i's last token is an output row (default: every chunk's)."""
        samples = [True] * len(chunks) if samples is None else samples
        if len(samples) != len(chunks):
            raise ValueError(f"{len(samples)} sample flags for {len(chunks)} chunks")
        positions, slots, query_start, kv_runs, kv_blocks, masks = [], [], [0], [], [], []
        for table, start, length in chunks:
            pos = torch.arange(start, start + length)
            blocks = torch.as_tensor(table, dtype=torch.long)[pos // block_size]
            positions.append(pos)
            slots.append(blocks * block_size + pos % block_size)
            query_start.append(query_start[-1] + length)
            runs = _runs(table, -(-(start + length) // block_size))
            kv_runs.append(runs)
            kv_blocks.append(_context_blocks(runs, length, start + length, device))
            masks.append(_causal_mask(length, start + length, device))
        query_len = [length for _, _, length in chunks]
        context_len = [start + length for _, start, length in chunks]
        out = [i for i, s in enumerate(samples) if s]
        on_cpu = torch.device(device).type == "cpu"

        def decode_batch(rows: list[int], seqs: list[int]) -> DecodeBatch | None:
            return (
                DecodeBatch.build(rows, [chunks[i][0] for i in seqs], [context_len[i] for i in seqs], block_size)
                if on_cpu
                else None
            )

        outputs = None
        if len(out) < len(chunks) or any(n > 1 for n in query_len):
            none = torch.empty(0, dtype=torch.long, device=device)
            outputs = cls(
                positions=none,
                slot_mapping=none,
                query_start=list(range(len(out))),
                query_len=[1] * len(out),
                context_len=[context_len[i] for i in out],
                kv_blocks=[_context_blocks(kv_runs[i], 1, context_len[i], device) for i in out],
                masks=[None] * len(out),
                output_rows=torch.arange(len(out), device=device),
                decode=decode_batch(list(range(len(out))), out),
            )
        single = [i for i, n in enumerate(query_len) if n == 1]
        return cls(
            positions=torch.cat(positions).to(device),
            slot_mapping=torch.cat(slots).to(device),
            query_start=query_start[:-1],
            query_len=query_len,
            context_len=context_len,
            kv_blocks=kv_blocks,
            masks=masks,
            output_rows=torch.tensor([query_start[i + 1] - 1 for i in out], dtype=torch.long, device=device),
            outputs=outputs,
            decode=decode_batch([query_start[i] for i in single], single),
        )


def _runs(table: Sequence[int], count: int) -> list[slice]:
    """The first `count` blocks of `table` as runs of consecutive block ids, in order."""
    # Fast path for the usual case, one run: a list compare instead of a Python loop.
    if table[count - 1] - table[0] == count - 1 and list(table[:count]) == list(range(table[0], table[0] + count)):
        return [slice(table[0], table[0] + count)]
    runs, first = [], 0
    for i in range(1, count + 1):
        if i == count or table[i] != table[i - 1] + 1:
            runs.append(slice(table[first], table[i - 1] + 1))
            first = i
    return runs


def _context_blocks(
    runs: list[slice], length: int, context: int, device: torch.device | str
) -> slice | list[slice] | torch.Tensor:
    """How a chunk of `length` queries over `context` positions reads the blocks `runs`:
    see `AttentionMetadata`."""
    if len(runs) == 1:
        return runs[0]
    # The merge needs the log-sum-exp that only the CPU flash kernel returns.
    if length == 1 and len(runs) <= MAX_RUNS and context >= MIN_RUNS_CONTEXT and torch.device(device).type == "cpu":
        return runs
    return _gather_index(runs, device)


def _gather_index(runs: list[slice], device: torch.device | str) -> torch.Tensor:
    """The block ids of `runs` in order, as one index tensor for a gather."""
    return torch.cat([torch.arange(r.start, r.stop) for r in runs]).to(device)


def _causal_mask(length: int, context: int, device: torch.device | str) -> torch.Tensor | None:
    """[1, 1, T, K] mask for T queries that are the last T of K keys, as transformers'
    `sdpa_mask` builds it; None for a whole prompt (`is_causal`) or one query (no mask)."""
    if not 1 < length < context:
        return None
    offset = torch.arange(length, device=device)[:, None] + (context - length)
    return (offset >= torch.arange(context, device=device)[None, :])[None, None]


def write_kv(
    k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: AttentionMetadata
) -> None:
    """Write k, v [N, Hkv, D] into one layer's cache at `meta.slot_mapping`."""
    num_kv_heads, head_dim = cache_k.shape[2:]
    cache_k.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    cache_v.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kernels: CpuKernels | None = None,
) -> torch.Tensor:
    """Attend each sequence's queries (q [N, Hq, D]) to its first context_len cached tokens,
    causally (a query at absolute position p sees positions <= p). Returns [N, Hq, D].
    With `kernels` that support these tensors, all one-query chunks go through one kernel call."""
    num_kv_heads = cache_k.shape[2]
    groups = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    fused = False
    if meta.decode is not None and kernels is not None and kernels.supports_attention(q, cache_k):
        kernels.decode_attention(q, cache_k, cache_v, meta.decode, scale, out)
        fused = True
    for i in range(meta.num_seqs):
        start, length, context = meta.query_start[i], meta.query_len[i], meta.context_len[i]
        blocks = meta.kv_blocks[i]
        if length == 1:
            if fused:
                continue
            # One query sees every key: the query heads sharing a KV head become that head's
            # rows, so each key is read once per KV head instead of once per query head.
            query = q[start].view(1, num_kv_heads, groups, -1)
            out[start] = _attend_one(query, cache_k, cache_v, blocks, context, scale).view(q.shape[1:])
            continue
        assert not isinstance(blocks, list)  # runs only for one-query chunks (AttentionMetadata.kv_blocks)
        key, value = _context(cache_k, blocks, context), _context(cache_v, blocks, context)
        # [1, H, T, D] views of [T, H, D] rows: the layout transformers' attention sees.
        query = q[start : start + length].transpose(0, 1)[None]
        out[start : start + length] = _sdpa(query, key, value, meta.masks[i], groups, scale)[0].transpose(0, 1)
    return out


def _context(cache: torch.Tensor, blocks: slice | torch.Tensor, n: int) -> torch.Tensor:
    """[1, Hkv, n, D]: the first `n` positions held in `blocks` of one layer's cache
    [num_blocks, block_size, Hkv, D] (contiguous, as `KVCache.allocate` makes it), heads
    first as attention takes them. A view when `blocks` is a slice (one `as_strided`, the hot
    path of every decode step), else a gather."""
    if isinstance(blocks, torch.Tensor):
        return cache[blocks].flatten(0, 1)[:n].transpose(0, 1)[None]
    _, block_size, heads, dim = cache.shape
    row = heads * dim  # one position's keys for every head
    return cache.as_strided(
        (1, heads, n, dim), (row, dim, row, 1), cache.storage_offset() + blocks.start * block_size * row
    )


def _attend_one(
    query: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    blocks: slice | list[slice] | torch.Tensor,
    context: int,
    scale: float,
) -> torch.Tensor:
    """Attention of one query's heads `query` [1, Hkv, G, D] (no mask) to the first `context`
    positions held in `blocks` (see `AttentionMetadata.kv_blocks`). Returns [1, Hkv, G, D]."""
    if isinstance(blocks, list):
        if query.dtype == torch.float32:
            return _merge_runs(query, cache_k, cache_v, blocks, context, scale)
        # The kernel rounds each run's output to a reduced dtype before the merge, which
        # would make tokens depend on where blocks sit: gather instead.
        blocks = _gather_index(blocks, query.device)
    key, value = _context(cache_k, blocks, context), _context(cache_v, blocks, context)
    return F.scaled_dot_product_attention(query, key, value, scale=scale)


def _merge_runs(
    query: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, runs: list[slice], context: int, scale: float
) -> torch.Tensor:
    """`_attend_one` over several block runs, each read in place, merged by their log-sum-exp:
    equal to attending their concatenation up to float rounding. CPU and float32 only."""
    block_size = cache_k.shape[1]
    outs, lses, seen = [], [], 0
    for run in runs:
        n = min((run.stop - run.start) * block_size, context - seen)
        key, value = _context(cache_k, run, n), _context(cache_v, run, n)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, scale=scale)
        outs.append(out)
        lses.append(lse)
        seen += n
    weights = torch.softmax(torch.stack(lses), 0)[..., None]  # each run's share of the probability mass
    return (torch.stack(outs) * weights).sum(0)


def _sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, groups: int, scale: float
) -> torch.Tensor:
    """The sdpa call of `transformers.integrations.sdpa_attention` for one sequence whose
    T queries are the last T of its K keys: `is_causal` for a whole prompt, no mask for one
    query, the explicit causal `mask` otherwise."""
    length, context = query.shape[2], key.shape[2]
    extra = {}
    if groups > 1:
        if use_gqa_in_sdpa(mask, key, value):
            extra["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale, is_causal=length == context > 1, **extra
    )
