"""Service discovery on etcd: lease-bound registrations and live prefix snapshots."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from urllib.parse import urlsplit

import aetcd

log = logging.getLogger(__name__)

RPC_TIMEOUT = 5  # seconds per unary etcd call; the watch stream itself has no deadline
RETRY_DELAY, MAX_RETRY_DELAY = 0.5, 4.0  # backoff while re-establishing a dropped watch


def _parse_endpoint(endpoints: str) -> tuple[str, int]:
    """First endpoint of a comma-separated ETCD_ENDPOINTS value, as (host, port)."""
    first = endpoints.split(",")[0].strip()
    parts = urlsplit(first if "://" in first else f"http://{first}")
    return parts.hostname or "127.0.0.1", parts.port or 2379


class Discovery:
    """Registry under /epdserve/<namespace>/ in etcd. Keys registered here live on one lease
    that this object keeps alive; when the process dies the keys vanish within lease_ttl."""

    def __init__(self, client: aetcd.Client, namespace: str, lease_ttl: int):
        self._client = client
        self._prefix = f"/epdserve/{namespace}/"
        self._ttl = lease_ttl
        self._lease_id = 0
        self._registered: dict[str, bytes] = {}
        self._lock = asyncio.Lock()  # orders registrations against lease replacement
        self._watches: set[Watch] = set()
        self._keepalive: asyncio.Task | None = None
        self._closed = False

    @classmethod
    async def connect(cls, endpoints: str, namespace: str, lease_ttl: float = 10.0) -> Discovery:
        """Connect to the first of `endpoints` and grant the lease (fails if etcd is down)."""
        host, port = _parse_endpoint(endpoints)
        client = aetcd.Client(host, port, timeout=RPC_TIMEOUT)
        self = cls(client, namespace, max(1, math.ceil(lease_ttl)))  # etcd TTLs are whole seconds
        try:
            self._lease_id = (await client.lease(self._ttl)).id
        except BaseException:
            await client.close()
            raise
        self._keepalive = asyncio.create_task(self._keep_alive(), name="etcd-keepalive")
        return self

    def key(self, *parts: str) -> str:
        """The full key "/epdserve/<namespace>/" + "/".join(parts)."""
        return self._prefix + "/".join(parts)

    async def register(self, key: str, value: bytes) -> None:
        """Put `key` on this object's lease; it is re-put if the lease ever has to be replaced."""
        async with self._lock:
            try:
                await self._client.put(key.encode(), value, lease=self._lease_id)
            except aetcd.ClientError as e:
                if "lease not found" not in str(e):
                    raise
                await self._new_lease()  # etcd lost the lease (restart) before keepalive noticed
                await self._client.put(key.encode(), value, lease=self._lease_id)
            self._registered[key] = value

    async def unregister(self, key: str) -> None:
        """Delete `key` and stop re-putting it."""
        async with self._lock:
            self._registered.pop(key, None)
            await self._client.delete(key.encode())

    async def watch(self, prefix: str) -> Watch:
        """A live snapshot of all keys starting with the full key `prefix` (see `key()`)."""
        watch = Watch(self._client, prefix, self._watches.discard)
        await watch._start()
        self._watches.add(watch)
        return watch

    async def close(self) -> None:
        """Stop keepalive and watches, revoke the lease (registered keys vanish at once).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._keepalive is not None:
            self._keepalive.cancel()
            await asyncio.gather(self._keepalive, return_exceptions=True)
        for watch in list(self._watches):
            await watch.close()
        try:
            await self._client.revoke_lease(self._lease_id)
        except aetcd.ClientError as e:
            log.warning("could not revoke etcd lease %x: %s", self._lease_id, e)
        await self._client.close()

    async def _new_lease(self) -> None:
        """Grant a fresh lease and re-put every registered key on it. Caller holds _lock.

        The new lease is adopted only once every key is on it: if a put fails, keepalive
        still sees the dead lease and retries the whole move (the orphan lease expires).
        """
        lease_id = (await self._client.lease(self._ttl)).id
        for key, value in self._registered.items():
            await self._client.put(key.encode(), value, lease=lease_id)
        self._lease_id = lease_id
        log.warning("etcd lease replaced; re-registered %d keys", len(self._registered))

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                reply = await self._client.refresh_lease(self._lease_id)
                if reply is None or reply.TTL <= 0:  # expired or unknown to this etcd
                    async with self._lock:
                        await self._new_lease()
            except Exception as e:  # keep trying: this loop is what keeps the keys alive
                log.warning("etcd lease keepalive failed: %s", e)


class Watch:
    """A live snapshot of every key under a prefix: initial get_prefix, then a watch from the
    next revision (no gap, no polling). A dropped watch stream is healed by re-listing and
    re-watching; listeners are told whenever the snapshot changes."""

    def __init__(self, client: aetcd.Client, prefix: str, on_close: Callable[[Watch], None]):
        self._client = client
        self._prefix = prefix.encode()
        self._on_close = on_close
        self._items: dict[str, bytes] = {}
        self._listeners: list[Callable[[], None]] = []
        self._task: asyncio.Task | None = None

    def items(self) -> dict[str, bytes]:
        """The current snapshot (full key -> value), updated in place; do not mutate it."""
        return self._items

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call `fn()` (in the event loop) after each change of the snapshot."""
        self._listeners.append(fn)

    async def wait_for(self, predicate: Callable[[dict[str, bytes]], bool], timeout: float) -> None:
        """Return once `predicate(items())` holds; raise TimeoutError after `timeout` seconds."""
        done = asyncio.get_running_loop().create_future()

        def check() -> None:
            if not done.done() and predicate(self._items):
                done.set_result(None)

        check()
        self._listeners.append(check)
        try:
            await asyncio.wait_for(done, timeout)
        finally:
            self._listeners.remove(check)

    async def close(self) -> None:
        """Stop watching; the snapshot stays as it was."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._on_close(self)

    async def _start(self) -> None:
        stream = await self._resync()  # first attempt raises, so callers see etcd being down
        self._task = asyncio.create_task(self._run(stream), name=f"etcd-watch {self._prefix!r}")

    async def _resync(self) -> aetcd.Watch:
        """List the prefix, replace the snapshot, and watch from the revision after the list."""
        listing = await self._client.get_prefix(self._prefix)
        stream = await self._client.watch_prefix(self._prefix, start_revision=listing.header.revision + 1)
        items = {kv.key.decode(): kv.value for kv in listing}
        if items != self._items:
            self._items.clear()  # in place: callers may hold the dict items() returned
            self._items.update(items)
            self._notify()
        return stream

    async def _run(self, stream: aetcd.Watch) -> None:
        while True:
            try:
                try:
                    async for event in stream:
                        key = event.kv.key.decode()
                        if event.kind == "PUT":
                            self._items[key] = event.kv.value
                        else:
                            self._items.pop(key, None)
                        self._notify()
                finally:
                    await stream.cancel()
                log.warning("etcd watch on %r ended; re-listing", self._prefix)
            except Exception as e:  # stream dropped (etcd restart, compaction, ...)
                log.warning("etcd watch on %r failed: %s; re-listing", self._prefix, e)
            delay = RETRY_DELAY
            while True:
                await asyncio.sleep(delay)
                try:
                    stream = await self._resync()
                    break
                except Exception as e:
                    log.warning("etcd re-list of %r failed: %s", self._prefix, e)
                    delay = min(2 * delay, MAX_RETRY_DELAY)

    def _notify(self) -> None:
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:
                log.exception("watch listener failed")
