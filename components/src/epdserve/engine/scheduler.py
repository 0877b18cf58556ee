"""Continuous batching with a token budget per step, chunked prefill and preemption.

One engine step is `schedule()` -> run the model on the chunks -> `finish_step()`. Each step:

1. every running sequence with one uncomputed token (decoding) gets that token. Its KV block is
   made to exist here, at schedule time (`BlockManager.append`), before the model writes KV at
   position `num_tokens - 1`. When the pool is short, the most recently admitted running
   sequence is preempted (blocks freed, KV to be recomputed, back to the FRONT of the waiting
   queue with its prompt and outputs so far) until the block fits, or the sequence preempts
   itself if it is the most recent one;
2. running sequences still prefilling continue with chunks of `min(uncomputed, budget left)`;
3. if nothing was preempted, waiting sequences are admitted in FCFS order while a slot, budget
   and blocks for all their tokens remain; the first that does not fit stops admission (no
   overtaking). Admission allocates blocks; prefix-cache hits count as computed tokens.

A request that could never fit the pool is refused by `add` (ValueError), so the head of the
waiting queue can always be admitted once the running ones finish: no deadlock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from epdserve.engine.block_manager import BlockManager
from epdserve.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # token budget per step (prefill chunks + decodes)
    max_model_len: int = 2048
    # Decode tokens whose blocks are taken at admission, as one run of consecutive blocks
    # where the pool has one: attention reads such KV in place instead of gathering it.
    reserve_window: int = 256

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len) <= 0:
            raise ValueError(f"scheduler limits must be positive: {self}")


@dataclass
class ScheduledChunk:
    """Compute `seq.token_ids[start : start + num_tokens]` this step.

    `samples` (the chunk reaches the end of the sequence: sample a token) is fixed when the
    chunk is made, so it stays right after `finish_step` appended the sampled token.
    """

    seq: Sequence
    start: int  # == seq.num_computed_tokens at scheduling time
    num_tokens: int
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_tokens == self.seq.num_tokens


class Scheduler:
    """Decides which tokens of which sequences each step computes; owns their blocks."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # in admission order: the last is preempted first
        self._loading: list[Sequence] = []  # admitted, their prompt's KV being loaded
        self._admitted_for_kv: list[Sequence] = []  # loading since the last `take_admitted_for_kv`

    @property
    def waiting(self) -> tuple[Sequence, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    @property
    def loading(self) -> tuple[Sequence, ...]:
        return tuple(self._loading)

    def take_admitted_for_kv(self) -> list[Sequence]:
        """Sequences admitted to LOADING since the last call: their KV is to be loaded."""
        taken, self._admitted_for_kv = self._admitted_for_kv, []
        return taken

    def kv_loaded(self, seq: Sequence) -> None:
        """`seq`'s prompt KV is in its blocks: it decodes from its last (prefilled) token."""
        self._loading.remove(seq)
        seq.awaiting_kv = False
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.blocks.commit(seq)
        seq.status = SequenceStatus.RUNNING
        self._running.append(seq)

    def add(self, seq: Sequence) -> None:
        """Queue `seq` (FCFS). Raises ValueError for an empty prompt, a prompt longer than
        `max_model_len`, or one whose longest possible length needs more than the whole pool.
        """
        n = seq.num_tokens
        if n == 0:
            raise ValueError(f"request {seq.request_id}: empty prompt")
        if n > self.config.max_model_len:
            raise ValueError(
                f"request {seq.request_id}: prompt of {n} tokens exceeds max_model_len {self.config.max_model_len}"
            )
        longest = self._longest(seq)
        if self.blocks.num_blocks_for(longest) > self.blocks.num_blocks:
            raise ValueError(
                f"request {seq.request_id}: {longest} tokens need more KV blocks than the "
                f"{self.blocks.num_blocks} of the pool"
            )
        seq.status = SequenceStatus.WAITING
        self._waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Drop the request from either queue and free its blocks now; True if it was found."""
        for queue in (self._waiting, self._running, self._loading):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    if seq in self._admitted_for_kv:
                        self._admitted_for_kv.remove(seq)
                    self.blocks.free(seq)
                    seq.status = SequenceStatus.FINISHED
                    return True
        return False

    def has_unfinished(self) -> bool:
        """Whether a step has work: loading sequences wait for `kv_loaded`, not for steps."""
        return bool(self._waiting or self._running)

    def schedule(self) -> list[ScheduledChunk]:
        """The chunks to compute this step (see the module docstring for the policy)."""
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted = False

        for seq in list(self._running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed_tokens != 1:
                continue  # preempted just now, or still prefilling
            # Victims are taken from the end: they are newer than `seq`, hence not yet scheduled.
            while not self.blocks.can_append(seq):
                victim = self._running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.blocks.append(seq)
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, 1))
                budget -= 1

        for seq in self._running:
            if budget == 0:
                break
            if seq.num_uncomputed_tokens > 1:
                chunks.append(self._chunk(seq, budget))
                budget -= chunks[-1].num_tokens

        # After a preemption the pool is short: admitting would only throw work out again.
        while (
            not preempted
            and budget > 0
            and self._waiting
            and len(self._running) + len(self._loading) < self.config.max_num_seqs
            and self.blocks.can_allocate(self._waiting[0], self._reserve(self._waiting[0]))
        ):
            seq = self._waiting.popleft()
            self.blocks.allocate(seq, self._reserve(seq))
            if seq.awaiting_kv:  # no compute: its KV is loaded, then it decodes
                seq.status = SequenceStatus.LOADING
                self._loading.append(seq)
                self._admitted_for_kv.append(seq)
                continue
            seq.status = SequenceStatus.RUNNING
            self._running.append(seq)
            chunks.append(self._chunk(seq, budget))
            budget -= chunks[-1].num_tokens
        return chunks

    def finish_step(self, chunks: list[ScheduledChunk], sampled: dict[str, int]) -> list[tuple[Sequence, str]]:
        """Record what the model computed; append sampled tokens; retire finished sequences.

        `sampled` maps the request id of every chunk with `samples` to its new token. Returns
        the sequences that finished, with "stop" (a stop token) or "length" (max_tokens or
        max_model_len reached); their blocks are already freed, except those of `hold_kv`
        sequences, which the caller frees (`BlockManager.free`) when it is done with them.
        """
        finished: list[tuple[Sequence, str]] = []
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_tokens
            self.blocks.commit(seq)
            if not chunk.samples:
                continue
            token = sampled[seq.request_id]
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self._running.remove(seq)
                if not seq.request.hold_kv:
                    self.blocks.free(seq)
                seq.status = SequenceStatus.FINISHED
                finished.append((seq, reason))
        return finished

    def _reserve(self, seq: Sequence) -> int:
        """Tokens to hold blocks for at admission: the whole request if short, else a window
        of decode, so decoding rarely needs new (non-consecutive) blocks."""
        return min(self._longest(seq), seq.num_tokens + self.config.reserve_window)

    def _longest(self, seq: Sequence) -> int:
        """Tokens `seq` can ever hold: its prompt plus max_tokens, within max_model_len."""
        return min(seq.num_prompt_tokens + seq.request.sampling.max_tokens, self.config.max_model_len)

    def _chunk(self, seq: Sequence, budget: int) -> ScheduledChunk:
        return ScheduledChunk(seq, seq.num_computed_tokens, min(seq.num_uncomputed_tokens, budget))

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and requeue it first; its tokens so far become its prompt to
        recompute (its own committed blocks may still hit in the prefix cache)."""
        self._running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self._waiting.appendleft(seq)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        sampling = seq.request.sampling
        if token in sampling.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= sampling.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None
