"""Sending a request's media to an encode worker, and choosing which one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence

from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.runtime.pool import InstancePool
from epdserve.runtime.request_plane import RequestPlane

log = logging.getLogger(__name__)


class EncoderRouter:
    """Picks the encode worker for a request: the live one that recently encoded most of its
    items (its cache likely holds them), else the next in round-robin.

    Remembers the last `memory` items' encoders; an entry may be stale (evicted there), which
    costs one encode.
    """

    def __init__(self, pool: InstancePool, memory: int = 65536):
        self.pool = pool
        self.memory = memory
        self._holder: OrderedDict[str, str] = OrderedDict()  # media hash -> encoder instance id

    def pick(self, hashes: list[str], exclude: frozenset[str] = frozenset()) -> pb.ModelCard | None:
        """None when no encoder (outside `exclude`) is alive."""
        live = {c.instance_id: c for c in self.pool.cards() if c.instance_id not in exclude}
        if not live:
            return None
        votes: dict[str, int] = {}
        for h in hashes:
            if (holder := self._holder.get(h)) in live:
                votes[holder] = votes.get(holder, 0) + 1
        if votes:
            return live[max(votes, key=votes.__getitem__)]
        for _ in range(len(self.pool.cards())):  # round-robin, skipping excluded ones
            card = self.pool.pick()
            if card.instance_id in live:
                return card
        return next(iter(live.values()))

    @property
    def any_alive(self) -> bool:
        return bool(self.pool.cards())

    def record(self, instance_id: str, hashes: list[str]) -> None:
        for h in hashes:
            self._holder[h] = instance_id
            self._holder.move_to_end(h)
        while len(self._holder) > self.memory:
            self._holder.popitem(last=False)


class EncodeSession:
    """One request's encode. `start` sends the media to an encode worker, which posts a
    `MediaDelivery` to `deliver_to` (the mailbox of the worker that prefills the request) and
    answers its `EncodeResult` here too; `answered` resolves then, or fails when no encoder answers (one retry
    on another encoder if the first dies before it answers). The encoder's stream stays open
    until the worker has read the embeddings. `close` (always call it) cancels whatever still
    runs, which frees the embeddings at the encoder."""

    def __init__(self, plane: RequestPlane, router: EncoderRouter, request_id: str):
        self.plane = plane
        self.router = router
        self.request_id = request_id
        self.answered: asyncio.Future[None] | None = None
        self._holder: asyncio.Task | None = None

    def start(self, media: Sequence[pb.MediaItem], deliver_to: str) -> None:
        """Begin encoding; `media` may change once this returns (it is serialized here)."""
        payload = pb.EncodeRequest(request_id=self.request_id, media=media, deliver_to=deliver_to).SerializeToString()
        self.answered = asyncio.ensure_future(self._encode([m.hash for m in media], payload))

    async def _encode(self, hashes: list[str], payload: bytes) -> None:
        tried: set[str] = set()
        while (card := self.router.pick(hashes, frozenset(tried))) is not None:
            tried.add(card.instance_id)
            first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._holder = asyncio.create_task(
                self._hold(card.subject, payload, first), name=f"encode {self.request_id}"
            )
            await asyncio.wait([first, self._holder], return_when=asyncio.FIRST_COMPLETED)
            if first.done():
                self.router.record(card.instance_id, hashes)
                return
            error = self._holder.exception() or EpdError(500, f"encoder {card.instance_id} ended without a result")
            if not isinstance(error, EpdError) or error.code != 503 or len(tried) > 1:
                raise error
            log.warning("[%s] encoder %s failed (%s); trying another", self.request_id, card.instance_id, error.message)
        raise EpdError(503, "no live encode worker answered")

    async def _hold(self, subject: str, payload: bytes, first: asyncio.Future) -> None:
        stream: AsyncGenerator[bytes, None] = self.plane.stream(
            subject, payload, self.request_id, idle_timeout=self.plane.dead_server_timeout
        )
        async with contextlib.aclosing(stream):
            async for _ in stream:
                if not first.done():
                    first.set_result(None)

    async def close(self) -> None:
        for task in (self.answered, self._holder):
            if task is None:
                continue
            task.cancel()
            # The worker read the embeddings, or they are freed at the encoder now; a failure
            # was the request's error already, through `answered`.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
