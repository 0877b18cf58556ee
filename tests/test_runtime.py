"""Runtime layer on real servers: etcd discovery and the NATS request plane."""

from __future__ import annotations

import asyncio
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
from epdserve.runtime import request_plane, services
from epdserve.runtime.discovery import Discovery
from epdserve.runtime.request_plane import RequestPlane, round_trip
from helpers import free_port


def _ns() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------- discovery


async def test_registration_visible_to_watch_of_another_discovery(infra):
    ns = _ns()
    worker = await Discovery.connect(infra.etcd_endpoints, ns)
    router = await Discovery.connect(infra.etcd_endpoints, ns)
    try:
        before = worker.key("instances", "worker", "generate", "a")
        await worker.register(before, b"A")
        watch = await router.watch(router.key("instances", "worker"))
        assert watch.items() == {before: b"A"}  # the initial listing

        changes = []
        watch.add_listener(lambda: changes.append(dict(watch.items())))
        after = worker.key("instances", "worker", "generate", "b")
        await worker.register(after, b"B")
        await watch.wait_for(lambda items: after in items, timeout=2)
        assert watch.items() == {before: b"A", after: b"B"}
        assert changes[-1] == watch.items()

        await worker.unregister(before)
        await watch.wait_for(lambda items: before not in items, timeout=2)
        assert watch.items() == {after: b"B"}
    finally:
        await worker.close()
        await router.close()


async def test_close_removes_keys_at_once(infra):
    ns = _ns()
    worker = await Discovery.connect(infra.etcd_endpoints, ns, lease_ttl=30)
    router = await Discovery.connect(infra.etcd_endpoints, ns)
    try:
        key = worker.key("models", "m", "a")
        await worker.register(key, b"card")
        watch = await router.watch(router.key("models"))
        assert key in watch.items()
        start = time.monotonic()
        await worker.close()
        await watch.wait_for(lambda items: not items, timeout=2)
        assert time.monotonic() - start < 1.0  # far below the lease TTL: revoked, not expired
    finally:
        await router.close()


