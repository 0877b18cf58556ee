"""The engine driven in-process: concurrent requests, aborts, sampling, against `generate()`."""

from __future__ import annotations

import asyncio

import torch

from epdserve.engine.async_engine import AsyncEngine
from epdserve.engine.base import EngineRequest, SamplingParams
from epdserve.engine.paged import EngineConfig, PagedEngine
from epdserve.engine.sampling import make_generator, sample
from epdserve.engine.scheduler import SchedulerConfig
from epdserve.engine.base import EngineOutput, KVAdmitted
from support.engine_requests import engine_request, load_kv, step_outputs
from support.oracle import hf_greedy, make_image


def test_interleaved_requests_match_generate_and_abort_frees(tiny_llava, tiny_runner):
    cases = {f"r{i}": (f"Question {i} about this", [make_image(i)] * (i % 3), 6 + i) for i in range(6)}
    engine = PagedEngine(tiny_runner, EngineConfig(scheduler=SchedulerConfig(max_num_seqs=4)))
    engine.add_request(engine_request(tiny_llava, tiny_runner, "doomed", "abort me", [], 50))
    for rid, (text, images, n) in cases.items():   # more than max_num_seqs: some wait
        engine.add_request(engine_request(tiny_llava, tiny_runner, rid, text, images, n))
    got: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished():
        for out in step_outputs(engine):
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
        if steps == 3:
            engine.abort("doomed")
    assert not engine.has_unfinished()
    assert len(got["doomed"]) < 50
    for rid, (text, images, n) in cases.items():
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}] * len(images)
                     + [{"type": "text", "text": text}]}]
        assert got[rid] == hf_greedy(tiny_llava, messages, images=images, max_tokens=n), rid


def test_async_engine_streams_and_cancels(tiny_llava, tiny_runner):
    async def main():
        engine = AsyncEngine(PagedEngine(tiny_runner, EngineConfig(scheduler=SchedulerConfig(max_num_seqs=8))))
        engine.start()
        try:
            req = engine_request(tiny_llava, tiny_runner, "a", "hello", [make_image(1)], 5)
            outs = [o async for o in engine.generate(req) if isinstance(o, EngineOutput)]
            assert sum(len(o.new_token_ids) for o in outs) <= 5 and outs[-1].finish_reason
            stream = engine.generate(engine_request(tiny_llava, tiny_runner, "b", "long", [], 500))
            await anext(stream)
            await stream.aclose()                       # the consumer leaves: the engine drops it
            for _ in range(100):
                if not engine.engine.has_unfinished():
                    break
                await asyncio.sleep(0.02)
            assert not engine.engine.has_unfinished() and engine.num_requests == 0
        finally:
            await engine.stop()
    asyncio.run(main())


def test_async_engine_release_frees_held_kv(tiny_llava, tiny_runner):
    async def main():
        engine = AsyncEngine(PagedEngine(tiny_runner, EngineConfig()))
        engine.start()
        try:
            req = engine_request(tiny_llava, tiny_runner, "p", "prefill me", [make_image(2)], 1)
            req.hold_kv = True
            outs = [o async for o in engine.generate(req)]
            assert isinstance(outs[-1], EngineOutput) and outs[-1].held_blocks
            assert engine.engine.stats().held_requests == 1
            engine.release("p")
            await engine.settled()
            stats = engine.engine.stats()
            assert stats.held_requests == 0 and stats.kv_blocks_free == stats.kv_blocks_total
        finally:
            await engine.stop()
        engine.engine.check_invariants()
    asyncio.run(main())


