"""A real cluster for the benchmarks, started by the tests' harness (`tests/support/cluster.py`:
etcd + NATS on free ports, a launch script, every process stopped by PID), and the streaming
`openai` client that drives it (closed-loop load, tokens timed on arrival)."""

from __future__ import annotations

import asyncio
import base64
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai

from metrics import RequestRecord
from workload import WorkItem

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from support.cluster import Cluster, infra_servers, launch, running  # noqa: E402

__all__ = ["SERVED_NAME", "Cluster", "client_for", "closed_loop", "data_url", "http_cluster", "http_level",
           "timed_chat"]

SERVED_NAME = "bench-llava"
READY_TIMEOUT_S = 300


async def closed_loop(items: list[WorkItem], concurrency: int,
                      send: Callable[[WorkItem], Awaitable[RequestRecord]]) -> tuple[list[RequestRecord], float]:
    """Keep `concurrency` requests in flight until all complete; (records, wall seconds)."""
    pending: Iterator[WorkItem] = iter(items)
    records: list[RequestRecord] = []

    async def client() -> None:
        for item in pending:   # shared iterator: each client takes the next request when free
            records.append(await send(item))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, len(items)))))
    return records, time.perf_counter() - start


@contextmanager
def http_cluster(model: str, script: str = "agg_multimodal.sh", extra: tuple[str, ...] = (),
                 label: str = "http") -> Iterator[Cluster]:
    """etcd + NATS on free ports and `launch/<script>` with `extra` worker flags, on the CPU.

    Stops the script with SIGTERM, then SIGKILLs any process carrying this run's tag."""
    with tempfile.TemporaryDirectory(prefix="epdserve-bench-") as tmp, infra_servers(Path(tmp)) as infra:
        started = time.perf_counter()
        cluster = launch(script, infra, Path(tmp), "--device", "cpu", *extra, model_dir=model,
                         served_name=SERVED_NAME, timeout=READY_TIMEOUT_S)
        print(f"[{label}] cluster ready in {time.perf_counter() - started:.1f} s", flush=True)
        with running(cluster):
            yield cluster


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def client_for(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=600)


async def timed_chat(client: openai.AsyncOpenAI, rec: RequestRecord, messages: list[dict[str, Any]]) -> RequestRecord:
    """One streaming chat completion of `rec.max_tokens` tokens (EOS ignored); a chunk's tokens
    are timed on its arrival."""
    chunk_times: list[float] = []
    issued = time.perf_counter()
    stream = await client.chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=rec.max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "return_token_ids": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            rec.output_tokens, rec.prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
        if any((c.model_extra or {}).get("token_ids") for c in chunk.choices):
            chunk_times.append(now)
    rec.finish(issued, chunk_times)
    return rec


async def http_level(base_url: str, items: list[WorkItem], concurrency: int) -> tuple[list[RequestRecord], float]:
    """Closed-loop streaming chat completions of `items` (images sent as data URLs)."""
    urls = {it.rid: data_url(it.image) for it in items if it.image is not None}   # off the clock
    client = client_for(base_url)

    async def send(item: WorkItem) -> RequestRecord:
        rec = RequestRecord(item.rid, item.image is not None, item.max_tokens)
        return await timed_chat(client, rec, item.openai_messages(urls.get(item.rid)))

    async with client:
        return await closed_loop(items, concurrency, send)