_REGISTER_AND_SLEEP = """
import asyncio, sys
from epdserve.runtime.discovery import Discovery
async def main():
    d = await Discovery.connect(sys.argv[1], sys.argv[2], lease_ttl=2)
    await d.register(d.key("instances", "victim"), b"alive")
    print("registered", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_key_of_killed_process_vanishes_within_ttl(infra):
    ns = _ns()
    proc = subprocess.Popen([sys.executable, "-c", _REGISTER_AND_SLEEP, infra.etcd_endpoints, ns],
                            stdout=subprocess.PIPE)
    router = await Discovery.connect(infra.etcd_endpoints, ns)
    try:
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line.strip() == b"registered"
        watch = await router.watch(router.key("instances"))
        assert list(watch.items().values()) == [b"alive"]
        os.kill(proc.pid, signal.SIGKILL)
        start = time.monotonic()
        await watch.wait_for(lambda items: not items, timeout=3.5)  # ttl 2 s + expiry checks
        assert time.monotonic() - start > 0.5  # it expired; nobody revoked it
    finally:
        proc.kill()
        proc.wait()
        await router.close()


async def test_lost_lease_is_replaced_and_keys_reput(infra):
    ns = _ns()
    worker = await Discovery.connect(infra.etcd_endpoints, ns, lease_ttl=2)
    router = await Discovery.connect(infra.etcd_endpoints, ns)
    admin = aetcd.Client(*services._host_port(infra.etcd_endpoints))
    try:
        key = worker.key("instances", "w")
        await worker.register(key, b"v")
        watch = await router.watch(key)
        lease = (await admin.get(key.encode())).lease
        await admin.revoke_lease(lease)  # as if etcd had forgotten it
        await watch.wait_for(lambda items: not items, timeout=2)
        await watch.wait_for(lambda items: items.get(key) == b"v", timeout=3)
        assert (await admin.get(key.encode())).lease != lease
    finally:
        await admin.close()
        await worker.close()
        await router.close()


async def test_watch_survives_etcd_restart(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    proc = services.start_etcd(url, tmp_path)
    worker = router = None
    try:
        worker = await Discovery.connect(url, "ns", lease_ttl=5)
        router = await Discovery.connect(url, "ns")
        await worker.register(worker.key("a"), b"1")
        watch = await router.watch(router.key(""))
        assert watch.items() == {"/epdserve/ns/a": b"1"}
        services.stop(proc)
        proc = services.start_etcd(url, tmp_path)  # same data dir: same revision history
        await worker.register(worker.key("b"), b"2")
        await watch.wait_for(lambda items: "/epdserve/ns/b" in items, timeout=5)
        assert watch.items() == {"/epdserve/ns/a": b"1", "/epdserve/ns/b": b"2"}
    finally:
        for d in (worker, router):
            if d is not None:
                await d.close()
        services.stop(proc)


# ------------------------------------------------------------------------------- request plane


@pytest.fixture
async def planes(infra):
    server = await RequestPlane.connect(infra.nats_server, "test-server")
    client = await RequestPlane.connect(infra.nats_server, "test-client")
    yield server, client
    await client.close(drain_timeout=1)
    await server.close(drain_timeout=1)


def _subject() -> str:
    return f"test.{uuid.uuid4().hex}"


async def _collect(client: RequestPlane, subject: str, payload: bytes = b"", **kw) -> list[bytes]:
    return [item async for item in client.stream(subject, payload, "req-1", **kw)]


async def test_stream_of_items(planes):
    server, client = planes
    subject = _subject()

    async def count(payload: bytes):
        for i in range(int(payload)):
            yield str(i).encode()

    await server.serve(subject, count)
    assert await _collect(client, subject, b"50") == [str(i).encode() for i in range(50)]
    assert await _collect(client, subject, b"0") == []


async def test_concurrent_requests_run_in_parallel(planes):
    server, client = planes
    subject = _subject()

    async def slow_echo(payload: bytes):
        await asyncio.sleep(0.3)
        yield payload

    await server.serve(subject, slow_echo)
    start = time.monotonic()
    results = await asyncio.gather(*(_collect(client, subject, b"%d" % i) for i in range(20)))
    assert results == [[b"%d" % i] for i in range(20)]
    assert time.monotonic() - start < 1.5


@pytest.fixture(scope="module")
def small_nats(tmp_path_factory):
    """A NATS server with the stock 1MB max_payload, to exercise chunking at small sizes."""
    url = f"nats://127.0.0.1:{free_port()}"
    proc = services.start_nats(url, tmp_path_factory.mktemp("nats1mb"), max_payload="1MB")
    yield url
    services.stop(proc)


@pytest.mark.parametrize("request_mb,reply_mb", [(5, 3), (20, 10)])
async def test_large_payloads_are_chunked(infra, small_nats, request_mb, reply_mb):
    url = small_nats if request_mb < 8 else infra.nats_server  # both exceed max_payload
    server = await RequestPlane.connect(url)
    client = await RequestPlane.connect(url)
    subject = _subject()
    request = os.urandom(request_mb << 20)
    reply = os.urandom(reply_mb << 20)

    async def handler(payload: bytes):
        assert payload == request
        yield b"small"
        yield reply

    try:
        await server.serve(subject, handler)
        assert await _collect(client, subject, request) == [b"small", reply]
    finally:
        await client.close()
        await server.close()


async def test_epd_error_crosses_the_wire(planes):
    server, client = planes
    subject = _subject()

    async def unknown_model(payload: bytes):
        yield b"partial"
        raise EpdError(404, "model 'x' not found", param="model")

    await server.serve(subject, unknown_model)
    items = []
    with pytest.raises(EpdError) as info:
        async for item in client.stream(subject, b"", "r"):
            items.append(item)
    assert items == [b"partial"]
    assert (info.value.code, info.value.message, info.value.param) == (404, "model 'x' not found",
                                                                       "model")


async def test_generic_exception_is_500(planes):
    server, client = planes
    subject = _subject()

    async def buggy(payload: bytes):
        raise ZeroDivisionError("division by zero")
        yield b""

    await server.serve(subject, buggy)
    with pytest.raises(EpdError) as info:
        await _collect(client, subject)
    assert info.value.code == 500
    assert "division by zero" in info.value.message
    assert server.in_flight == 0


async def test_no_server_is_503(planes, infra):
    _, client = planes
    start = time.monotonic()
    with pytest.raises(EpdError) as info:
        await _collect(client, _subject(), ack_timeout=1.0)
    assert info.value.code == 503 and "no worker answered" in info.value.message
    assert time.monotonic() - start < 1.5

    # A subscriber that never acks (a hung process): 503 after ack_timeout.
    nc = await nats.connect(infra.nats_server)
    subject = _subject()
    await nc.subscribe(subject)
    await round_trip(nc)
    try:
        start = time.monotonic()
        with pytest.raises(EpdError) as info:
            await _collect(client, subject, ack_timeout=0.3)
        assert info.value.code == 503 and 0.3 <= time.monotonic() - start < 1.0
    finally:
        await nc.close()


async def test_silent_server_is_503_and_heartbeats_keep_it_alive(planes, infra, monkeypatch):
    server, client = planes
    nc = await nats.connect(infra.nats_server)
    silent = _subject()

    async def ack_then_nothing(msg):
        await nc.publish(msg.reply, pb.Frame(ack=True).SerializeToString())

    await nc.subscribe(silent, cb=ack_then_nothing)
    await round_trip(nc)
    try:
        with pytest.raises(EpdError) as info:
            await _collect(client, silent, idle_timeout=0.3)
        assert info.value.code == 503 and "silent" in info.value.message
    finally:
        await nc.close()

    monkeypatch.setattr(request_plane, "HEARTBEAT_INTERVAL", 0.1)
    slow = _subject()

    async def think(payload: bytes):
        await asyncio.sleep(1.0)
        yield b"done"

    await server.serve(slow, think)
    assert await _collect(client, slow, idle_timeout=0.5) == [b"done"]


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_early_stop_cancels_server_handler(planes, how):
    server, client = planes
    subject = _subject()
    finished = asyncio.Event()

    async def forever(payload: bytes):
        try:
            while True:
                yield b"tick"
                await asyncio.sleep(0.01)
        finally:
            finished.set()

    await server.serve(subject, forever)
    got_one = asyncio.Event()

    async def consume():
        stream = client.stream(subject, b"", "r")
        async for _ in stream:
            got_one.set()
            if how == "aclose":
                await stream.aclose()
                return

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), 2)
    if how == "cancel":
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.wait_for(finished.wait(), 2)
    for _ in range(100):
        if server.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert server.in_flight == 0


async def test_close_drains_in_flight_requests(infra):
    server = await RequestPlane.connect(infra.nats_server)
    client = await RequestPlane.connect(infra.nats_server)
    subject = _subject()

    async def slow(payload: bytes):
        await asyncio.sleep(0.5)
        yield b"finished"

    try:
        await server.serve(subject, slow)
        pending = asyncio.create_task(_collect(client, subject))
        while server.in_flight == 0:
            await asyncio.sleep(0.01)
        await server.close(drain_timeout=5)
        assert await pending == [b"finished"]
        with pytest.raises(EpdError) as info:  # no longer taking requests
            await _collect(client, subject, ack_timeout=0.5)
        assert info.value.code == 503
    finally:
        await client.close()


async def test_close_cancels_handlers_after_drain_timeout(infra):
    server = await RequestPlane.connect(infra.nats_server)
    client = await RequestPlane.connect(infra.nats_server)
    subject = _subject()
    finished = asyncio.Event()

    async def stuck(payload: bytes):
        try:
            await asyncio.sleep(3600)
            yield b""
        finally:
            finished.set()

    try:
        await server.serve(subject, stuck)
        pending = asyncio.create_task(_collect(client, subject))
        while server.in_flight == 0:
            await asyncio.sleep(0.01)
        start = time.monotonic()
        await server.close(drain_timeout=0.2)
        assert finished.is_set() and time.monotonic() - start < 1.0
        with pytest.raises(EpdError) as info:  # told at once, not after idle_timeout
            await asyncio.wait_for(pending, 1)
        assert info.value.code == 503
    finally:
        await client.close()
