"""Request/streamed-reply plane on NATS.

Wire protocol (both directions use `_publish`, which splits a payload larger than the
connection's max_payload into chunks carrying `Epd-Chunk`/`Epd-Chunks` headers):

- The client subscribes a fresh inbox and publishes the request to `subject` with
  reply=inbox and header `Epd-Request-Id`.
- The server reassembles the request per inbox, then runs the handler in its own task and
  publishes serialized `Frame`s to the inbox: `ack`, `data` per item, `heartbeat` every
  `PlaneTimeouts.heartbeat_interval` seconds while the handler runs, and finally `end` or `error`.
- A client that stops early publishes its inbox to `<subject>.cancel`; the server cancels
  that handler's task.

`post` sends a one-way message (request id header, chunked the same way) that `listen`
hands to a callback: no ack, no reply.

One server per subject: subjects are instance-specific (see discovery), since chunks and
cancels of a request must reach the instance that serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import nats
import nats.errors
from nats.aio.msg import Msg

from epdserve.config import PlaneTimeouts
from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError

log = logging.getLogger(__name__)

Handler = Callable[[bytes], AsyncIterator[bytes]]  # request payload -> stream of response payloads

HEADER_MARGIN = 4096  # bytes of max_payload left for subject, reply and headers
REQUEST_ID, CHUNK, CHUNKS = "Epd-Request-Id", "Epd-Chunk", "Epd-Chunks"


async def _publish(nc: nats.NATS, subject: str, payload: bytes, request_id: str, reply: str = "") -> None:
    """Publish `payload`, in ordered chunks if it exceeds what the server accepts."""
    size = nc.max_payload - HEADER_MARGIN
    count = max(1, -(-len(payload) // size))
    if count == 1:
        await nc.publish(subject, payload, reply=reply, headers={REQUEST_ID: request_id})
        return
    view = memoryview(payload)
    for i in range(count):
        headers = {REQUEST_ID: request_id, CHUNK: str(i), CHUNKS: str(count)}
        await nc.publish(subject, bytes(view[i * size : (i + 1) * size]), reply=reply, headers=headers)


async def round_trip(nc: nats.NATS, timeout: float) -> None:
    """Return once the server has processed every command this connection sent before.

    `nc.flush()` does not promise that: nats-py writes its PING straight to the socket,
    possibly ahead of SUBs still in its buffer. A message to ourselves queues behind them.
    """
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    await nc.publish(inbox, b"")
    await sub.next_msg(timeout=timeout)


class _Assembler:
    """Joins chunked messages; one in-progress payload per key (the inbox). A payload whose
    sender stopped mid-way is forgotten after `ttl` seconds."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        # key -> (first seen, chunks so far); None chunks: discarded, drop what still comes
        self._parts: dict[str, tuple[float, list[bytes] | None]] = {}

    def add(self, key: str, msg: Msg) -> bytes | None:
        """The whole payload once `msg` completes it; None while incomplete or if discarded.

        Raises ValueError (and forgets the payload) when a chunk is missing: NATS keeps order,
        so a gap means the server dropped messages (slow consumer).
        """
        started, parts = self._parts.get(key, (time.monotonic(), []))
        if parts is None:
            return None
        headers = msg.headers or {}
        if CHUNKS not in headers:
            return msg.data
        index, count = int(headers[CHUNK]), int(headers[CHUNKS])
        if index != len(parts):
            self._parts.pop(key, None)
            raise ValueError(f"got chunk {index} of {count} after {len(parts)} chunks")
        parts.append(msg.data)
        if len(parts) < count:
            self._parts[key] = (started, parts)
            return None
        self._parts.pop(key, None)
        return b"".join(parts)

    def discard(self, key: str) -> None:
        """Drop `key`'s payload, including chunks still to come (for `ttl` seconds)."""
        self._parts[key] = (time.monotonic(), None)

    def expire(self) -> None:
        """Forget payloads whose sender stopped mid-way (it died or gave up) and old discards."""
        cutoff = time.monotonic() - self.ttl
        for key in [k for k, (started, _) in self._parts.items() if started < cutoff]:
            del self._parts[key]


