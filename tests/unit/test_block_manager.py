"""BlockManager: allocation, refcounts, prefix cache (media-aware), eviction, no leaks."""

from __future__ import annotations

import random

import pytest

from epdserve.engine.block_manager import BlockManager
from epdserve.engine.sequence import Sequence
from support.blocks import ShadowKV, check_refcounts, image, make_seq

BS = 4


def run_prefill(bm: BlockManager, seq: Sequence, upto: int | None = None) -> None:
    """Allocate and pretend the model computed the prompt (or its first `upto` tokens)."""
    if not seq.block_table:
        bm.allocate(seq)
    seq.num_computed_tokens = seq.num_tokens if upto is None else upto
    bm.commit(seq)


def test_allocate_and_free():
    bm = BlockManager(3, BS)
    seq = make_seq("a", list(range(10)))
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(set(seq.block_table)) == 3 and bm.num_free_blocks == 0
    assert seq.num_cached_tokens == seq.num_computed_tokens == 0
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 3
    assert not bm.can_allocate(make_seq("b", list(range(13))))   # all tokens need blocks
    with pytest.raises(RuntimeError):
        bm.allocate(make_seq("b", list(range(13))))


def test_append_crosses_block_boundary_only():
    bm = BlockManager(3, BS)
    seq = make_seq("a", list(range(4)))
    bm.allocate(seq)
    seq.token_ids.append(100)            # position 4: needs block 2
    assert bm.can_append(seq)
    bm.append(seq)
    assert len(seq.block_table) == 2
    for t in range(101, 104):            # positions 5..7 fit in block 2
        seq.token_ids.append(t)
        bm.append(seq)
        assert len(seq.block_table) == 2
    other = make_seq("b", list(range(4)))
    bm.allocate(other)                   # takes the last block (no hit: nothing committed)
    seq.token_ids.append(104)
    assert not bm.can_append(seq)


