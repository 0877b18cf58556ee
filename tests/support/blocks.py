"""Block-manager test helpers: sequences, media items, and a shadow of what the KV slots hold."""

from __future__ import annotations

from collections.abc import Iterable

from epdserve.engine.base import EngineRequest, MultiModalInput, SamplingParams
from epdserve.engine.block_manager import BlockManager
from epdserve.engine.sequence import Sequence


def make_seq(rid: str, prompt: list[int], media: Iterable[MultiModalInput] = (),
             max_tokens: int = 8, stop: tuple[int, ...] = ()) -> Sequence:
    sampling = SamplingParams(max_tokens=max_tokens, stop_token_ids=stop)
    request = EngineRequest(rid, list(prompt), sampling, list(media))
    return Sequence(request=request, token_ids=list(prompt), num_prompt_tokens=len(prompt))


def image(h: str, offset: int, length: int) -> MultiModalInput:
    return MultiModalInput("image", h, offset, length)


class ShadowKV:
    """What the model would have written: (token id, media item hash or None) per KV slot.

    Checks that whatever a sequence reads from its blocks is what it would have computed
    itself, which catches wrong prefix hits and writes into shared blocks.
    """

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots: dict[tuple[int, int], tuple[int, str | None]] = {}

    @staticmethod
    def expected(seq: Sequence, pos: int) -> tuple[int, str | None]:
        item = next((m.hash for m in seq.media if m.offset <= pos < m.offset + m.length), None)
        return seq.token_ids[pos], item

    def _slot(self, seq: Sequence, pos: int) -> tuple[int, int]:
        return seq.block_table[pos // self.bm.block_size], pos % self.bm.block_size

    def compute(self, seq: Sequence, start: int, num_tokens: int) -> None:
        for pos in range(start, start + num_tokens):
            self.slots[self._slot(seq, pos)] = self.expected(seq, pos)

    def check(self, seq: Sequence) -> None:
        for pos in range(seq.num_computed_tokens):
            assert self.slots.get(self._slot(seq, pos)) == self.expected(seq, pos), (seq, pos)


def check_refcounts(bm: BlockManager, live: list[Sequence]) -> None:
    """The pool's invariants, `live` being every sequence that holds blocks."""
    bm.check_invariants(live)
    assert bm.num_free_blocks == bm.num_blocks - len({b for seq in live for b in seq.block_table})