def test_async_engine_prefilled_request_streams_after_kv_loaded(tiny_llava, tiny_runner):
    async def main():
        prefill, decode = (AsyncEngine(PagedEngine(tiny_runner, EngineConfig(block_size=8))) for _ in range(2))
        prefill.start()
        decode.start()
        try:
            req = engine_request(tiny_llava, tiny_runner, "r", "split me", [make_image(3)], 1)
            req.hold_kv = True
            (done,) = [o async for o in prefill.generate(req)]
            follow = engine_request(tiny_llava, tiny_runner, "r", "split me", [make_image(3)], 6)
            follow.prefilled_token = done.new_token_ids[0]
            stream = decode.generate(follow)
            admitted = await anext(stream)
            assert isinstance(admitted, KVAdmitted) and isinstance(done, EngineOutput) and done.held_blocks
            load_kv(decode.engine, admitted.blocks, prefill.engine, done.held_blocks)
            decode.kv_loaded("r")
            prefill.release("r")
            tokens = done.new_token_ids + [t async for o in stream if isinstance(o, EngineOutput)
                                           for t in o.new_token_ids]
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}},
                                                     {"type": "text", "text": "split me"}]}]
            assert tokens == hf_greedy(tiny_llava, messages, images=[make_image(3)], max_tokens=6)
            await prefill.settled()
            for engine in (prefill, decode):
                stats = engine.engine.stats()
                assert stats.held_requests == 0 and stats.kv_blocks_free == stats.kv_blocks_total
        finally:
            await prefill.stop()
            await decode.stop()
        prefill.engine.check_invariants()
        decode.engine.check_invariants()
    asyncio.run(main())


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(100)
    params = SamplingParams(temperature=1.0, top_k=3, seed=11)
    draws = [sample(logits, params, make_generator(params)) for _ in range(5)]
    assert len(set(draws)) == 1                                 # same seed, same token
    allowed = set(torch.topk(logits, 3).indices.tolist())
    gen = make_generator(SamplingParams(temperature=1.0, seed=1))
    assert all(sample(logits, params, gen) in allowed for _ in range(50))
    assert sample(logits, SamplingParams(), None) == int(logits.argmax())
    top_p = SamplingParams(temperature=1.0, top_p=1e-6, seed=3)
    assert sample(logits, top_p, make_generator(top_p)) == int(logits.argmax())


def test_concurrent_requests_progress_together(tiny_llava, tiny_runner):
    """A short request that arrives while a long one runs finishes first."""
    async def main():
        engine = AsyncEngine(PagedEngine(tiny_runner, EngineConfig(scheduler=SchedulerConfig(max_num_seqs=8))))
        engine.start()
        finished: list[str] = []

        async def run(req):
            async for out in engine.generate(req):
                if out.finish_reason:
                    finished.append(req.request_id)

        try:
            long = engine_request(tiny_llava, tiny_runner, "long", "a long answer", [], 300)
            short = engine_request(tiny_llava, tiny_runner, "short", "a short answer", [make_image(2)], 3)
            long = EngineRequest(long.request_id, long.prompt_token_ids,
                                 SamplingParams(max_tokens=300), long.mm_inputs)  # no EOS: runs 300 steps
            task = asyncio.create_task(run(long))
            await asyncio.sleep(0.05)
            await run(short)
            await task
        finally:
            await engine.stop()
        assert finished == ["short", "long"]
    asyncio.run(main())


def test_settled_waits_until_an_abort_is_applied(tiny_llava, tiny_runner):
    """After `settled()`, an aborted request is out of the engine: its inputs may be reused."""
    async def main():
        paged = PagedEngine(tiny_runner, EngineConfig(scheduler=SchedulerConfig(max_num_seqs=8)))
        engine = AsyncEngine(paged)
        engine.start()
        try:
            req = engine_request(tiny_llava, tiny_runner, "r", "a long answer", [make_image(1)], 300)
            req = EngineRequest(req.request_id, req.prompt_token_ids, SamplingParams(max_tokens=300), req.mm_inputs)
            stream = engine.generate(req)
            await anext(stream)
            await stream.aclose()          # queues the abort
            await asyncio.wait_for(engine.settled(), 10)
            assert not paged.has_unfinished()
            assert paged.stats().kv_blocks_free == paged.stats().kv_blocks_total
            await asyncio.wait_for(engine.settled(), 10)   # idle: returns as well
        finally:
            await engine.stop()
        await engine.settled()             # stopped: returns at once
    asyncio.run(main())
