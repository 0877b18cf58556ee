"""Memory handed out for a peer to READ, held until the READ is done: one protocol for the
encode worker's embeddings (read by the worker that prefills) and a prefill worker's KV blocks
(read by a decode worker).

The contract of `ReadHold`, the only way either holder keeps memory for a reader:

1. Enter it (`with ReadHold(agent, request_id, release, what) as hold:`) once the memory is
   held (pinned cache entries, engine blocks): from then on `release` is owed.
2. `hold.expect()` (or `hold.handoff()`, which wraps it in this agent's `EmbeddingHandoff`)
   gives the notification the reader's READ sends back; the hold expects it from that call
   on, so a READ that completes before `wait` is still seen. Put it in the answer.
3. `await hold.wait(timeout)`: returns True once the READ's notification arrived, False
   (logged) when `timeout` seconds passed first, or when nothing was handed out.
4. Leaving the block, however (returned, raised, cancelled, or the stream closed at the
   `yield` that sent the answer), the agent forgets the notification and `release` runs,
   exactly once. A late READ's notification is then ignored; the reader guards against
   reading reused memory with its own deadline (`KVHandoff.hold_ms`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from types import TracebackType

from epdserve.protocol import epdserve_pb2 as pb
from epdserve.transfer.agent import TransferAgent

log = logging.getLogger(__name__)


class ReadHold:
    """`release` (no arguments) frees what a reader was to READ; `what` names it in the log
    (e.g. "the embeddings"). The notification is `<request_id>/<8 hex digits>`: unique per
    hold, so a retried request's READ never ends another hold."""

    def __init__(self, agent: TransferAgent, request_id: str, release: Callable[[], None], what: str):
        self.agent = agent
        self.request_id = request_id
        self.what = what
        self.notif = f"{request_id}/{uuid.uuid4().hex[:8]}".encode()
        self._release = release
        self._read: asyncio.Future[None] | None = None
        self._released = False

    def expect(self) -> bytes:
        """Start expecting the READ's notification; returns it, for the handoff."""
        if self._read is None:
            self._read = self.agent.expect(self.notif)
        return self.notif

    def handoff(self) -> pb.EmbeddingHandoff:
        """How a reader finds this agent, with the notification its READ sends (`expect`)."""
        return self.agent.handoff(self.expect())

    async def wait(self, timeout: float) -> bool:
        """True once the reader's READ notified; False when `timeout` seconds passed first."""
        if self._read is None:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(self._read), timeout)
        except TimeoutError:
            log.warning("[%s] nobody read %s in %.0f s; freeing them", self.request_id, self.what, timeout)
            return False
        return True

    def __enter__(self) -> ReadHold:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Forget the notification and release the memory (once; later calls do nothing)."""
        if self._released:
            return
        self._released = True
        self.agent.forget(self.notif)
        self._release()