def test_prefix_hit_shares_blocks_with_refcount():
    bm = BlockManager(16, BS)
    a = make_seq("a", list(range(10)))
    run_prefill(bm, a)
    b = make_seq("b", list(range(10)) + [50, 51])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]          # a's block 2 is partial: never shared
    assert b.num_cached_tokens == b.num_computed_tokens == 8
    assert (bm.prefix_queries, bm.prefix_hits) == (2 + 2, 2)            # a looked up 2, b 2
    assert [bm._ref[x] for x in b.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == 16 - 4
    bm.free(a)
    assert bm.num_free_blocks == 16 - 3                  # shared blocks still held by b
    bm.free(b)
    assert bm.num_free_blocks == 16


@pytest.mark.parametrize("media, cached", [
    ([image("cat", 2, 6)], 8),                           # same image: hit
    ([image("dog", 2, 6)], 0),                           # same placeholder ids, other image
    ([], 0),                                             # text only
    ([image("cat", 3, 5)], 0),                           # same image at another offset
])
def test_media_hash_is_part_of_the_key(media, cached):
    bm = BlockManager(32, BS)
    prompt = [1, 2] + [9] * 6 + [3, 4, 5]                # image placeholders at [2, 8)
    run_prefill(bm, make_seq("a", prompt, [image("cat", 2, 6)]))
    seq = make_seq("b", prompt, media)
    bm.allocate(seq)
    assert seq.num_cached_tokens == cached


def test_media_only_affects_blocks_it_overlaps():
    bm = BlockManager(32, BS)
    prompt = list(range(8)) + [9] * 4 + [1]             # image at [8, 12): block 2
    run_prefill(bm, make_seq("a", prompt, [image("cat", 8, 4)]))
    b = make_seq("b", prompt, [image("dog", 8, 4)])
    bm.allocate(b)
    assert b.num_cached_tokens == 8


def test_hit_on_cached_but_freed_block_revives_it():
    bm = BlockManager(4, BS)
    a = make_seq("a", list(range(9)))
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4                       # cached blocks count as free
    b = make_seq("b", list(range(9)))
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and bm.num_free_blocks == 1
    assert [bm._ref[x] for x in b.block_table] == [1, 1, 1]


def test_last_block_is_never_served_from_cache():
    bm = BlockManager(16, BS)
    a = make_seq("a", list(range(8)))
    run_prefill(bm, a)
    again = make_seq("b", list(range(8)))                # fully cached, but the last token
    bm.allocate(again)                                   # must be computed for its logits
    assert again.num_cached_tokens == 4
    assert again.block_table[0] == a.block_table[0] and again.block_table[1] != a.block_table[1]
    longer = make_seq("c", list(range(9)))
    bm.allocate(longer)
    assert longer.num_cached_tokens == 8


def test_commit_registers_only_full_computed_blocks():
    bm = BlockManager(16, BS)
    a = make_seq("a", list(range(12)))
    run_prefill(bm, a, upto=6)                           # block 0 full, block 1 half computed
    probe = make_seq("p", list(range(13)))
    bm.allocate(probe)
    assert probe.num_cached_tokens == 4
    bm.free(probe)
    run_prefill(bm, a, upto=12)
    probe = make_seq("q", list(range(13)))
    bm.allocate(probe)
    assert probe.num_cached_tokens == 12


def test_output_tokens_are_cached_once_computed():
    bm = BlockManager(16, BS)
    a = make_seq("a", list(range(3)))
    run_prefill(bm, a)
    a.token_ids.append(7)                                # sampled token at position 3
    bm.append(a)
    a.num_computed_tokens = 4                            # its KV computed by the next decode
    bm.commit(a)
    b = make_seq("b", list(range(3)) + [7, 8])
    bm.allocate(b)
    assert b.num_cached_tokens == 4


def test_duplicate_blocks_computed_concurrently():
    bm = BlockManager(4, BS)
    a, b = make_seq("a", list(range(5))), make_seq("b", list(range(5)))
    bm.allocate(a)
    bm.allocate(b)                                       # nothing committed yet: no sharing
    assert not set(a.block_table) & set(b.block_table)
    run_prefill(bm, a)
    run_prefill(bm, b)                                   # same hash: a's entry is kept
    a_first = a.block_table[0]
    bm.free(b)                                           # b's copy is not cached: truly free
    bm.free(a)
    assert bm.num_free_blocks == 4
    c = make_seq("c", list(range(5)))
    bm.allocate(c)
    assert c.num_cached_tokens == 4 and c.block_table[0] == a_first
    bm.free(c)
    x = make_seq("x", [7, 7, 7, 7, 8, 8, 8, 8, 9])             # reuses b's blocks: hashes reset
    run_prefill(bm, x)
    y = make_seq("y", [7, 7, 7, 7, 8, 8, 8, 8, 0])
    bm.allocate(y)
    assert y.num_cached_tokens == 8


def test_free_releases_tail_blocks_first():
    bm = BlockManager(4, 2)
    a = make_seq("a", [1, 2, 3, 4, 5, 6, 0])
    run_prefill(bm, a)                                   # 3 cached blocks + 1 uncached
    bm.free(a)
    b = make_seq("b", [9, 9, 9])                         # 2 blocks: the uncached one + evicts
    bm.allocate(b)                                       # [5, 6], a's tail, not its head
    bm.free(b)
    probe = make_seq("c", [1, 2, 3, 4, 5, 6, 0])
    bm.allocate(probe)
    assert probe.num_cached_tokens == 4


def test_lru_eviction_order_and_refresh_on_hit():
    bm = BlockManager(3, 2)
    for rid, prompt in (("a", [1, 2, 0]), ("b", [3, 4, 0])):
        seq = make_seq(rid, prompt)
        run_prefill(bm, seq)
        bm.free(seq)                                     # LRU: [1, 2], [3, 4]
    again = make_seq("c", [1, 2, 9])                     # hit: [1, 2] becomes the newest
    bm.allocate(again)
    bm.free(again)
    big = make_seq("d", [5, 6, 7, 8])                    # 2 blocks: 1 uncached + evicts [3, 4]
    bm.allocate(big)
    bm.free(big)
    for rid, prompt, cached in (("e", [1, 2, 0], 2), ("f", [3, 4, 0], 0)):
        probe = make_seq(rid, prompt)
        bm.allocate(probe)
        assert probe.num_cached_tokens == cached
        bm.free(probe)


def test_check_invariants_names_what_is_broken():
    bm = BlockManager(8, BS)
    a, b = make_seq("a", list(range(6))), make_seq("b", list(range(6)))
    bm.allocate(a)
    bm.check_invariants([a])
    with pytest.raises(AssertionError, match="refcount 1, but 0 sequences"):
        bm.check_invariants([])                                  # a leaked sequence
    bm.allocate(b)
    with pytest.raises(AssertionError, match="refcount 1, but 2 sequences"):
        bm.check_invariants([a, b, a])
    held = make_seq("held", [1])
    held.block_table = [bm._free.__iter__().__next__()]          # names a block it never took
    with pytest.raises(AssertionError, match="refcount 0, but 1 sequences"):
        bm.check_invariants([a, b, held], [held])
    bm._free[a.block_table[0]] = None                            # a used block back on the free list
    with pytest.raises(AssertionError, match="free block"):
        bm.check_invariants([a, b])


def test_random_workload_has_no_leak():
    rng = random.Random(0)
    bm = BlockManager(24, BS)
    kv = ShadowKV(bm)
    prefixes = [[rng.randrange(5) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    live: list[Sequence] = []
    for step in range(3000):
        op = rng.random()
        if op < 0.25:
            prompt = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(0, 6))]
            with_image = len(prompt) >= 4 and rng.random() < 0.5
            seq = make_seq(f"r{step}", prompt, [image(rng.choice("xy"), 1, 3)] * with_image)
            if bm.can_allocate(seq):
                bm.allocate(seq)
                kv.check(seq)                            # hits hold exactly our tokens
                live.append(seq)
        elif op < 0.4 and live:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        elif live:
            seq = rng.choice(live)
            if seq.num_computed_tokens < seq.num_tokens:  # compute a chunk, maybe to the end
                n = rng.randint(1, seq.num_tokens - seq.num_computed_tokens)
                kv.compute(seq, seq.num_computed_tokens, n)
                seq.num_computed_tokens += n
                bm.commit(seq)
            else:                                        # "sample" a token and make room
                seq.token_ids.append(rng.randrange(5))
                if bm.can_append(seq):
                    bm.append(seq)
                else:
                    live.remove(seq)
                    bm.free(seq)
        for seq in live:
            kv.check(seq)
        check_refcounts(bm, live)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.prefix_hits > 0
