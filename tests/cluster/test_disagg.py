"""E/P/D clusters from `launch/disagg_multimodal_epd.sh` (the matrix's "llava/disagg-epd" cluster:
1 prefill and 2 decode workers): the prompt's KV goes from a prefill worker to a decode worker
over NIXL. Driven by the official `openai` client and checked
token-for-token against `transformers`; then every block, pin and transfer is back, and a
dead or frozen prefill or decode worker ends its requests with an error, never a hang."""

from __future__ import annotations

import os
import signal
import threading
import time

import openai
import pytest

from support.chat import (
    MAX_TOKENS,
    assert_matches_oracle,
    assert_nothing_held,
    chat_all_at_once,
    chat_messages,
    run_chat,
)
from support.cluster import assert_idle, launch
from support.oracle import hf_greedy, make_image

pytestmark = pytest.mark.topology("llava/disagg-epd")

# Small blocks: a prompt spans many, so READs merge runs and the prefix cache hits partly.
FLAGS = ("--block-size", "4", "--num-kv-blocks", "512")


def test_completions_and_requests_that_end_at_prefill(cluster, model_dir):
    prompt = "The quick brown fox"
    client = cluster.client()
    r = client.completions.create(model=cluster.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == hf_greedy(model_dir, prompt=prompt, max_tokens=MAX_TOKENS)
    one = client.completions.create(model=cluster.model, prompt=prompt, max_tokens=1, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert one.choices[0].model_extra["token_ids"] == r.choices[0].model_extra["token_ids"][:1]
    assert one.choices[0].finish_reason == "length"
    # A stop string the first decoded tokens hit: the processor cuts the stream, both workers drop it.
    cut = client.completions.create(model=cluster.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                    stop=[r.choices[0].text[3:6]])
    assert cut.choices[0].finish_reason == "stop" and len(cut.choices[0].text) <= 3
    # n > 1 shares one prompt's blocks in one engine: a decode worker prefills it itself.
    n2 = client.completions.create(model=cluster.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, n=2)
    assert [c.text for c in n2.choices] == [r.choices[0].text] * 2


def test_repeated_prompt_reads_only_what_the_decode_cache_lacks(cluster, model_dir):
    messages = chat_messages([make_image(77)], "Describe it once more, please.")
    client = cluster.client()

    def twice() -> tuple[int, int]:
        """Run `messages` on each decode worker (round-robin); (blocks read, blocks cached)."""
        before = cluster.worker_stats()
        for _ in range(2):
            text, ids, _ = run_chat(client, cluster.model, messages, stream=False)
            assert_matches_oracle(model_dir, messages, text, ids)
        after = cluster.worker_stats()
        decoders = [k for k in after if k.startswith("decode/")]
        assert len(decoders) == 2
        return tuple(sum(after[k][c] - before[k][c] for k in decoders) for c in ("kv_blocks_read", "kv_blocks_cached"))

    first_read, _ = twice()
    read, cached = twice()
    assert first_read > 2 and cached > 0
    assert read <= 2   # per worker, the last block at most: the rest is in its prefix cache


def test_32_concurrent_requests_leave_nothing_behind(cluster, model_dir):
    """Through 1 prefill and 2 decode workers: each answer is the oracle's, both decode workers
    took load, and afterwards every block is free and no transfer, pin or hold is left."""
    cases = [chat_messages([make_image(300 + i % 12)] * (i % 3), f"Request number {i}.") for i in range(32)]

    assert chat_all_at_once(cluster, cases) == [hf_greedy(model_dir, m, max_tokens=MAX_TOKENS) for m in cases]
    stats = cluster.worker_stats()
    assert sum(k.startswith("prefill/") for k in stats) == 1
    assert all(s["kv_blocks_read"] > 0 for k, s in stats.items() if k.startswith("decode/"))
    assert_nothing_held(stats)
    for name, s in stats.items():   # the KV pool registered once, at start-up, beside the staging region
        if name.startswith(("prefill/", "decode/")):
            assert s["nixl_registrations"] == 2, name


def test_idle_workers_use_almost_no_cpu(cluster):
    """The prefill and decode workers' NIXL agents, with their KV pools registered, sleep too."""
    assert_idle(cluster)


def _frozen(pid: int, cases_fn) -> tuple[list, float]:
    """Run `cases_fn()` while `pid` is stopped, then kill it; (outcomes, seconds taken)."""
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        return cases_fn(), time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGKILL)


def test_dead_prefill_and_decode_workers_end_requests(infra, tiny_llava, tmp_path_factory):
    """2 prefill + 2 decode workers. A frozen, then killed, prefill worker fails only its own
    requests, in seconds; so does a frozen decode worker, and the prefill worker frees the KV
    it held for it; a decode worker killed mid-stream ends the client's stream with an error."""
    c = launch("disagg_multimodal_epd.sh", infra, tmp_path_factory.mktemp("logs"), "--prefill-workers", "2",
               "--decode-workers", "2", "--lease-ttl", "2", "--heartbeat-interval", "1", *FLAGS,
               model_dir=tiny_llava, served_name="kills")
    try:
        c.wait_for_workers(prefill=2, decode=2)
        cases = [chat_messages([make_image(700 + i)], f"Load {i}.") for i in range(4)]
        expected = [hf_greedy(tiny_llava, m, max_tokens=MAX_TOKENS) for m in cases]

        def check(outcomes, elapsed):
            assert elapsed < 20
            assert all(isinstance(o, openai.APIError) or o == e for o, e in zip(outcomes, expected, strict=True))
            return sum(isinstance(o, openai.APIError) for o in outcomes)

        # Round-robin sends two of the four to the frozen prefill worker.
        assert check(*_frozen(c.pids("--is-prefill-worker")[0], lambda: chat_all_at_once(c, cases))) == 2
        time.sleep(3)   # its lease expires: routing drops it
        assert chat_all_at_once(c, cases) == expected

        assert check(*_frozen(c.pids("--multimodal-decode-worker")[0], lambda: chat_all_at_once(c, cases))) == 2
        time.sleep(3)
        assert_nothing_held(c.worker_stats())   # the KV held for the frozen decode worker is free

        # Mid-stream: a long generation on the last decode worker, killed once tokens flow.
        (decode,) = c.pids("--multimodal-decode-worker")
        stream = c.client().chat.completions.create(
            model=c.model, messages=cases[0], max_tokens=1500, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        started = None
        with pytest.raises(openai.APIError):
            for i, _ in enumerate(stream):
                if i == 5:
                    started = time.monotonic()
                    threading.Thread(target=os.kill, args=(decode, signal.SIGKILL)).start()
        assert started is not None and time.monotonic() - started < 20
        assert_nothing_held({k: s for k, s in c.worker_stats().items() if not k.startswith("decode/")})
    finally:
        c.stop()
