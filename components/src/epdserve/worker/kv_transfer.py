"""A worker's KV pool over NIXL: prefill workers hand a prompt's blocks out, decode workers
READ them into their own blocks.

The pool is registered once, at start-up, with the worker's agent. A decode worker READs
only the blocks its prefix cache lacks, every layer's K and V in one transfer (runs of blocks
consecutive on both sides as one range each); the READ's notification tells the prefill
worker it may free them.
"""

from __future__ import annotations

import time

from epdserve.attention.kv_cache import KVCache
from epdserve.config import TransferTimeouts
from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.transfer.agent import TransferAgent
from epdserve.transfer.kv_layout import KVLayout, paired_ranges


class KVTransfer:
    """`kv`'s pool registered with `agent`. `timeouts.read_timeout` bounds one load; no load
    starts within `timeouts.kv_hold_margin` of the end of the holder's hold."""

    def __init__(self, agent: TransferAgent, kv: KVCache, timeouts: TransferTimeouts):
        agent.register(kv.pool)
        self.agent = agent
        self.layout = KVLayout.of(kv)
        self.timeouts = timeouts
        self.blocks_read = 0
        self.blocks_cached = 0  # blocks a load skipped: the decode side's prefix cache had them
        self.bytes_read = 0
        self.read_s = 0.0

    def handoff(self, notif: bytes, blocks: list[int], first_token: int, hold_s: float) -> pb.KVHandoff:
        """How a decode worker finds `blocks` (a prompt's KV, in order) here, held for `hold_s`
        seconds from now; its READ sends `notif` back."""
        return pb.KVHandoff(
            holder=self.agent.handoff(notif),
            layout=self.layout.to_proto(),
            blocks=blocks,
            first_token=first_token,
            hold_ms=round(hold_s * 1000),
        )

    async def load(self, handoff: pb.KVHandoff, blocks: list[int], cached: int, received: float) -> None:
        """READ the prompt KV `handoff` names into `blocks` (ours, in order), except the first
        `cached`, which hold it already; the holder is notified either way. `received`: when
        the handoff arrived (`time.monotonic()`). EpdError(503) when the holder is gone, the
        READ fails, or the holder's hold may have run out (it may have reused the blocks);
        500 when the pools do not match."""
        if time.monotonic() - received > handoff.hold_ms / 1000 - self.timeouts.kv_hold_margin:
            raise EpdError(
                503,
                f"the prefill worker's hold on the prompt's KV ({handoff.hold_ms} ms) ran out "
                "before this worker could read it; the decode workers are overloaded",
            )
        if len(blocks) != len(handoff.blocks):
            raise EpdError(
                500,
                f"the prefill worker holds {len(handoff.blocks)} KV blocks of the prompt, "
                f"this worker gave it {len(blocks)}",
            )
        self.blocks_cached += cached
        if cached == len(blocks):
            self.agent.notify(handoff.holder)
            return
        try:
            mine, theirs = paired_ranges(
                self.layout, blocks[cached:], KVLayout.from_proto(handoff.layout), list(handoff.blocks[cached:])
            )
        except ValueError as exc:
            raise EpdError(500, f"the prefill worker's KV cache does not match this worker's: {exc}") from None
        start = time.perf_counter()
        await self.agent.read_ranges(handoff.holder, mine, theirs, self.timeouts.read_timeout)
        self.read_s += time.perf_counter() - start
        self.blocks_read += len(blocks) - cached
        self.bytes_read += sum(n for _, n in mine)

    def stats(self) -> dict[str, int]:
        return {
            "kv_blocks_read": self.blocks_read,
            "kv_blocks_cached": self.blocks_cached,
            "kv_bytes_read": self.bytes_read,
            "kv_read_us": round(self.read_s * 1e6),
        }
