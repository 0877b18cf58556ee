"""Runtime layer on real servers: etcd discovery and the NATS request plane."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid

import aetcd
import nats
import pytest

from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.config import PlaneTimeouts
from epdserve.runtime import services
from epdserve.runtime.discovery import Discovery
from epdserve.runtime.request_plane import RequestPlane, round_trip
from support.cluster import free_port


class Registry:
    """Opens Discovery objects in a namespace of its own; the fixture closes them all."""

    def __init__(self, endpoints: str):
        self.endpoints, self.ns, self.opened = endpoints, f"test-{uuid.uuid4().hex[:8]}", []

    async def __call__(self, lease_ttl: float = 10.0, endpoints: str = "") -> Discovery:
        self.opened.append(await Discovery.connect(endpoints or self.endpoints, self.ns, lease_ttl))
        return self.opened[-1]


@pytest.fixture
async def registry(infra):
    yield (reg := Registry(infra.etcd_endpoints))
    for d in reg.opened:
        await d.close()


async def test_registration_is_watched_and_close_removes_keys_at_once(registry):
    worker, router = await registry(lease_ttl=30), await registry()
    before = worker.key("instances", "worker", "generate", "a")
    await worker.register(before, b"A")
    watch = await router.watch(router.key("instances", "worker"))
    assert watch.items() == {before: b"A"}  # the initial listing

    changes = []
    watch.add_listener(lambda: changes.append(dict(watch.items())))
    after = worker.key("instances", "worker", "generate", "b")
    await worker.register(after, b"B")
    await watch.wait_for(lambda items: after in items, timeout=2)
    assert watch.items() == {before: b"A", after: b"B"} == changes[-1]

    await worker.unregister(before)
    await watch.wait_for(lambda items: before not in items, timeout=2)
    assert watch.items() == {after: b"B"}

    start = time.monotonic()
    await worker.close()
    await watch.wait_for(lambda items: not items, timeout=2)
    assert time.monotonic() - start < 5  # far below the 30 s TTL: revoked, not expired


_REGISTER_AND_SLEEP = """
import asyncio, sys
from epdserve.runtime.discovery import Discovery
async def main():
    d = await Discovery.connect(sys.argv[1], sys.argv[2], lease_ttl=2)
    await d.register(d.key("instances", "victim"), b"alive")
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_key_of_killed_process_vanishes_within_ttl(registry):
    router = await registry()
    watch = await router.watch(router.key("instances"))
    proc = subprocess.Popen([sys.executable, "-c", _REGISTER_AND_SLEEP, registry.endpoints,
                             registry.ns])
    try:
        await watch.wait_for(lambda items: list(items.values()) == [b"alive"], timeout=20)
        os.kill(proc.pid, signal.SIGKILL)
        start = time.monotonic()
        await watch.wait_for(lambda items: not items, timeout=4)  # ttl 2 s + expiry checks
        assert time.monotonic() - start > 0.5  # it expired; nobody revoked it
    finally:
        proc.kill()
        proc.wait()


async def test_lost_lease_is_replaced_and_keys_reput(registry):
    worker, router = await registry(lease_ttl=2), await registry()
    key = worker.key("instances", "w")
    await worker.register(key, b"v")
    watch = await router.watch(key)
    async with aetcd.Client(*services._host_port(registry.endpoints)) as admin:
        lease = (await admin.get(key.encode())).lease
        await admin.revoke_lease(lease)  # as if etcd had forgotten it
        await watch.wait_for(lambda items: not items, timeout=2)
        await watch.wait_for(lambda items: items.get(key) == b"v", timeout=3)
        assert (await admin.get(key.encode())).lease != lease


