"""Instances live on etcd leases: a killed worker vanishes within the TTL, a stopped one
deregisters at once and finishes what it was doing."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from support.cluster import launch, pid_of


@pytest.fixture
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def model_dir(tiny_llava):
    return tiny_llava


def wait_until_unlisted(cluster, name: str, limit: float) -> float:
    start = time.monotonic()
    while name in cluster.models():
        assert time.monotonic() - start < limit, f"{name} still listed after {limit} s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_killed_worker_leaves_models_within_lease_ttl(infra, model_dir, logs):
    ttl = 2
    c = launch("agg_multimodal.sh", infra, logs, "--lease-ttl", str(ttl), model_dir=model_dir, served_name="mortal")
    try:
        os.kill(pid_of(c.tag, "--multimodal-worker"), signal.SIGKILL)
        wait_until_unlisted(c, "mortal", ttl + 2)
        resp = httpx.post(c.base_url + "/v1/chat/completions", timeout=30,
                          json={"model": "mortal", "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 404
    finally:
        c.stop()


def test_sigterm_deregisters_at_once_and_drains(infra, model_dir, logs):
    c = launch("agg_multimodal.sh", infra, logs, "--lease-ttl", "60", model_dir=model_dir, served_name="retiring")
    try:
        stream = c.client().chat.completions.create(
            model="retiring", messages=[{"role": "user", "content": "Tell me everything."}], max_tokens=400,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)
        worker = pid_of(c.tag, "--multimodal-worker")
        os.kill(worker, signal.SIGTERM)
        unlisted = []
        watcher = threading.Thread(target=lambda: unlisted.append(wait_until_unlisted(c, "retiring", 5)))
        watcher.start()
        rest = list(chunks)
        watcher.join()
        assert unlisted and unlisted[0] < 5          # far below the 60 s lease
        assert rest[-1].usage.completion_tokens == 400   # the in-flight request finished
        for _ in range(100):
            if not os.path.exists(f"/proc/{worker}"):
                break
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{worker}")
    finally:
        c.stop()
