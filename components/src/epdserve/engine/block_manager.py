"""Paged KV block pool with reference counts and a prefix cache.

A sequence's KV lives in `seq.block_table`: block `i` holds the KV of token positions
`[i * block_size, (i + 1) * block_size)`. A block that is full of computed tokens gets a
chained hash (parent hash, its token ids, the media spans it covers) and is registered in the
prefix cache, so a later sequence with the same prefix (same text AND same media) reuses it
instead of recomputing it. Blocks are shared only once full and committed; nobody writes to a
shared block again, because sequences only ever append past their computed prefix.

Free blocks are of two kinds, both counted by `num_free_blocks`:
- uncached ones, on a FIFO free list, handed out first, as runs of consecutive ids when the
  list has them: attention then reads a sequence's KV in place instead of gathering it;
- cached ones with refcount 0, kept in LRU order and evicted (hash mapping dropped) only when
  the free list is empty. A prefix hit on one of these revives it.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict
from collections.abc import Iterable

from epdserve.engine.sequence import Sequence

_ROOT_HASH = bytes(16)  # parent of a sequence's first block
_RUN_SEARCH = 64  # free blocks tried as the start of a consecutive run before giving up


class BlockManager:
    """Fixed pool of `num_blocks` KV blocks of `block_size` tokens; refcounted; prefix cache.

    Stats for metrics: `prefix_queries` counts the full prompt blocks eligible for reuse at each
    `allocate`, `prefix_hits` the blocks actually reused.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._ref = [0] * num_blocks
        # Hash of each block full of committed tokens, None for blocks handed out since; kept
        # even when another block owns the cache entry, because the next block's hash chains on it.
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> the block owning the cache entry
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # FIFO
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, refcount 0; oldest first

    @property
    def num_free_blocks(self) -> int:
        """Blocks with refcount 0, evictable cached ones included."""
        return len(self._free) + len(self._lru)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold the KV of `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def prompt_blocks(self, seq: Sequence) -> list[int]:
        """The blocks of `seq` holding its prompt's KV, in order."""
        return seq.block_table[: self.num_blocks_for(seq.num_prompt_tokens)]

    def can_allocate(self, seq: Sequence, reserve_tokens: int = 0) -> bool:
        """True if `allocate(seq, reserve_tokens)` would find its blocks."""
        hits = self._match_prefix(seq)
        revived = sum(1 for b in hits if self._ref[b] == 0)  # a free hit uses up a free block
        need = self.num_blocks_for(max(seq.num_tokens, reserve_tokens))
        return need - len(hits) + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, reserve_tokens: int = 0) -> None:
        """Fill `seq.block_table` for all of `seq.token_ids`, and room for `reserve_tokens`
        tokens in all, reusing cached prefix blocks; the rest comes as one run of consecutive
        blocks when the pool has one, so the sequence's decode needs no new blocks for a while.

        Sets `seq.num_cached_tokens` and `seq.num_computed_tokens` to the tokens served from
        the cache. Raises RuntimeError if the pool is short (check `can_allocate` first).
        """
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        hits = self._match_prefix(seq)
        self.prefix_queries += self._num_reusable_blocks(seq)
        self.prefix_hits += len(hits)
        # Revive hits before taking fresh blocks, so that eviction cannot take a hit.
        for b in hits:
            if self._ref[b] == 0:
                del self._lru[b]
            self._ref[b] += 1
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        seq.block_table = hits
        self._grow(seq, max(seq.num_tokens, reserve_tokens))

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references and clear its block table.

        Blocks are released last to first, so that a sequence's tail is evicted before its
        prefix (the part other requests are most likely to share).
        """
        for b in reversed(seq.block_table):
            self._ref[b] -= 1
            if self._ref[b] > 0:
                continue
            h = self._hash[b]
            if h is not None and self._cached.get(h) == b:
                self._lru[b] = None
            else:
                self._free[b] = None
        seq.block_table = []

    def can_append(self, seq: Sequence) -> bool:
        """True if there is room for the KV of every token in `seq.token_ids`."""
        return self.num_blocks_for(seq.num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def append(self, seq: Sequence) -> None:
        """After tokens were appended to `seq.token_ids`: add the blocks their KV needs."""
        self._grow(seq, seq.num_tokens)

    def commit(self, seq: Sequence) -> None:
        """Register in the prefix cache every block now full of computed tokens.

        Call after the KV of `seq.token_ids[:seq.num_computed_tokens]` was written. When an
        identical block is already cached (two requests computed the same prefix at once), the
        existing entry stays and this block is simply not shared.
        """
        table = seq.block_table
        end = seq.num_computed_tokens // self.block_size
        start = end
        while start > 0 and self._hash[table[start - 1]] is None:
            start -= 1
        for i in range(start, end):
            h = self._full_block_hash(seq, i)
            self._hash[table[i]] = h
            self._cached.setdefault(h, table[i])

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        missing = self.num_blocks_for(num_tokens) - len(seq.block_table)
        if missing <= 0:
            return
        run = self._find_run(missing, seq.block_table[-1] + 1 if seq.block_table else None)
        if run is None:
            blocks = [self._take_block() for _ in range(missing)]
        else:
            blocks = list(run)
            for b in blocks:
                del self._free[b]
                self._hash[b] = None
        for b in blocks:
            self._ref[b] = 1
        seq.block_table.extend(blocks)

    def _find_run(self, count: int, after: int | None) -> range | None:
        """`count` consecutive free uncached blocks, starting at `after` if it can."""
        starts = [after] if after is not None else []
        starts += list(itertools.islice(self._free, _RUN_SEARCH))
        for start in starts:
            if all(b in self._free for b in range(start, start + count)):
                return range(start, start + count)
        return None

    def _take_block(self) -> int:
        """A free block, evicting the least recently used cached one if need be; unhashed."""
        if self._free:
            b, _ = self._free.popitem(last=False)
        elif self._lru:
            b, _ = self._lru.popitem(last=False)
            h = self._hash[b]
            assert h is not None, f"block {b} is in the LRU without a hash"  # LRU blocks own a cache entry
            del self._cached[h]
        else:
            raise RuntimeError("KV block pool exhausted")
        self._hash[b] = None  # a duplicate of a cached block may come back with its hash
        return b

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks serving the longest prefix of `seq`, all full.

        The block holding the last token is never reused: that token must be computed for the
        logits, so at most `(num_tokens - 1) // block_size` blocks can hit.
        """
        hits: list[int] = []
        for i in range(self._num_reusable_blocks(seq)):
            b = self._cached.get(self._full_block_hash(seq, i))
            if b is None:
                break
            hits.append(b)
        return hits

    def _num_reusable_blocks(self, seq: Sequence) -> int:
        """Full blocks of `seq` before the one holding its last token, which is always computed."""
        return max(seq.num_tokens - 1, 0) // self.block_size

    def _full_block_hash(self, seq: Sequence, i: int) -> bytes:
        """The hash of `seq`'s full block `i`, kept on the sequence: its tokens only ever grow,
        so a waiting sequence is not re-hashed at every admission attempt."""
        hashes = seq.block_hashes
        while len(hashes) <= i:
            hashes.append(self._block_hash(seq, len(hashes), hashes[-1] if hashes else _ROOT_HASH))
        return hashes[i]

    def _block_hash(self, seq: Sequence, i: int, parent: bytes) -> bytes:
        """Chained hash of block `i`: parent, token ids, and every media span overlapping it.

        Placeholder token ids are the same for every image, so the media content hash and
        where its span sits relative to the block must be part of the key.
        """
        start, end = i * self.block_size, (i + 1) * self.block_size
        media = tuple((m.hash, m.offset - start) for m in seq.media if m.offset < end and m.offset + m.length > start)
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", seq.token_ids[start:end]).tobytes())
        h.update(repr(media).encode())
        return h.digest()

    def check_invariants(self, holders: Iterable[Sequence], held: Iterable[Sequence] = ()) -> None:
        """Raise AssertionError, naming the block, unless the pool is consistent with `holders`,
        every sequence holding blocks (live and held ones), of which `held` are the held ones:

        - a block's refcount is the number of `holders` whose block table names it;
        - the free list and the LRU are disjoint, and hold exactly the blocks of refcount 0;
        - free + used == total;
        - LRU blocks own their prefix cache entry, and every entry names a block of that hash;
        - no block of a `held` sequence is free.

        For tests: O(pool), never called on the hot path.
        """
        counts = [0] * self.num_blocks
        for seq in holders:
            assert len(set(seq.block_table)) == len(seq.block_table), f"{seq.request_id} names a block twice"
            for b in seq.block_table:
                assert 0 <= b < self.num_blocks, f"{seq.request_id} names block {b} outside the pool"
                counts[b] += 1
        for b, (want, ref) in enumerate(zip(counts, self._ref, strict=True)):
            assert ref == want, f"block {b}: refcount {ref}, but {want} sequences hold it"
        both = self._free.keys() & self._lru.keys()
        assert not both, f"blocks {sorted(both)} are both on the free list and in the LRU"
        for b in itertools.chain(self._free, self._lru):
            assert self._ref[b] == 0, f"free block {b} has refcount {self._ref[b]}"
        used = sum(1 for ref in self._ref if ref > 0)
        assert self.num_free_blocks + used == self.num_blocks, (
            f"{self.num_free_blocks} free + {used} used != {self.num_blocks} blocks: a block is lost"
        )
        for b in self._lru:
            h = self._hash[b]
            assert h is not None and self._cached.get(h) == b, f"LRU block {b} owns no prefix cache entry"
        for b in self._free:
            h = self._hash[b]
            assert h is None or self._cached.get(h) != b, f"block {b} on the free list owns a prefix cache entry"
        for h, b in self._cached.items():
            assert self._hash[b] == h, f"the prefix cache names block {b} for a hash it does not have"
        for seq in held:
            for b in seq.block_table:
                assert self._ref[b] > 0, f"block {b} held for {seq.request_id} is free"
