"""Drives an `Engine` on its own thread and exposes per-request async output streams."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator

from epdserve.engine.base import Engine, EngineEvent, EngineOutput, EngineRequest

log = logging.getLogger(__name__)


class AsyncEngine:
    """Thread-safe front of an `Engine`.

    The engine runs on one background thread (torch releases the GIL, so the event loop
    stays responsive); requests, aborts, releases and loaded KV cross to it through a locked
    inbox, events come back through `loop.call_soon_threadsafe` into one asyncio queue per
    request.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cond = threading.Condition()
        self._adds: list[EngineRequest] = []
        self._aborts: list[str] = []
        self._releases: list[str] = []  # finished hold_kv requests whose held blocks are to be freed
        self._loaded: list[str] = []  # requests whose prefilled KV is in their blocks now
        self._queues: dict[str, asyncio.Queue[EngineEvent]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._dead: str | None = None  # set when the engine thread died
        self._inbox_rounds = 0  # times the engine thread took the inbox; under _cond
        self._settle_waiters: list[tuple[int, asyncio.Future[None]]] = []  # (round, future); under _cond
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        self._wake(self._take_settled(None))

    @property
    def num_requests(self) -> int:
        return len(self._queues)

    @property
    def _event_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "AsyncEngine.start was not called"
        return self._loop

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        """Stream a request's events (see `Engine`) until each of its choices finished or one
        failed: a `prefilled_token` request's `KVAdmitted` first, then its `EngineOutput`s.
        Closing the stream early aborts the request."""
        if self._dead:
            raise RuntimeError(self._dead)
        rid = request.request_id
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._queues[rid] = queue
        unfinished = request.sampling.n
        with self._cond:
            self._adds.append(request)
            self._cond.notify()
        try:
            while unfinished:
                event = await queue.get()
                if not isinstance(event, EngineOutput):  # KVAdmitted
                    yield event
                    continue
                unfinished -= event.finish_reason is not None
                yield event
                if event.error is not None:
                    return  # one error ends the request; `finally` aborts its other choices
        finally:
            del self._queues[rid]
            if unfinished:
                self._send(self._aborts, rid)

    def release(self, request_id: str) -> None:
        """Free the blocks a finished `hold_kv` request holds (`Engine.release`), before the
        engine's next step."""
        self._send(self._releases, request_id)

    def kv_loaded(self, request_id: str) -> None:
        """The prompt's KV of a `prefilled_token` request is in the blocks it was given."""
        self._send(self._loaded, request_id)

    def _send(self, inbox: list[str], request_id: str) -> None:
        """Put `request_id` into one of the engine thread's inboxes and wake it."""
        with self._cond:
            inbox.append(request_id)
            self._cond.notify()

    async def settled(self) -> None:
        """Return once every request, abort and release sent before the call is applied: no engine step
        that may still read an aborted request's inputs is running. Callers release memory
        that such inputs alias (e.g. embeddings in a transfer region) only after it."""
        future = asyncio.get_running_loop().create_future()
        with self._cond:
            if self._dead or self._stopped:
                return
            self._settle_waiters.append((self._inbox_rounds + 1, future))
            self._cond.notify()
        await future

    def _run(self) -> None:
        try:
            self._loop_forever()
        except BaseException as exc:  # never leave consumers waiting on a dead thread
            log.exception("engine thread died")
            self._dead = f"engine stopped: {exc}"
            self._event_loop.call_soon_threadsafe(self._fail_consumers)

    def _fail_consumers(self) -> None:
        self._deliver([EngineOutput(rid, [], "error", error=self._dead) for rid in self._queues])
        self._wake(self._take_settled(None))

    def _take_settled(self, up_to_round: int | None) -> list[asyncio.Future[None]]:
        """Remove and return the settle waiters of rounds <= `up_to_round` (None: all)."""
        with self._cond:
            ready = [f for r, f in self._settle_waiters if up_to_round is None or r <= up_to_round]
            self._settle_waiters = [
                (r, f) for r, f in self._settle_waiters if up_to_round is not None and r > up_to_round
            ]
        return ready

    @staticmethod
    def _wake(futures: list[asyncio.Future[None]]) -> None:
        for future in futures:
            if not future.done():
                future.set_result(None)

    def _loop_forever(self) -> None:
        live: dict[str, int] = {}  # request id -> unfinished choices inside the engine; this thread's
        while True:
            with self._cond:
                while not (
                    self._stopped
                    or self._adds
                    or self._aborts
                    or self._releases
                    or self._loaded
                    or self._settle_waiters
                    or self.engine.has_unfinished()
                ):
                    self._cond.wait()
                if self._stopped:
                    return
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                releases, self._releases = self._releases, []
                loaded, self._loaded = self._loaded, []
                self._inbox_rounds += 1
                round_ = self._inbox_rounds
            for req in adds:
                self.engine.add_request(req)
                live[req.request_id] = req.sampling.n
            for rid in loaded:
                self.engine.kv_loaded(rid)
            for rid in aborts:  # after adds: a request may be cancelled in the same batch
                self.engine.abort(rid)
                live.pop(rid, None)
            for rid in releases:
                self.engine.release(rid)
            if settled := self._take_settled(round_):  # the previous step is over, the inbox applied
                self._event_loop.call_soon_threadsafe(self._wake, settled)
            outputs: list[EngineEvent]
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug in a step fails the requests in it, not the worker
                log.exception("engine step failed")
                for rid in live:
                    self.engine.abort(rid)
                outputs = [EngineOutput(rid, [], "error", error=str(exc)) for rid in live]
                live.clear()
            for out in outputs:
                if isinstance(out, EngineOutput) and out.finish_reason is not None and out.request_id in live:
                    live[out.request_id] -= 1
                    if not live[out.request_id]:
                        del live[out.request_id]
            if outputs:  # one wake-up of the event loop per step, not per token
                self._event_loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[EngineEvent]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:  # absent when the consumer already left
                queue.put_nowait(out)
