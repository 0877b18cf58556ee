"""Sending a request's media to an encode worker, and choosing which one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator

from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.runtime.pool import InstancePool
from epdserve.runtime.request_plane import HEARTBEAT_INTERVAL, RequestPlane

log = logging.getLogger(__name__)

# A live encoder heartbeats every HEARTBEAT_INTERVAL s: three missed beats mean it died.
ENCODE_IDLE_TIMEOUT = 3 * HEARTBEAT_INTERVAL


class EncoderRouter:
    """Picks the encode worker for a request: the live one that recently encoded most of its
    items (its cache likely holds them), else the next in round-robin.

    Remembers the last `memory` items' encoders; an entry may be stale (evicted there), which
    costs one encode.
    """

    def __init__(self, pool: InstancePool, memory: int = 65536):
        self.pool = pool
        self.memory = memory
        self._holder: OrderedDict[str, str] = OrderedDict()   # media hash -> encoder instance id

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
        for _ in range(len(self.pool.cards())):   # round-robin, skipping excluded ones
            card = self.pool.pick()
            if card.instance_id in live:
                return card
        return next(iter(live.values()))

    def record(self, instance_id: str, hashes: list[str]) -> None:
        for h in hashes:
            self._holder[h] = instance_id
            self._holder.move_to_end(h)
        while len(self._holder) > self.memory:
            self._holder.popitem(last=False)


class EncodeSession:
    """One request's encode: `start` returns the `EncodeResult`; the encoder's stream stays
    open in a task until the worker has read the embeddings. `close` (always call it) cancels
    the stream if it is still open, which frees the embeddings at the encoder."""

    def __init__(self, plane: RequestPlane, router: EncoderRouter, request_id: str):
        self.plane = plane
        self.router = router
        self.request_id = request_id
        self._holder: asyncio.Task | None = None

    async def start(self, media: list[pb.MediaItem]) -> pb.EncodeResult | None:
        """The result from a live encoder, trying a second one if the first dies before it
        answers; None when no encoder is alive (the PD worker encodes itself)."""
        hashes = [m.hash for m in media]
        tried: set[str] = set()
        payload = pb.EncodeRequest(request_id=self.request_id, media=media).SerializeToString()
        while (card := self.router.pick(hashes, frozenset(tried))) is not None:
            tried.add(card.instance_id)
            first: asyncio.Future[pb.EncodeResult] = asyncio.get_running_loop().create_future()
            self._holder = asyncio.create_task(self._hold(card.subject, payload, first),
                                               name=f"encode {self.request_id}")
            await asyncio.wait([first, self._holder], return_when=asyncio.FIRST_COMPLETED)
            if first.done():
                self.router.record(card.instance_id, hashes)
                return first.result()
            error = self._holder.exception() or EpdError(500, f"encoder {card.instance_id} ended without a result")
            if not isinstance(error, EpdError) or error.code != 503 or len(tried) > 1:
                raise error
            log.warning("[%s] encoder %s failed (%s); trying another", self.request_id, card.instance_id, error.message)
        if tried:
            raise EpdError(503, "no live encode worker answered")
        return None

    async def _hold(self, subject: str, payload: bytes, first: asyncio.Future) -> None:
        stream: AsyncIterator[bytes] = self.plane.stream(subject, payload, self.request_id,
                                                         idle_timeout=ENCODE_IDLE_TIMEOUT)
        async with contextlib.aclosing(stream):
            async for data in stream:
                if not first.done():
                    first.set_result(pb.EncodeResult.FromString(data))

    async def close(self) -> None:
        if self._holder is None:
            return
        self._holder.cancel()
        try:
            await self._holder
        except (asyncio.CancelledError, EpdError):
            pass   # the worker read the embeddings, or they are freed at the encoder now
