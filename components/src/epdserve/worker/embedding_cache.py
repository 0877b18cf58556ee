"""The encode worker's embedding cache: LRU by bytes, in the NIXL-registered region itself.

A cached embedding is exactly what a reader pulls, so a hit costs neither an encode nor a
copy. Entries a reader has yet to pull are pinned (for a `ReadHold`, transfer/hold.py) and never
evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.transfer.agent import TransferAgent
from epdserve.transfer.region import Span


@dataclass
class CachedEmbedding:
    key: str
    span: Span
    dtype: torch.dtype
    shape: tuple[int, ...]
    pins: int = 0


class EmbeddingCache:
    """`key` (media hash or client uuid) -> `[length, H]` embedding in `agent`'s region."""

    def __init__(self, agent: TransferAgent):
        self.agent = agent
        self._entries: OrderedDict[str, CachedEmbedding] = OrderedDict()  # LRU first
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def lookup(self, key: str) -> CachedEmbedding | None:
        """The entry, pinned and made most recent, or None (counted as hit or miss)."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        entry.pins += 1
        return entry

    def insert(self, key: str, embedding: torch.Tensor) -> CachedEmbedding:
        """Copy `embedding` into the region as `key`'s entry, pinned; evicts unpinned entries
        from the least recent on until it fits. 503 when pinned entries leave no room."""
        if (entry := self._entries.get(key)) is not None:  # another request encoded it meanwhile
            self._entries.move_to_end(key)
            entry.pins += 1
            return entry
        nbytes = embedding.numel() * embedding.element_size()
        span = self.agent.alloc(nbytes)
        while span is None:
            victim = next((e for e in self._entries.values() if not e.pins), None)
            if victim is None:
                raise EpdError(
                    503,
                    f"the encoder cache ({self.agent.allocator.capacity} bytes) is full of "
                    f"embeddings in flight; raise --encoder-cache-bytes (this one needs {nbytes})",
                )
            self._evict(victim)
            span = self.agent.alloc(nbytes)
        shape = tuple(embedding.shape)
        self.agent.view(span, embedding.dtype, shape).copy_(embedding)
        entry = self._entries[key] = CachedEmbedding(key, span, embedding.dtype, shape, pins=1)
        return entry

    def unpin(self, *entries: CachedEmbedding) -> None:
        """Undo one pin of each entry (`lookup` and `insert` pin): a reader is done with them."""
        for entry in entries:
            entry.pins -= 1

    def remote(self, entry: CachedEmbedding) -> pb.RemoteTensor:
        return self.agent.remote_tensor(entry.span, entry.dtype, entry.shape)

    def _evict(self, entry: CachedEmbedding) -> None:
        del self._entries[entry.key]
        self.agent.free(entry.span)
        self.evictions += 1

    def stats(self) -> dict[str, int]:
        return {
            "cache_entries": len(self._entries),
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cache_evictions": self.evictions,
            "cache_pinned": sum(e.pins for e in self._entries.values()),
        }
