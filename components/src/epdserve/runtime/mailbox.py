"""The encoder -> prefilling worker hand-off: a `MediaDelivery`, posted straight to the worker.

An encode worker posts a request's `MediaDelivery` (its `EncodeResult`, keyed by the request
id) to the mailbox of the worker that prefills it (`EncodeRequest.deliver_to`), so that the
result skips a hop through the processor. That worker's `GenerateRequest` names the key in
`media_mailbox_key`. The request and its delivery travel separately (from the processor and
from the encoder), so either may arrive first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from google.protobuf.message import DecodeError

from epdserve.config import TransferTimeouts
from epdserve.protocol import epdserve_pb2 as pb

log = logging.getLogger(__name__)

MAILBOX_SUFFIX = ".mailbox"

Post = Callable[[str, bytes, str], Awaitable[None]]  # (subject, payload, request id), as RequestPlane.post


def mailbox_subject(subject: str) -> str:
    """The mailbox of the worker that serves `subject`."""
    return subject + MAILBOX_SUFFIX


async def post_delivery(post: Post, subject: str, delivery: pb.MediaDelivery) -> None:
    """Send `delivery` to the mailbox `subject` (a `mailbox_subject`), under its key."""
    await post(subject, delivery.SerializeToString(), delivery.key)


class Mailbox:
    """Key -> the first `MediaDelivery` posted under it, until `take` claims it.

    `put` is the request plane's listener for the mailbox subject. A delivery nobody claims
    within `ttl` seconds (its request failed or went elsewhere, or a retried encode posted a
    second one) is dropped. Used from the event loop only.
    """

    def __init__(self, ttl: float = TransferTimeouts.mailbox_ttl):
        self.ttl = ttl
        self._waiting: dict[str, asyncio.Future[pb.MediaDelivery]] = {}
        self._unclaimed: dict[str, tuple[float, pb.MediaDelivery]] = {}  # key -> (arrived, delivery)

    def put(self, request_id: str, payload: bytes) -> None:
        """A posted `MediaDelivery` (serialized; `request_id`: the post's, for the log)."""
        try:
            delivery = pb.MediaDelivery.FromString(payload)
        except DecodeError:
            log.warning("[%s] dropping a mailbox message that is no MediaDelivery", request_id)
            return
        self.deliver(delivery)

    def deliver(self, delivery: pb.MediaDelivery) -> None:
        self._expire()
        key = delivery.key
        waiter = self._waiting.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(delivery)
        elif key not in self._unclaimed:
            self._unclaimed[key] = (time.monotonic(), delivery)

    async def take(self, key: str, timeout: float) -> pb.MediaDelivery:
        """The delivery under `key`, waiting for it up to `timeout` seconds (TimeoutError)."""
        if (kept := self._unclaimed.pop(key, None)) is not None:
            return kept[1]
        waiter: asyncio.Future[pb.MediaDelivery] = asyncio.get_running_loop().create_future()
        self._waiting[key] = waiter
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            if self._waiting.get(key) is waiter:
                del self._waiting[key]

    @property
    def unclaimed(self) -> int:
        self._expire()
        return len(self._unclaimed)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl
        for key in [k for k, (arrived, _) in self._unclaimed.items() if arrived < cutoff]:
            del self._unclaimed[key]
