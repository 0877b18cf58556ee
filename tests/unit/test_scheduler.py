"""Scheduler: token budget, chunked prefill, decode priority, FCFS, preemption, abort."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from epdserve.engine.block_manager import BlockManager
from epdserve.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from epdserve.engine.sequence import Sequence, SequenceStatus
from support.blocks import ShadowKV, check_refcounts, image, make_seq


def make(num_blocks: int = 64, block_size: int = 4, **config) -> Scheduler:
    """A scheduler that takes blocks only as tokens need them (no decode window) unless the
    test asks for one, so the tests see every append and preemption."""
    config.setdefault("reserve_window", 0)
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size))


def token_at(seq: Sequence) -> int:
    """A deterministic "model": the token sampled depends on the request and position only."""
    return 1000 + hash((seq.request_id, seq.num_tokens)) % 1000


def drain(sched: Scheduler, **kw) -> list[tuple[Sequence, str]]:
    """Step until every request finished (bounded, so that a bug fails instead of hanging)."""
    finished = []
    for _ in range(200):
        if not sched.has_unfinished():
            return finished
        finished += step(sched, **kw)[1]
    raise AssertionError("requests never finished")


def step(sched: Scheduler, kv: ShadowKV | None = None,
         sample: Callable[[Sequence], int] = token_at,
         ) -> tuple[list[ScheduledChunk], list[tuple[Sequence, str]]]:
    """One engine step; the shadow KV checks that every written position has a block."""
    chunks = sched.schedule()
    for c in chunks:
        assert c.start == c.seq.num_computed_tokens and c.num_tokens > 0
        if kv is not None:
            kv.compute(c.seq, c.start, c.num_tokens)
    sampled = {c.seq.request_id: sample(c.seq) for c in chunks if c.samples}
    finished = sched.finish_step(chunks, sampled)
    check_pool(sched)
    return chunks, finished


def check_pool(sched: Scheduler) -> None:
    """After a step: waiting sequences hold no blocks, and the pool's invariants hold with the
    running and loading sequences as its only holders."""
    for seq in sched.waiting:
        assert not seq.block_table, f"waiting {seq.request_id} holds blocks"
    sched.blocks.check_invariants([*sched.running, *sched.loading])


def shape(chunks: list[ScheduledChunk]) -> list[tuple[str, int, int, bool]]:
    return [(c.seq.request_id, c.start, c.num_tokens, c.samples) for c in chunks]


def test_add_refuses_what_can_never_run():
    sched = make(num_blocks=4, block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(make_seq("long", [1] * 33))
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add(make_seq("big", [1] * 10, max_tokens=7))     # 17 tokens > 16 slots
    with pytest.raises(ValueError, match="empty"):
        sched.add(make_seq("empty", []))
    sched.add(make_seq("ok", [1] * 10, max_tokens=6))
    assert sched.has_unfinished() and len(sched.waiting) == 1


def test_chunked_prefill_across_steps():
    sched = make(max_num_batched_tokens=4)
    sched.add(make_seq("a", list(range(10)), max_tokens=2))
    assert shape(step(sched)[0]) == [("a", 0, 4, False)]
    assert shape(step(sched)[0]) == [("a", 4, 4, False)]
    chunks, finished = step(sched)
    assert shape(chunks) == [("a", 8, 2, True)] and not finished
    chunks, finished = step(sched)
    assert shape(chunks) == [("a", 10, 1, True)]
    assert [(s.request_id, r, s.num_output_tokens) for s, r in finished] == [("a", "length", 2)]
    assert not sched.has_unfinished() and sched.blocks.num_free_blocks == 64


def test_decodes_first_then_prefills_within_budget():
    sched = make(max_num_batched_tokens=8)
    sched.add(make_seq("a", [1, 2, 3]))
    sched.add(make_seq("b", list(range(20))))
    assert shape(step(sched)[0]) == [("a", 0, 3, True), ("b", 0, 5, False)]
    sched.add(make_seq("c", [4, 5]))                      # no budget left for c this step
    assert shape(step(sched)[0]) == [("a", 3, 1, True), ("b", 5, 7, False)]
    assert shape(step(sched)[0]) == [("a", 4, 1, True), ("b", 12, 7, False)]
    assert shape(step(sched)[0]) == [("a", 5, 1, True), ("b", 19, 1, True), ("c", 0, 2, True)]


def test_fcfs_head_that_does_not_fit_blocks_later_requests():
    sched = make(num_blocks=8, block_size=4)
    sched.add(make_seq("a", list(range(20)), max_tokens=2))   # 5 blocks
    sched.add(make_seq("b", list(range(100, 116))))            # 4 blocks: must wait for a
    sched.add(make_seq("c", [7]))                              # would fit, must not overtake
    chunks, _ = step(sched)
    assert [c.seq.request_id for c in chunks] == ["a"]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]
    step(sched)                                                # a finishes, frees its blocks
    assert [c.seq.request_id for c in step(sched)[0]] == ["b", "c"]


def test_max_num_seqs():
    sched = make(max_num_seqs=2)
    for rid in "abc":
        sched.add(make_seq(rid, [1, 2], max_tokens=2))
    assert [c.seq.request_id for c in step(sched)[0]] == ["a", "b"]
    assert [s.request_id for s in sched.running] == ["a", "b"]
    step(sched)                                                # a and b finish
    assert [c.seq.request_id for c in step(sched)[0]] == ["c"]


def test_finish_reasons():
    sched = make(max_model_len=6)
    sched.add(make_seq("stop", [1, 2], max_tokens=10, stop=(7,)))
    sched.add(make_seq("length", [1, 2], max_tokens=2))
    sched.add(make_seq("model_len", [3, 4], max_tokens=10))
    results = {}
    for seq, reason in drain(sched, sample=lambda s: 7 if s.num_tokens == 4 else 0):
        results[seq.request_id] = (reason, seq.output_ids)
        assert seq.status is SequenceStatus.FINISHED and seq.block_table == []
    assert results == {"stop": ("stop", [0, 0, 7]), "length": ("length", [0, 0]),
                       "model_len": ("length", [0, 0, 7, 0])}   # 7 stops only "stop"


def test_preemption_recomputes_and_finishes():
    sched = make(num_blocks=4, block_size=4, max_num_seqs=2)
    kv = ShadowKV(sched.blocks)
    a, b = make_seq("a", [1, 2, 3, 4], max_tokens=8), make_seq("b", [5, 6, 7, 8], max_tokens=8)
    small = make_seq("c", [9], max_tokens=2)                   # waits for a slot meanwhile
    for seq in (a, b, small):
        sched.add(seq)
    preempted_with = None
    finished = {}
    for _ in range(40):
        chunks, done = step(sched, kv)
        if b in sched.waiting and preempted_with is None:
            preempted_with = b.num_output_tokens
            assert list(sched.waiting) == [b, small]           # back to the front
            assert b.num_computed_tokens == 0 and b.block_table == []
            assert [c.seq for c in chunks] == [a]              # the newest one is the victim
        finished.update((s.request_id, s) for s, _ in done)
        for seq in sched.running:
            kv.check(seq)
        if not sched.has_unfinished():
            break
    assert preempted_with is not None and preempted_with > 0
    for seq in (a, b):                                          # outputs survive recomputation
        expected = [1000 + hash((seq.request_id, n)) % 1000 for n in range(4, 12)]
        assert finished[seq.request_id].output_ids == expected
    assert finished["c"].num_output_tokens == 2
    assert sched.blocks.num_free_blocks == 4


def test_sequence_preempts_itself_when_it_is_the_newest():
    sched = make(num_blocks=3, block_size=2)
    a, b = make_seq("a", [1, 2, 3], max_tokens=3), make_seq("b", [4, 5], max_tokens=2)
    sched.add(a)
    sched.add(b)
    step(sched)                          # a holds 2 blocks, b 1; b's sampled token needs a 4th
    chunks, _ = step(sched)
    assert [c.seq for c in chunks] == [a] and list(sched.waiting) == [b]
    finished = [(s.request_id, s.num_output_tokens) for s, _ in drain(sched)]
    assert finished == [("a", 3), ("b", 2)]
    assert sched.blocks.num_free_blocks == 3


def test_abort_frees_blocks_at_once():
    sched = make(num_blocks=16, block_size=4)
    sched.add(make_seq("a", list(range(10))))
    sched.add(make_seq("b", list(range(50, 60))))
    sched.add(make_seq("c", [1]))
    step(sched)
    assert sched.blocks.num_free_blocks == 16 - 7
    assert sched.abort("a") is True
    assert sched.blocks.num_free_blocks == 16 - 4
    assert sched.abort("a") is False and sched.abort("nope") is False
    sched.add(make_seq("d", [1, 2]))
    assert sched.abort("d") is True and [s.request_id for s in sched.waiting] == []
    assert [s.request_id for s in sched.running] == ["b", "c"]


def test_random_simulation_invariants():
    rng = random.Random(1)
    config = dict(max_num_seqs=5, max_num_batched_tokens=12, max_model_len=40)
    sched = make(num_blocks=14, block_size=4, **config)
    kv = ShadowKV(sched.blocks)
    prefixes = [[rng.randrange(8) for _ in range(rng.randrange(1, 20))] for _ in range(3)]
    requests: dict[str, Sequence] = {}
    results: dict[str, str] = {}
    aborted: set[str] = set()
    preempted: set[str] = set()
    stop = 99

    def sample(_: Sequence) -> int:
        return stop if rng.random() < 0.04 else rng.randrange(8)

    for i in range(400):
        if i < 300 and rng.random() < 0.3:
            prompt = rng.choice(prefixes) + [rng.randrange(8) for _ in range(rng.randrange(1, 9))]
            media = [image(rng.choice("pq"), 0, 5)] if len(prompt) > 5 and rng.random() < .4 else []
            seq = make_seq(f"r{i}", prompt, media, max_tokens=rng.randint(1, 12), stop=(stop,))
            sched.add(seq)
            requests[seq.request_id] = seq
        live = sched.running + sched.waiting
        if live and rng.random() < 0.03:
            rid = rng.choice(live).request_id
            assert sched.abort(rid)
            aborted.add(rid)
        chunks, done = step(sched, kv, sample)
        assert sum(c.num_tokens for c in chunks) <= config["max_num_batched_tokens"]
        assert len(sched.running) <= config["max_num_seqs"]
        assert len({c.seq.request_id for c in chunks}) == len(chunks)
        for seq, reason in done:
            assert seq.request_id not in results
            results[seq.request_id] = reason
            sampling = seq.request.sampling
            assert seq.num_output_tokens <= sampling.max_tokens
            assert stop not in seq.output_ids[:-1]
            if reason == "stop":
                assert seq.output_ids[-1] == stop
            else:
                assert reason == "length"
                assert (seq.num_output_tokens == sampling.max_tokens
                        or seq.num_tokens == config["max_model_len"])
        for seq in sched.running:
            kv.check(seq)
        check_refcounts(sched.blocks, list(sched.running))
        preempted.update(s.request_id for s in sched.waiting if s.num_output_tokens)
        if i >= 300 and not sched.has_unfinished():
            break
    assert not sched.has_unfinished()
    assert set(results) | aborted == set(requests) and not set(results) & aborted
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks
    assert sched.blocks.prefix_hits > 0 and preempted and aborted   # the paths were exercised


def test_admission_reserves_a_run_of_consecutive_blocks():
    sched = make(num_blocks=64, block_size=4, reserve_window=16)
    short = make_seq("short", list(range(10)), max_tokens=3)     # whole request: 13 tokens, 4 blocks
    long = make_seq("long", list(range(10)), max_tokens=100)     # 10 + a 16-token window: 7 blocks
    sched.add(short)
    sched.add(long)
    sched.schedule()
    check_pool(sched)
    assert len(short.block_table) == 4 and len(long.block_table) == 7
    for seq in (short, long):
        assert seq.block_table == list(range(seq.block_table[0], seq.block_table[0] + len(seq.block_table)))
