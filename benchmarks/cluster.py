"""A real cluster for the benchmarks: etcd + NATS on free ports, a launch script, and the
streaming `openai` client that drives it (closed-loop load, tokens timed on arrival)."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from common import TAG_VAR, RequestRecord, WorkItem, free_port, stop_tagged
from epdserve.config import RuntimeConfig
from epdserve.runtime import services
from epdserve.tools.procs import pid_with_arg
from epdserve.tools.stats import worker_stats

ROOT = Path(__file__).resolve().parents[1]
SERVED_NAME = "bench-llava"
READY_TIMEOUT_S = 300


@dataclass(frozen=True)
class Cluster:
    base_url: str
    tag: str                  # TAG_VAR's value in every process of this cluster
    runtime: RuntimeConfig    # its etcd, NATS and namespace

    def pid(self, arg: str) -> int:
        """The PID of the cluster process whose command line has the argument `arg`."""
        return pid_with_arg(TAG_VAR, self.tag, arg)

    def stats(self) -> dict[str, dict[str, int]]:
        """Every worker's counters ("<component>/<instance id>" -> counters)."""
        return asyncio.run(worker_stats(self.runtime))


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


def _wait_served(proc: subprocess.Popen, base_url: str, log: Path) -> None:
    """Poll /v1/models until the model is listed; raise with the log tail on exit or timeout."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cluster exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            models = httpx.get(base_url + "/v1/models", timeout=5).json()["data"]
            if any(m["id"] == SERVED_NAME for m in models):
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"cluster not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@contextmanager
def http_cluster(model: str, script: str = "agg_multimodal.sh", extra: tuple[str, ...] = (),
                 label: str = "http") -> Iterator[Cluster]:
    """etcd + NATS on free ports and `launch/<script>` with `extra` worker flags.

    Stops the script with SIGTERM, then SIGKILLs any process carrying this run's tag."""
    tag = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="epdserve-bench-") as tmp:
        work, infra = Path(tmp), []
        runtime = RuntimeConfig(f"http://127.0.0.1:{free_port()}", f"nats://127.0.0.1:{free_port()}", "bench")
        port, log = free_port(), work / "cluster.log"
        try:
            infra.append(services.start_etcd(runtime.etcd_endpoints, work / "etcd"))
            infra.append(services.start_nats(runtime.nats_server, work / "nats"))
            env = os.environ | {"ETCD_ENDPOINTS": runtime.etcd_endpoints, "NATS_SERVER": runtime.nats_server,
                                "HTTP_HOST": "127.0.0.1", "PYTHON": sys.executable, TAG_VAR: tag}
            cmd = ["bash", str(ROOT / "launch" / script), "--model", model, "--http-port", str(port),
                   "--namespace", runtime.namespace, "--served-model-name", SERVED_NAME, "--device", "cpu", *extra]
            with open(log, "wb") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            try:
                base_url, started = f"http://127.0.0.1:{port}", time.perf_counter()
                _wait_served(proc, base_url, log)
                print(f"[{label}] cluster ready in {time.perf_counter() - started:.1f} s", flush=True)
                yield Cluster(base_url, tag, runtime)
            finally:
                stop_tagged(proc, tag)
        finally:
            for server in reversed(infra):
                services.stop(server)


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
