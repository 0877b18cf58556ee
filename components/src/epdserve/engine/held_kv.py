"""The prompt blocks of finished `hold_kv` requests, kept for a reader until released."""

from __future__ import annotations

from collections.abc import Collection

from epdserve.engine.block_manager import BlockManager
from epdserve.engine.sequence import Sequence, SequenceStatus


class HeldKV:
    """Finished `hold_kv` sequences whose blocks stay referenced (neither freed nor reused)
    until `release`: a prefill worker's prompt KV waiting for a decode worker's READ."""

    def __init__(self, blocks: BlockManager):
        self._blocks = blocks
        self._held: dict[str, Sequence] = {}  # request id -> its finished sequence

    def hold(self, seq: Sequence) -> list[int]:
        """Keep finished `seq`'s blocks; return those holding its prompt's KV, in order."""
        self._held[seq.request_id] = seq
        return self._blocks.prompt_blocks(seq)

    def release(self, request_id: str) -> bool:
        """Free a held request's blocks; False if it holds none (unknown, or released already)."""
        seq = self._held.pop(request_id, None)
        if seq is None:
            return False
        self._blocks.free(seq)
        return True

    @property
    def sequences(self) -> Collection[Sequence]:
        return self._held.values()

    def __len__(self) -> int:
        return len(self._held)

    def check_invariants(self) -> None:
        """Raise AssertionError if a held sequence is not a finished `hold_kv` one with its
        prompt's blocks (tests; not on the hot path)."""
        for rid, seq in self._held.items():
            assert seq.request_id == rid, f"held {rid} is sequence {seq.request_id}"
            assert seq.request.hold_kv and seq.status is SequenceStatus.FINISHED, f"held {rid}: {seq.status}"
            need = self._blocks.num_blocks_for(seq.num_prompt_tokens)
            assert len(seq.block_table) >= need, f"held {rid}: {len(seq.block_table)} blocks for a prompt of {need}"
