"""E/PD clusters: `agg_multimodal_epd.sh` (embeddings over NIXL) and
`agg_multimodal_ec_connector.sh` (embeddings through the cache on disk) serving the tiny LLaVA
(the matrix's "llava/epd-nixl" and "llava/ec" clusters), driven by the official `openai` client
and checked token-for-token against `transformers`.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

from support.chat import MAX_TOKENS, assert_matches_oracle, chat_all_at_once, chat_messages, run_chat
from support.cluster import assert_idle, launch
from support.oracle import hf_greedy, make_image
from support.topologies import CACHE_BYTES

pytestmark = pytest.mark.topology("llava/epd-nixl", "llava/ec")


def test_32_concurrent_requests_leave_nothing_behind(cluster, model_dir):
    """Distinct and repeated images, over both encoders; then every pin, transfer, staging span,
    mailbox entry and KV block is back, and each agent registered its memory exactly once."""
    cases = [chat_messages([make_image(200 + i % 12)] * (1 + i % 2), f"Request number {i}.") for i in range(32)]

    assert chat_all_at_once(cluster, cases) == [hf_greedy(model_dir, m, max_tokens=MAX_TOKENS) for m in cases]
    stats = cluster.worker_stats()
    encoders = {k: v for k, v in stats.items() if k.startswith("encoder/")}
    backends = {k: v for k, v in stats.items() if k.startswith("backend/")}
    assert backends and encoders
    for name, s in backends.items():
        assert s["kv_blocks_free"] == s["kv_blocks_total"], name
        assert s["running"] == s["waiting"] == 0, name
        assert (s["nixl_registrations"], s["nixl_live_transfers"], s["region_allocations"]) == (1, 0, 0), name
        assert s["mailbox_unclaimed"] == 0, name   # every posted EncodeResult met its request
    for name, s in encoders.items():
        assert s.get("cache_pinned", 0) == 0 and s.get("nixl_expected_notifs", 0) == 0, name
        assert s.get("nixl_registrations", 1) == 1 and s.get("nixl_live_transfers", 0) == 0, name
    # Repeated images are encoded once per encoder at most (cache hits, or joining an encode in
    # flight), and with two encoders both took load.
    occurrences = sum(len(m[0]["content"]) - 1 for m in cases)
    assert sum(s["encoded_items"] for s in encoders.values()) < occurrences
    assert all(s["encoder_calls"] > 0 and s["encode_us"] > 0 for s in encoders.values())


def test_idle_workers_use_almost_no_cpu(cluster):
    """NIXL agents run without their busy-polling progress thread."""
    assert_idle(cluster)


def test_encoder_cache_evicts_and_stays_correct(cluster, model_dir):
    """More distinct images than the NIXL cache holds: old entries are evicted, and an evicted
    image is encoded again correctly."""
    client = cluster.client()
    first = chat_messages([make_image(5000)])
    run_chat(client, cluster.model, first, stream=False, max_tokens=2)
    for i in range(0, 600, 4):   # 600 images of 4 KiB each, over two encoders: each gets > CACHE_BYTES
        messages = chat_messages([make_image(6000 + i + j, (32, 32)) for j in range(4)])
        run_chat(client, cluster.model, messages, stream=False, max_tokens=1)
    text, ids, _ = run_chat(client, cluster.model, first, stream=False)
    assert_matches_oracle(model_dir, first, text, ids)
    nixl = [s for k, s in cluster.worker_stats().items() if k.startswith("encoder/") and "cache_evictions" in s]
    assert all(s["cache_evictions"] > 0 and s["region_allocated_bytes"] <= CACHE_BYTES for s in nixl)


def test_killed_encoder_fails_over(infra, tiny_llava, tmp_path_factory):
    """One of two encode workers hangs and dies under load: every in-flight request ends (an
    answer or an error) within a deadline, and new requests are served by the other encoder."""
    model_dir = tiny_llava
    c = launch("agg_multimodal_epd.sh", infra, tmp_path_factory.mktemp("logs"), "--encode-workers", "2",
               "--heartbeat-interval", "1", model_dir=model_dir, served_name="failover")
    try:
        encoders = c.pids("--multimodal-encode-worker")
        assert len(encoders) == 2
        cases = [chat_messages([make_image(900 + i)], f"Load {i}.") for i in range(48)]

        # Freeze the encoder as the load starts (requests to it are then stuck in flight), kill it
        # a moment later: its requests must end, retried on the other encoder or failed.
        freeze = threading.Timer(0.05, os.kill, (encoders[0], signal.SIGSTOP))
        kill = threading.Timer(1.5, os.kill, (encoders[0], signal.SIGKILL))
        freeze.start()
        kill.start()
        started = time.monotonic()
        outcomes = chat_all_at_once(c, cases)
        elapsed = time.monotonic() - started
        kill.join()
        assert elapsed < 30
        for messages, result in zip(cases, outcomes):
            if not isinstance(result, Exception):
                assert result == hf_greedy(model_dir, messages, max_tokens=MAX_TOKENS)
        client = c.client()
        for i in range(4):   # new requests find the surviving encoder at once, dead one listed or not
            messages = chat_messages([make_image(950 + i)])
            t = time.monotonic()
            text, ids, _ = run_chat(client, c.model, messages, stream=False)
            assert time.monotonic() - t < 10
            assert_matches_oracle(model_dir, messages, text, ids)
    finally:
        c.stop()


def test_photo_sized_image_goes_to_the_encoder_once(cluster, model_dir):
    """An ~8 MB PNG crosses NATS once, in chunks, to the encoder; the PD worker gets embeddings."""
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1650, 1650, 3), dtype=np.uint8)).save(buf, format="PNG")
    messages = chat_messages([buf.getvalue()])
    text, ids, _ = run_chat(cluster.client(), cluster.model, messages, stream=True)
    assert_matches_oracle(model_dir, messages, text, ids)