async def test_watch_survives_etcd_restart(registry, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    proc = services.start_etcd(url, tmp_path)
    try:
        worker = await registry(lease_ttl=5, endpoints=url)
        router = await registry(endpoints=url)
        await worker.register(worker.key("a"), b"1")
        watch = await router.watch(router.key(""))
        assert list(watch.items().values()) == [b"1"]
        services.stop(proc)
        proc = services.start_etcd(url, tmp_path)  # same data dir: same revision history
        await worker.register(worker.key("b"), b"2")
        await watch.wait_for(lambda items: worker.key("b") in items, timeout=5)
        assert sorted(watch.items().values()) == [b"1", b"2"]
        for d in (worker, router):
            await d.close()  # while this etcd still runs
    finally:
        services.stop(proc)


class Planes:
    """A serving and a requesting RequestPlane on one NATS server (an async context)."""

    def __init__(self, url: str):
        self.url = url

    async def __aenter__(self) -> Planes:
        self.server = await RequestPlane.connect(self.url, PlaneTimeouts(drain_timeout=1))
        self.client = await RequestPlane.connect(self.url, PlaneTimeouts(drain_timeout=1))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()
        await self.server.close()  # a no-op when the test closed it

    def set_timeouts(self, plane: RequestPlane, **timeouts: float) -> None:
        plane.timeouts = dataclasses.replace(plane.timeouts, **timeouts)

    async def serve(self, handler) -> str:
        subject = f"test.{uuid.uuid4().hex}"
        await self.server.serve(subject, handler)
        return subject

    async def collect(self, subject: str, payload: bytes = b"", **kw) -> list[bytes]:
        return [item async for item in self.client.stream(subject, payload, "req-1", **kw)]


@pytest.fixture
async def rp(infra):
    async with Planes(infra.nats_server) as planes:
        yield planes


async def _until(condition, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_streams_many_items_and_many_requests_at_once(rp):
    async def count(payload: bytes):
        await asyncio.sleep(0.3)
        for i in range(int(payload)):
            yield b"%d" % i

    subject = await rp.serve(count)
    assert await rp.collect(subject, b"50") == [b"%d" % i for i in range(50)]
    start = time.monotonic()
    results = await asyncio.gather(*(rp.collect(subject, b"%d" % n) for n in range(20)))
    assert results == [[b"%d" % i for i in range(n)] for n in range(20)]
    assert time.monotonic() - start < 1.5  # handlers ran concurrently, not 20 x 0.3 s


@pytest.mark.parametrize("request_mb,reply_mb,limit", [(5, 3, "1MB"), (20, 10, "8MB")])
async def test_large_payloads_are_chunked(tmp_path, request_mb, reply_mb, limit):
    request, reply = os.urandom(request_mb << 20), os.urandom(reply_mb << 20)

    async def handler(payload: bytes):
        assert payload == request
        yield b"small"
        yield reply

    url = f"nats://127.0.0.1:{free_port()}"
    proc = services.start_nats(url, tmp_path, max_payload=limit)  # both sizes exceed the limit
    try:
        async with Planes(url) as planes:
            assert await planes.collect(await planes.serve(handler), request) == [b"small", reply]
    finally:
        services.stop(proc)


async def test_errors_cross_the_wire(rp):
    async def unknown_model(payload: bytes):
        yield b"partial"
        raise EpdError(404, "model 'x' not found", param="model")

    async def buggy(payload: bytes):
        yield 1 // 0

    stream = rp.client.stream(await rp.serve(unknown_model), b"", "r")
    assert await anext(stream) == b"partial"
    with pytest.raises(EpdError) as info:
        await anext(stream)
    assert (info.value.code, info.value.message, info.value.param) == (
        404, "model 'x' not found", "model")

    with pytest.raises(EpdError, match="ZeroDivisionError") as info:
        await rp.collect(await rp.serve(buggy))
    assert info.value.code == 500 and rp.server.in_flight == 0


async def test_missing_hung_or_silent_server_is_503(rp, infra):
    start = time.monotonic()
    with pytest.raises(EpdError, match="no worker answered") as info:  # NATS: no subscriber
        rp.set_timeouts(rp.client, ack_timeout=1.0)
        await rp.collect("test.nobody")
    assert info.value.code == 503 and time.monotonic() - start < 0.5

    nc = await nats.connect(infra.nats_server)

    async def ack_then_nothing(msg):
        await nc.publish(msg.reply, pb.Frame(ack=True).SerializeToString())

    try:
        await nc.subscribe("test.hung")  # never acks
        await nc.subscribe("test.silent", cb=ack_then_nothing)
        await round_trip(nc, 5.0)
        start = time.monotonic()
        rp.set_timeouts(rp.client, ack_timeout=0.3)
        with pytest.raises(EpdError) as info:
            await rp.collect("test.hung")
        assert info.value.code == 503 and 0.3 <= time.monotonic() - start < 2
        with pytest.raises(EpdError) as info:
            await rp.collect("test.silent", idle_timeout=0.3)
        assert info.value.code == 503 and "silent" in info.value.message
    finally:
        await nc.close()

    rp.set_timeouts(rp.server, heartbeat_interval=0.1)

    async def think(payload: bytes):
        await asyncio.sleep(1.0)
        yield b"done"

    # Quiet for longer than idle_timeout, but heartbeats keep the stream alive.
    assert await rp.collect(await rp.serve(think), idle_timeout=0.5) == [b"done"]


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_early_stop_cancels_server_handler(rp, how):
    finished = asyncio.Event()

    async def tick_then_wait(payload: bytes):
        try:
            yield b"tick"
            await asyncio.sleep(3600)
        finally:
            finished.set()

    stream = rp.client.stream(await rp.serve(tick_then_wait), b"", "r")
    assert await anext(stream) == b"tick"
    if how == "aclose":
        await stream.aclose()
    else:  # the consumer's task is cancelled while it waits for the next item
        waiting = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
    await asyncio.wait_for(finished.wait(), 2)
    await _until(lambda: rp.server.in_flight == 0)


async def test_close_drains_then_cancels(rp):
    cancelled = asyncio.Event()

    async def handler(payload: bytes):
        try:
            await asyncio.sleep(float(payload))
            yield b"finished"
        finally:
            if float(payload) > 1:
                cancelled.set()

    subject = await rp.serve(handler)
    quick = asyncio.create_task(rp.collect(subject, b"0.3"))
    stuck = asyncio.create_task(rp.collect(subject, b"3600"))
    await _until(lambda: rp.server.in_flight == 2)
    start = time.monotonic()
    rp.set_timeouts(rp.server, drain_timeout=0.6)
    await rp.server.close()
    assert cancelled.is_set() and time.monotonic() - start < 2
    assert await quick == [b"finished"]  # drained
    with pytest.raises(EpdError) as info:  # cancelled, and told at once (not idle_timeout)
        await asyncio.wait_for(stuck, 1)
    assert info.value.code == 503
    with pytest.raises(EpdError) as info:  # no longer taking requests
        rp.set_timeouts(rp.client, ack_timeout=0.5)
        await rp.collect(subject)
    assert info.value.code == 503
