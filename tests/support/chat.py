"""Chat requests through the official `openai` client, checked against the HF oracle."""

from __future__ import annotations

import asyncio

import openai

from support.oracle import data_url, hf_greedy, hf_text

MAX_TOKENS = 12


def chat_messages(images: list[bytes], text: str = "What is in this image?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(png)}} for png in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def run_chat(client: openai.OpenAI, model: str, messages: list[dict], stream: bool,
             max_tokens: int = MAX_TOKENS) -> tuple[str, list[int], str]:
    """(text, completion token ids, finish reason) of one temperature-0 chat completion."""
    kw = dict(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
              extra_body={"return_token_ids": True})
    if not stream:
        r = client.chat.completions.create(**kw)
        choice = r.choices[0]
        assert r.usage.completion_tokens == len(choice.model_extra["token_ids"])
        return choice.message.content, choice.model_extra["token_ids"], choice.finish_reason
    text, ids, finish, usage = "", [], None, None
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            ids += choice.model_extra.get("token_ids") or []
            finish = choice.finish_reason or finish
    assert usage is not None and usage.completion_tokens == len(ids)
    return text, ids, finish


def assert_matches_oracle(model_dir, messages, text, ids, max_tokens=MAX_TOKENS):
    expected = hf_greedy(model_dir, messages, max_tokens=max_tokens)
    assert ids == expected
    assert text == hf_text(model_dir, expected).rstrip("\ufffd")


def chat_all_at_once(cluster, cases: list[list[dict]], max_tokens: int = MAX_TOKENS) -> list[list[int] | Exception]:
    """Send every case at once (temperature 0) to a test `Cluster`: each one's completion token
    ids, or the `openai.APIError` it ended with."""
    async def run():
        async with cluster.async_client() as client:
            async def one(messages):
                try:
                    r = await client.chat.completions.create(
                        model=cluster.model, messages=messages, max_tokens=max_tokens, temperature=0,
                        extra_body={"return_token_ids": True})
                    return r.choices[0].model_extra["token_ids"]
                except openai.APIError as exc:
                    return exc
            return await asyncio.gather(*(one(m) for m in cases))
    return asyncio.run(run())


def chat_concurrently(cluster, jobs: list[tuple[list[dict], int, bool]], concurrency: int) -> list[list[int]]:
    """Run (messages, max_tokens, streamed) chats at temperature 0, at most `concurrency` in
    flight, on a test `Cluster`: each one's completion token ids (an error raises)."""
    async def run():
        limit = asyncio.Semaphore(concurrency)
        async with cluster.async_client() as client:
            async def one(messages, max_tokens, stream):
                kw = dict(model=cluster.model, messages=messages, max_tokens=max_tokens, temperature=0,
                          extra_body={"return_token_ids": True})
                async with limit:
                    if not stream:
                        r = await client.chat.completions.create(**kw)
                        return r.choices[0].model_extra["token_ids"]
                    ids = []
                    async for chunk in await client.chat.completions.create(**kw, stream=True):
                        for choice in chunk.choices:
                            ids += choice.model_extra.get("token_ids") or []
                    return ids
            return await asyncio.gather(*(one(*job) for job in jobs))
    return asyncio.run(run())


def assert_nothing_held(stats: dict[str, dict[str, int]]) -> None:
    """Every KV block and staging span free, nothing held for a READ, no transfer or pin left,
    on every worker of `Cluster.worker_stats()` (an encoder's region is its cache: its entries
    stay)."""
    for name, s in stats.items():
        if "kv_blocks_total" in s:
            assert s["kv_blocks_free"] == s["kv_blocks_total"], name
            assert s["running"] == s["waiting"] == s["held_requests"] == s.get("region_allocations", 0) == 0, name
        assert s.get("nixl_live_transfers", 0) == 0 and s.get("nixl_expected_notifs", 0) == 0, name
        assert s.get("cache_pinned", 0) == 0, name
