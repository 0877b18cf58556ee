"""The paged engine against `transformers` `generate()` run alone, request by request:
mixed batches, shared prefixes, aborts, chunked prefill, preemption, prefix cache, no leaks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from epdserve.engine.base import KVAdmitted
from epdserve.engine.paged import EngineConfig, PagedEngine
from epdserve.engine.scheduler import SchedulerConfig
from support.engine import assert_no_leak, drive
from support.engine_requests import engine_request, load_kv, step_checked, step_outputs
from support.oracle import hf_greedy, make_image

SHARED = "Describe the picture in great detail, please, with every colour you can see"


def oracle(tiny_llava, text: str, images: list[bytes], max_tokens: int) -> list[int]:
    parts = [{"type": "image_url", "image_url": {"url": ""}}] * len(images)
    messages = [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]
    return hf_greedy(tiny_llava, messages, images=images, max_tokens=max_tokens)


def mixed_cases() -> dict[str, tuple[str, list[bytes], int]]:
    cases = {}
    for i in range(18):
        images = [make_image(200 + (i + k) % 5) for k in range(i % 4)]          # 0-3 images, some repeated
        text = (SHARED + f" number {i}") if i % 3 == 0 else "word " * (1 + 7 * (i % 5)) + f"q{i}"
        cases[f"r{i:02d}"] = (text, images, 4 + (i * 5) % 20)
    return cases


@pytest.mark.parametrize("config", [
    EngineConfig(block_size=16),                                                          # roomy
    EngineConfig(block_size=4, scheduler=SchedulerConfig(max_num_batched_tokens=24)),     # chunked prefill
    EngineConfig(block_size=8, num_kv_blocks=40,                                          # preemption
                 scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8)),
], ids=["roomy", "chunked", "tiny-pool"])
def test_mixed_batch_matches_generate_alone(tiny_llava, tiny_runner, config):
    engine = PagedEngine(tiny_runner, config)
    cases = mixed_cases()
    for rid, (text, images, n) in cases.items():
        engine.add_request(engine_request(tiny_llava, tiny_runner, rid, text, images, n))
    got, finish = drive(engine, abort_after={"r05": 2, "r11": 1})
    for rid, (text, images, n) in cases.items():
        expected = oracle(tiny_llava, text, images, n)
        if finish[rid] == "abort":
            assert got.get(rid, []) == expected[: len(got.get(rid, []))], rid
        else:
            assert got[rid] == expected, rid
    assert_no_leak(engine)


def test_prefix_cache_hits_only_for_the_same_media(tiny_llava, tiny_runner):
    engine = PagedEngine(tiny_runner, EngineConfig(block_size=4))
    a, b = make_image(31), make_image(32)
    first = engine_request(tiny_llava, tiny_runner, "first", SHARED, [a], 6)
    engine.add_request(first)
    drive(engine)
    hits = engine.stats().prefix_cache_hits

    engine.add_request(engine_request(tiny_llava, tiny_runner, "same", SHARED, [a], 6))
    got, _ = drive(engine)
    s = engine.stats()
    assert s.prefix_cache_hits - hits >= len(first.prompt_token_ids) // 4 - 1   # nearly every full block
    assert got["same"] == oracle(tiny_llava, SHARED, [a], 6)

    hits = s.prefix_cache_hits
    engine.add_request(engine_request(tiny_llava, tiny_runner, "other", SHARED, [b], 6))
    got, _ = drive(engine)
    image_start = first.mm_inputs[0].offset
    # Only blocks wholly before the image may hit; none from the image on.
    assert engine.stats().prefix_cache_hits - hits <= image_start // 4
    assert got["other"] == oracle(tiny_llava, SHARED, [b], 6)
    assert_no_leak(engine)
    stats = engine.stats()
    assert 0 < stats.prefix_cache_hit_rate < 1 and stats.generated_tokens == 3 * 6
    assert stats.tokens_computed < 3 * (len(first.prompt_token_ids) + 6)   # "same" mostly came from cache


def test_request_that_can_never_fit_fails_alone(tiny_llava, tiny_runner):
    engine = PagedEngine(tiny_runner, EngineConfig(block_size=4, num_kv_blocks=8))
    engine.add_request(engine_request(tiny_llava, tiny_runner, "huge", "word " * 100, [], 4))
    engine.add_request(engine_request(tiny_llava, tiny_runner, "small", "hi", [], 3))
    outputs = []
    while engine.has_unfinished():
        outputs += step_outputs(engine)
    errors = {o.request_id for o in outputs if o.error}
    assert errors == {"huge"}
    assert sum(len(o.new_token_ids) for o in outputs if o.request_id == "small") == 3
    assert_no_leak(engine)


def test_n_choices_reuse_the_prompt_blocks(tiny_llava, tiny_runner):
    from dataclasses import replace

    engine = PagedEngine(tiny_runner, EngineConfig(block_size=4))
    req = engine_request(tiny_llava, tiny_runner, "multi", SHARED, [make_image(41)], 7)
    req = replace(req, sampling=replace(req.sampling, n=3))
    engine.add_request(req)
    by_choice: dict[int, list[int]] = {}
    finishes = 0
    while engine.has_unfinished():
        for out in step_outputs(engine):
            assert out.request_id == "multi" and out.error is None
            by_choice.setdefault(out.index, []).extend(out.new_token_ids)
            finishes += out.finish_reason is not None
    expected = oracle(tiny_llava, SHARED, [make_image(41)], 7)
    assert by_choice == {0: expected, 1: expected, 2: expected} and finishes == 3
    full_blocks = (len(req.prompt_token_ids) - 1) // 4
    assert engine.stats().prefix_cache_hits == 2 * full_blocks     # choices 1 and 2 reuse choice 0's blocks
    assert_no_leak(engine)
    assert engine.choices.is_idle()


def test_n_choices_with_the_largest_seed(tiny_llava, tiny_runner):
    """Choice seeds wrap around 2**64 (a client's seed -1 arrives as 2**64 - 1)."""
    from dataclasses import replace

    engine = PagedEngine(tiny_runner, EngineConfig())
    req = engine_request(tiny_llava, tiny_runner, "wrap", "hello", [], 4)
    engine.add_request(replace(req, sampling=replace(req.sampling, n=3, temperature=1.0, seed=2**64 - 1)))
    outputs = []
    while engine.has_unfinished():
        outputs += step_outputs(engine)
    assert all(o.error is None for o in outputs) and sum(o.finish_reason is not None for o in outputs) == 3
    assert_no_leak(engine)


def test_prompt_step_time_counts_steps_with_a_prompt_chunk_only(tiny_llava, tiny_runner):
    engine = PagedEngine(tiny_runner, EngineConfig(block_size=16))
    engine.add_request(engine_request(tiny_llava, tiny_runner, "r", "word " * 20, [make_image(7)], 5))
    assert engine.stats().prompt_step_us == 0
    step_checked(engine)   # the whole prompt, and the first token
    after_prompt = engine.stats().prompt_step_us
    assert after_prompt > 0
    drive(engine)   # decode steps only
    assert engine.stats().prompt_step_us == after_prompt


def test_hold_kv_keeps_the_prompt_blocks_until_released(tiny_llava, tiny_runner):
    """A prefill worker's request: its prompt's KV blocks outlive its finish, untouched by
    later requests, and `release` frees them."""
    engine = PagedEngine(tiny_runner, EngineConfig(block_size=4, num_kv_blocks=64))
    held = engine_request(tiny_llava, tiny_runner, "held", "word " * 9, [make_image(8)], 1)
    held.hold_kv = True
    engine.add_request(held)
    outs = [o for _ in range(3) for o in step_outputs(engine)]
    assert [o.finish_reason for o in outs] == ["length"]
    blocks = outs[0].held_blocks
    assert len(blocks) == -(-len(held.prompt_token_ids) // 4)
    kv = engine.runner.kv
    snapshot = [(k[blocks].clone(), v[blocks].clone()) for k, v in zip(kv.key, kv.value)]
    assert engine.stats().held_requests == 1 and not engine.has_unfinished()

    engine.add_request(engine_request(tiny_llava, tiny_runner, "other", "other words " * 5, [], 8))
    got, _ = drive(engine)
    assert got["other"] == oracle(tiny_llava, "other words " * 5, [], 8)
    for (k, v), (k0, v0) in zip(zip(kv.key, kv.value), snapshot):
        assert torch.equal(k[blocks], k0) and torch.equal(v[blocks], v0)

    engine.release("held")
    engine.check_invariants()
    assert engine.stats().held_requests == 0
    assert_no_leak(engine)


def test_release_frees_held_blocks_only_and_abort_frees_them_too(tiny_llava, tiny_runner):
    """`release` is not an abort: a live request keeps running. `abort` of a finished
    `hold_kv` request frees its held blocks as well (a caller that gave up leaks nothing)."""
    engine = PagedEngine(tiny_runner, EngineConfig(block_size=4))
    live = engine_request(tiny_llava, tiny_runner, "live", "word " * 5, [], 4)
    engine.add_request(live)
    first = step_outputs(engine)
    engine.release("live")
    engine.release("unknown")
    got, _ = drive(engine)
    tokens = [t for o in first for t in o.new_token_ids] + got.get("live", [])
    assert tokens == oracle(tiny_llava, "word " * 5, [], 4)

    held = engine_request(tiny_llava, tiny_runner, "held", "word " * 5, [], 1)
    held.hold_kv = True
    engine.add_request(held)
    (out,) = step_outputs(engine)
    assert out.held_blocks and engine.stats().held_requests == 1
    engine.abort("held")
    engine.check_invariants()
    assert engine.stats().held_requests == 0
    engine.release("held")   # already freed: ignored
    assert_no_leak(engine)


def test_check_invariants_catches_a_lost_hold(tiny_llava, tiny_runner):
    engine = PagedEngine(tiny_runner, EngineConfig(block_size=4))
    held = engine_request(tiny_llava, tiny_runner, "held", "word " * 5, [], 1)
    held.hold_kv = True
    engine.add_request(held)
    step_outputs(engine)
    engine.held._held.clear()   # the engine forgets the hold: its blocks stay referenced by nobody
    with pytest.raises(AssertionError, match="refcount 1, but 0 sequences hold it"):
        engine.check_invariants()


def test_hold_kv_rejects_several_choices(tiny_llava, tiny_runner):
    engine = PagedEngine(tiny_runner, EngineConfig(block_size=16))
    req = engine_request(tiny_llava, tiny_runner, "n2", "word", [], 1)
    req.hold_kv, req.sampling = True, replace(req.sampling, n=2)
    engine.add_request(req)
    (out,) = step_outputs(engine)
    assert out.error and "n=1" in out.error
    assert_no_leak(engine)


def test_prefilled_request_decodes_from_kv_loaded_into_its_blocks(tiny_llava, tiny_runner):
    """Prefill on one engine (hold_kv), decode on another from the copied KV blocks: the
    output is generate()'s; the second request with the same prompt loads only what the
    decode engine's prefix cache lacks."""
    text, images, n = "Tell me about it " * 3, [make_image(21)], 9
    prefill = PagedEngine(tiny_runner, EngineConfig(block_size=4))
    decode = PagedEngine(tiny_runner, EngineConfig(block_size=4))
    want = oracle(tiny_llava, text, images, n)
    for rid in ("first", "again"):
        req = engine_request(tiny_llava, tiny_runner, rid, text, images, 1)
        req.hold_kv = True
        prefill.add_request(req)
        (done,) = step_outputs(prefill)
        first = done.new_token_ids[0]

        follow = engine_request(tiny_llava, tiny_runner, rid, text, images, n)
        follow.prefilled_token = first
        follow.mm_inputs = [replace(m, features=None) for m in follow.mm_inputs]   # the decode side has no media
        decode.add_request(follow)
        (admitted,) = step_checked(decode)
        assert isinstance(admitted, KVAdmitted) and admitted.request_id == rid
        assert done.held_blocks is not None and len(admitted.blocks) == len(done.held_blocks)
        cached = admitted.cached_blocks
        assert cached == (0 if rid == "first" else len(req.prompt_token_ids) // 4)
        assert not decode.has_unfinished()   # loading waits for kv_loaded, not for steps
        load_kv(decode, admitted.blocks[cached:], prefill, done.held_blocks[cached:])
        decode.kv_loaded(rid)
        decode.check_invariants()
        prefill.release(rid)   # the decode side confirmed: the prefill side frees its blocks
        prefill.check_invariants()
        got, finish = drive(decode)
        assert [first] + got[rid] == want and finish[rid] == "length", rid
    assert_no_leak(prefill)
    assert_no_leak(decode)


def test_prefilled_request_aborted_while_loading_frees_its_blocks(tiny_llava, tiny_runner):
    decode = PagedEngine(tiny_runner, EngineConfig(block_size=4))
    req = engine_request(tiny_llava, tiny_runner, "gone", "word " * 6, [], 5)
    req.prefilled_token = 7
    decode.add_request(req)
    (admitted,) = step_checked(decode)
    assert isinstance(admitted, KVAdmitted) and admitted.blocks
    decode.abort("gone")
    decode.check_invariants()
    decode.kv_loaded("gone")   # a READ finishing after the abort is ignored
    assert not decode.has_unfinished()
    assert_no_leak(decode)
