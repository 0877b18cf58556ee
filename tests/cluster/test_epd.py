"""EPD cluster from `launch/agg_multimodal.sh` serving the tiny LLaVA (the matrix's "llava/agg"
cluster, shared with test_topologies.py), driven by the official `openai` client.

Every generation is checked token-for-token against `transformers` greedy `generate()`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from support.chat import MAX_TOKENS, assert_matches_oracle, chat_messages, run_chat
from support.cluster import free_port, launch
from support.oracle import hf_greedy, make_image

pytestmark = pytest.mark.topology("llava/agg")


def test_completions_match_transformers(cluster, model_dir):
    prompt = "The quick brown fox"
    r = cluster.client().completions.create(model=cluster.model, prompt=prompt, max_tokens=MAX_TOKENS,
                                            temperature=0, extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == hf_greedy(model_dir, prompt=prompt, max_tokens=MAX_TOKENS)
    streamed = "".join(c.choices[0].text for c in cluster.client().completions.create(
        model=cluster.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_photo_sized_image(cluster, model_dir):
    """An ~8 MB image (a ~11 MB data URL) is served like a small one, streamed or not."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1650, 1650, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    assert len(png) > 8_000_000
    messages = chat_messages([png])
    client = cluster.client()
    unary = run_chat(client, cluster.model, messages, stream=False)
    streamed = run_chat(client, cluster.model, messages, stream=True)
    assert streamed[:2] == unary[:2]
    assert_matches_oracle(model_dir, messages, unary[0], unary[1])


def test_concurrent_requests(cluster, model_dir):
    cases = [chat_messages([make_image(100 + i)] * (i % 3), f"Request number {i}.") for i in range(8)]

    async def one(client, messages):
        r = await client.chat.completions.create(model=cluster.model, messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, extra_body={"return_token_ids": True})
        return r.choices[0].model_extra["token_ids"]

    async def all_at_once():
        async with cluster.async_client() as client:
            return await asyncio.gather(*(one(client, m) for m in cases))

    results = asyncio.run(all_at_once())
    for messages, ids in zip(cases, results):
        assert ids == hf_greedy(model_dir, messages, max_tokens=MAX_TOKENS)


def test_sampling_parameters(cluster):
    client = cluster.client()
    messages = chat_messages([make_image(3)])
    kw = dict(model=cluster.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.9,
              extra_body={"top_k": 20})
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert a == b
    r = client.chat.completions.create(model=cluster.model, messages=messages, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3


def test_stop_string(cluster, model_dir):
    messages = chat_messages([make_image(5)])
    full, _, _ = run_chat(cluster.client(), cluster.model, messages, stream=False, max_tokens=16)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip()
    for stream in (False, True):
        kw = dict(model=cluster.model, messages=messages, max_tokens=16, temperature=0, stop=[stop])
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in cluster.client().chat.completions.create(
                **kw, stream=True) if c.choices)
        else:
            r = cluster.client().chat.completions.create(**kw)
            text = r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop"
        assert text == full[: full.index(stop)]


def _post(cluster, body, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(cluster.base_url + "/v1/chat/completions", content=content,
                      headers={"Content-Type": "application/json"}, timeout=60)


def test_bad_input_gets_openai_errors(cluster, model_dir):
    good = {"model": cluster.model, "messages": chat_messages([make_image(1)]), "max_tokens": 4}
    closed = free_port()
    garbage = "data:image/png;base64," + base64.b64encode(b"definitely not an image" * 10).decode()
    cases = {
        "malformed json": (400, None, b'{"model": "x", "messages": ['),
        "unknown model": (404, good | {"model": "no-such-model"}, None),
        "missing messages": (400, {"model": cluster.model}, None),
        "undecodable image": (400, good | {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": garbage}}]}]}, None),
        "bad base64": (400, good | {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}}]}]}, None),
        "unreachable url": (400, good | {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{closed}/cat.png"}}]}]}, None),
        "too many images": (400, good | {"messages": chat_messages([make_image(1)] * 5)}, None),
        "prompt too long": (400, good | {"max_tokens": 100_000}, None),
    }
    for name, (status, body, raw) in cases.items():
        resp = _post(cluster, body, raw)
        assert resp.status_code == status, (name, resp.text)
        err = resp.json()["error"]
        assert err["message"] and err["code"] == status, name
    assert f"127.0.0.1:{closed}" in _post(cluster, cases["unreachable url"][1]).json()["error"]["message"]
    # The same errors reach the official client as typed exceptions, and serving goes on.
    with pytest.raises(openai.NotFoundError):
        cluster.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    text, ids, _ = run_chat(cluster.client(), cluster.model, good["messages"], stream=False)
    assert_matches_oracle(model_dir, good["messages"], text, ids)


def test_other_sizes_and_published_layout(infra, tmp_path_factory):
    """A LLaVA with other sizes, saved in the llava-hf key layout, served side by side."""
    from epdserve.tools.tiny_model import build_tiny_model
    model_dir = build_tiny_model("llava", tmp_path_factory.mktemp("llava-odd") / "m", hidden_size=96,
                                 num_heads=3, num_kv_heads=1, intermediate_size=160, vocab_size=1536,
                                 image_size=48, patch_size=12, vision_hidden_size=48,
                                 weight_layout="llava-hf", seed=3)
    c = launch("agg_multimodal.sh", infra, tmp_path_factory.mktemp("logs"), model_dir=model_dir,
               served_name="odd-llava")
    try:
        for images in ([], [make_image(7)], [make_image(8), make_image(9)]):
            messages = chat_messages(images)
            for stream in (False, True):
                text, ids, _ = run_chat(c.client(), c.model, messages, stream)
                assert_matches_oracle(model_dir, messages, text, ids)
    finally:
        c.stop()


def test_more_bad_input_gets_openai_errors(cluster):
    url = cluster.base_url
    cases = [
        ("/v1/completions", {"model": cluster.model, "prompt": [1, -5, 99_999_999]}, 400),
        ("/v1/completions", {"model": cluster.model, "prompt": "<image> hi"}, 400),
        ("/v1/chat/completions", {"model": cluster.model, "messages": [{"role": "user", "content": "hi"}],
                                  "logit_bias": {"5": 10}}, 400),
        ("/v1/chat/completions", {"model": cluster.model, "messages": [{"role": "user", "content": "hi"}],
                                  "n": 99}, 400),
        ("/v1/chat/completions", {"model": cluster.model, "messages": [{"role": "user", "content": "hi"}],
                                  "stop_token_ids": [-1]}, 400),
        ("/v1/chat/completions", [1, 2, 3], 400),
        ("/v1/no-such-route", {}, 404),
    ]
    for path, body, status in cases:
        resp = httpx.post(url + path, json=body, timeout=60)
        assert resp.status_code == status, (path, body, resp.text)
        assert resp.json()["error"]["message"], (path, body)
    assert httpx.get(url + "/v1/chat/completions", timeout=10).status_code == 405
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert "epdserve_http_requests" in httpx.get(url + "/metrics", timeout=10).text


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """A local HTTP server with two PNGs and a redirect, on 127.0.0.1."""
    import http.server
    import threading

    root = tmp_path_factory.mktemp("www")
    (root / "a.png").write_bytes(make_image(21))
    (root / "b.png").write_bytes(make_image(22))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def do_GET(self):
            if self.path == "/moved.png":
                self.send_response(302)
                self.send_header("Location", "/b.png")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_image_urls(cluster, model_dir, image_server):
    urls = [f"{image_server}/a.png", f"{image_server}/moved.png"]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]
                 + [{"type": "text", "text": "Compare them."}]}]
    text, ids, _ = run_chat(cluster.client(), cluster.model, messages, stream=False)
    images = [make_image(21), make_image(22)]
    assert ids == hf_greedy(model_dir, messages, images=images, max_tokens=MAX_TOKENS)
    missing = _post(cluster, {"model": cluster.model, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"{image_server}/missing.png"}}]}]})
    assert missing.status_code == 400 and "HTTP 404" in missing.json()["error"]["message"]


