"""One-shot messages about a request, posted straight to the worker that serves it.

An encode worker posts a request's `EncodeResult` to the mailbox of the worker that prefills
it, so that the result skips a hop through the processor. The request and its message travel
separately (from the processor and from the encoder), so either may arrive first.
"""

from __future__ import annotations

import asyncio
import time

MAILBOX_SUFFIX = ".mailbox"


def mailbox_subject(subject: str) -> str:
    """The mailbox of the worker that serves `subject`."""
    return subject + MAILBOX_SUFFIX


class Mailbox:
    """Request id -> the first message posted for it, until `take` claims it.

    A message nobody claims within `ttl` seconds (its request failed or went elsewhere, or a
    retried encode posted a second one) is dropped. Used from the event loop only.
    """

    def __init__(self, ttl: float = 60.0):
        self.ttl = ttl
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._unclaimed: dict[str, tuple[float, bytes]] = {}  # request id -> (arrived, payload)

    def put(self, request_id: str, payload: bytes) -> None:
        self._expire()
        waiter = self._waiting.pop(request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(payload)
        elif request_id not in self._unclaimed:
            self._unclaimed[request_id] = (time.monotonic(), payload)

    async def take(self, request_id: str, timeout: float) -> bytes:
        """The request's message, waiting for it up to `timeout` seconds (TimeoutError)."""
        if (kept := self._unclaimed.pop(request_id, None)) is not None:
            return kept[1]
        waiter = self._waiting[request_id] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            if self._waiting.get(request_id) is waiter:
                del self._waiting[request_id]

    @property
    def unclaimed(self) -> int:
        self._expire()
        return len(self._unclaimed)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl
        for request_id in [r for r, (arrived, _) in self._unclaimed.items() if arrived < cutoff]:
            del self._unclaimed[request_id]