class RequestPlane:
    """One NATS connection that serves subjects and/or streams requests to them."""

    def __init__(self, nc: nats.NATS, timeouts: PlaneTimeouts):
        self._nc = nc
        self.timeouts = timeouts
        self._subs: list = []  # request subscriptions, dropped first on close
        self._tasks: dict[str, asyncio.Task] = {}  # inbox -> handler task
        self._requests = _Assembler(timeouts.partial_ttl)
        self._heartbeat: asyncio.Task | None = None

    @classmethod
    async def connect(cls, url: str, timeouts: PlaneTimeouts, name: str = "epdserve") -> RequestPlane:
        """Connect to NATS at `url`; reconnects forever after the first success."""
        nc = await nats.connect(url, name=name, max_reconnect_attempts=-1, connect_timeout=timeouts.connect_timeout)
        return cls(nc, timeouts)

    @property
    def dead_server_timeout(self) -> float:
        """The idle timeout of a stream to a worker: three missed heartbeats."""
        return self.timeouts.dead_server_timeout

    @property
    def in_flight(self) -> int:
        """Number of handler tasks currently running."""
        return len(self._tasks)

    async def serve(self, subject: str, handler: Handler) -> None:
        """Answer requests on `subject` with `handler`, each request in its own task."""

        async def on_request(msg: Msg) -> None:
            if not msg.reply:
                return  # nowhere to answer
            self._requests.expire()
            try:
                payload = self._requests.add(msg.reply, msg)
            except ValueError as e:  # the client gets no ack and reports 503
                log.warning("dropping request on %s from %s: %s", subject, msg.reply, e)
                return
            if payload is None:
                return
            request_id = (msg.headers or {}).get(REQUEST_ID, "")
            self._tasks[msg.reply] = asyncio.create_task(
                self._run(subject, handler, payload, msg.reply, request_id), name=f"{subject} {request_id}"
            )

        async def on_cancel(msg: Msg) -> None:
            inbox = msg.data.decode()
            # A cancel may overtake its request (separate subscriptions): the discard also
            # drops the request if it completes later.
            self._requests.discard(inbox)
            if task := self._tasks.get(inbox):
                task.cancel()

        self._subs.append(await self._nc.subscribe(subject, cb=on_request))
        # Cancels keep flowing while close() drains; the connection's drain ends them.
        await self._nc.subscribe(f"{subject}.cancel", cb=on_cancel)
        await round_trip(
            self._nc, self.timeouts.ack_timeout
        )  # the server knows our subscriptions before callers publish
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._heartbeats(), name="request-heartbeats")

    async def listen(self, subject: str, on_message: Callable[[str, bytes], None]) -> None:
        """Call `on_message(request_id, payload)` for each message `post`ed to `subject`."""
        parts = _Assembler(self.timeouts.partial_ttl)

        async def on_post(msg: Msg) -> None:
            request_id = (msg.headers or {}).get(REQUEST_ID, "")
            parts.expire()
            try:
                payload = parts.add(request_id, msg)
            except ValueError as e:
                log.warning("dropping a message on %s for request %s: %s", subject, request_id, e)
                return
            if payload is not None:
                on_message(request_id, payload)

        # Like cancels, these keep flowing while close() drains: in-flight requests wait for them.
        await self._nc.subscribe(subject, cb=on_post)
        await round_trip(self._nc, self.timeouts.ack_timeout)

    async def post(self, subject: str, payload: bytes, request_id: str) -> None:
        """Send `payload` about `request_id` to whoever `listen`s on `subject` (at most once;
        nobody may be listening). Raises EpdError(503) when NATS fails."""
        try:
            await _publish(self._nc, subject, payload, request_id)
        except nats.errors.Error as e:
            raise EpdError(503, f"request plane failed on {subject}: {e!r}") from e

    async def _send(self, inbox: str, request_id: str, frame: pb.Frame) -> None:
        await _publish(self._nc, inbox, frame.SerializeToString(), request_id)

    async def _run(self, subject: str, handler: Handler, payload: bytes, inbox: str, request_id: str) -> None:
        """Run one request: ack, data*, then end or error; its task is cancelled on cancel."""
        items = None
        try:
            await self._send(inbox, request_id, pb.Frame(ack=True))
            items = handler(payload)
            async for item in items:
                await self._send(inbox, request_id, pb.Frame(data=item))
            await self._send(inbox, request_id, pb.Frame(end=True))
        except asyncio.CancelledError:
            # Client gone (its inbox ignores this) or we are shutting down (it learns why).
            err = EpdError(503, f"request {request_id} on {subject} was cancelled")
            await self._try_send(inbox, request_id, pb.Frame(error=err.to_proto()))
            raise
        except EpdError as e:
            await self._try_send(inbox, request_id, pb.Frame(error=e.to_proto()))
        except Exception as e:
            log.exception("handler for %s failed on request %s", subject, request_id)
            err = EpdError(500, f"{type(e).__name__}: {e}")
            await self._try_send(inbox, request_id, pb.Frame(error=err.to_proto()))
        finally:
            self._tasks.pop(inbox, None)
            # Close the generator now so its `finally` runs even if we were cancelled while
            # it was suspended at a yield (workers abort engine requests there).
            if items is not None and hasattr(items, "aclose"):
                try:
                    await items.aclose()
                except Exception:
                    log.exception("handler for %s failed while closing", subject)

    async def _try_send(self, inbox: str, request_id: str, frame: pb.Frame) -> None:
        try:
            await self._send(inbox, request_id, frame)
        except nats.errors.Error as e:
            log.warning("could not send %s to %s: %s", frame.WhichOneof("kind"), inbox, e)

    async def _heartbeats(self) -> None:
        """One loop for all in-flight requests, so an idle client knows the server lives."""
        beat = pb.Frame(heartbeat=True).SerializeToString()
        while True:
            await asyncio.sleep(self.timeouts.heartbeat_interval)
            for inbox in list(self._tasks):
                try:
                    await self._nc.publish(inbox, beat)
                except nats.errors.Error as e:
                    log.warning("heartbeat to %s failed: %s", inbox, e)

    async def stream(
        self, subject: str, payload: bytes, request_id: str, *, idle_timeout: float | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Send `payload` to the server of `subject` and yield each response item.

        Raises EpdError(503) if no server acks within the plane's `ack_timeout` or the stream
        is silent (not even heartbeats) for `idle_timeout` (default: `stream_idle_timeout`);
        re-raises the server's EpdError (handler bugs arrive as code 500); NATS failures become
        EpdError(503) too. Closing the generator early cancels the server's handler.
        """
        ack_timeout = self.timeouts.ack_timeout
        if idle_timeout is None:
            idle_timeout = self.timeouts.stream_idle_timeout
        inbox = self._nc.new_inbox()
        try:
            sub = await self._nc.subscribe(inbox)
        except nats.errors.Error as e:
            raise EpdError(503, f"request plane unavailable: {e!r}") from e
        replies = _Assembler(self.timeouts.partial_ttl)
        finished = False
        acked = False
        try:
            await _publish(self._nc, subject, payload, request_id, reply=inbox)
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle_timeout if acked else ack_timeout)
                except nats.errors.TimeoutError:
                    if not acked:
                        raise EpdError(503, f"no worker answered on {subject}") from None
                    raise EpdError(
                        503, f"worker on {subject} went silent for {idle_timeout}s (request {request_id})"
                    ) from None
                if (msg.headers or {}).get("Status") == "503":  # NATS: nobody subscribes
                    raise EpdError(503, f"no worker answered on {subject}")
                try:
                    data = replies.add(inbox, msg)
                except ValueError as e:
                    raise EpdError(503, f"reply from {subject} was cut: {e}") from None
                if data is None:
                    continue
                frame = pb.Frame.FromString(data)
                kind = frame.WhichOneof("kind")
                acked = True
                if kind == "data":
                    yield frame.data
                elif kind == "end":
                    finished = True
                    return
                elif kind == "error":
                    finished = True
                    raise EpdError.from_proto(frame.error)
        except nats.errors.Error as e:  # connection closed, reconnect buffer full, ...
            raise EpdError(503, f"request plane failed on {subject}: {e!r}") from e
        finally:
            if not finished:  # consumer stopped early, timed out, or was cancelled
                try:
                    await self._nc.publish(f"{subject}.cancel", inbox.encode())
                except nats.errors.Error as e:
                    log.warning("could not cancel request %s: %s", request_id, e)
            with contextlib.suppress(nats.errors.Error):  # a closed connection took the subscription along
                await sub.unsubscribe()

    async def close(self) -> None:
        """Stop taking requests, let in-flight handlers finish (cancel them after the plane's
        `drain_timeout`), then close the connection."""
        if self._nc.is_closed:
            return
        for sub in self._subs:
            await sub.unsubscribe()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=self.timeouts.drain_timeout)
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        try:
            await self._nc.drain()  # flushes the last frames, then closes
        except nats.errors.Error:  # reconnecting: nothing can be flushed anyway
            await self._nc.close()