def test_logprobs_and_penalties(cluster, model_dir):
    messages = chat_messages([make_image(4)])
    client = cluster.client()
    r = client.chat.completions.create(model=cluster.model, messages=messages, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"return_token_ids": True})
    content = r.choices[0].logprobs.content
    ids = r.choices[0].model_extra["token_ids"]
    assert len(content) == len(ids) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)   # greedy: the best token
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
        model=cluster.model, messages=messages, max_tokens=5, temperature=0, logprobs=True, stream=True)
        if c.choices and c.choices[0].logprobs]
    assert [e.logprob for lp in streamed for e in lp.content] == pytest.approx([e.logprob for e in content])
    comp = client.completions.create(model=cluster.model, prompt="Once upon", max_tokens=4, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4 and lp.text_offset[0] == 0
    # A strong frequency penalty changes a greedy continuation that repeats itself.
    plain = hf_greedy(model_dir, messages, max_tokens=16)
    assert len(set(plain)) < len(plain)
    penalized = client.chat.completions.create(model=cluster.model, messages=messages, max_tokens=16, temperature=0,
                                               frequency_penalty=2.0, extra_body={"return_token_ids": True})
    assert penalized.choices[0].model_extra["token_ids"] != plain


def test_n_choices_share_the_prompt(cluster, model_dir):
    messages = chat_messages([make_image(6)])
    client = cluster.client()
    greedy = hf_greedy(model_dir, messages, max_tokens=MAX_TOKENS)
    r = client.chat.completions.create(model=cluster.model, messages=messages, max_tokens=MAX_TOKENS, n=3,
                                       temperature=0, extra_body={"return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.model_extra["token_ids"] == greedy for c in r.choices)
    assert r.usage.completion_tokens == 3 * len(greedy)
    sampled = client.chat.completions.create(model=cluster.model, messages=messages, max_tokens=MAX_TOKENS, n=4,
                                             temperature=1.0, seed=1, stream=True)
    texts: dict[int, str] = {}
    finishes = {}
    for chunk in sampled:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert sorted(finishes) == [0, 1, 2, 3] and len(set(texts.values())) > 1


def test_tiny_kv_pool_and_token_budget_through_the_cluster(infra, tiny_llava, tmp_path_factory):
    """Engine flags reach the worker: a pool of a few requests' blocks makes requests queue (or
    be preempted), a small budget chunks prefill, and concurrent requests still equal the oracle."""
    c = launch("agg_multimodal.sh", infra, tmp_path_factory.mktemp("logs"), "--num-kv-blocks", "24",
               "--block-size", "8", "--max-num-batched-tokens", "32", "--max-num-seqs", "6",
               model_dir=tiny_llava, served_name="squeezed")
    cases = [chat_messages([make_image(300 + i)] * (i % 2), f"Squeezed request {i}.") for i in range(8)]

    async def one(client, messages):
        r = await client.chat.completions.create(model="squeezed", messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, extra_body={"return_token_ids": True})
        return r.choices[0].model_extra["token_ids"]

    async def all_at_once():
        async with c.async_client() as client:
            return await asyncio.gather(*(one(client, m) for m in cases))

    try:
        for messages, ids in zip(cases, asyncio.run(all_at_once())):
            assert ids == hf_greedy(tiny_llava, messages, max_tokens=MAX_TOKENS)
    finally:
        c.stop()
