"""The paged engine: block pool, continuous batching scheduler, batched model runner.

`PagedEngine.step` is schedule -> run -> postprocess. Around it, small owners keep the
bookkeeping: `Scheduler` the queues and their blocks, `ChoiceFanout` the n > 1 choices of a
request, `HeldKV` the blocks of finished `hold_kv` requests until `release`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from epdserve.engine.base import Engine, EngineEvent, EngineOutput, EngineRequest, KVAdmitted
from epdserve.engine.block_manager import BlockManager
from epdserve.engine.fanout import ChoiceFanout
from epdserve.engine.held_kv import HeldKV
from epdserve.engine.model_runner import ModelRunner, StepResult
from epdserve.engine.sampling import make_generator
from epdserve.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from epdserve.engine.sequence import Sequence
from epdserve.models.base import MultimodalModel

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_MEMORY = 2 << 30


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # wins over kv_cache_memory
    kv_cache_memory: int | None = None  # bytes; default: enough for max_num_seqs full sequences, at most 2 GiB
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def num_blocks(self, bytes_per_block: int) -> int:
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        per_seq = -(-self.scheduler.max_model_len // self.block_size)
        budget = self.kv_cache_memory or min(
            DEFAULT_KV_CACHE_MEMORY, per_seq * self.scheduler.max_num_seqs * bytes_per_block
        )
        return max(budget // bytes_per_block, per_seq)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics; token counts are cumulative (rates come from two snapshots)."""

    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    tokens_computed: int  # positions run through the model: prefill, recompute, decode
    generated_tokens: int
    prompt_step_us: int  # wall time of the steps that ran a prompt chunk (media encode included)
    held_requests: int  # finished `hold_kv` requests whose blocks are kept

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class PagedEngine(Engine):
    def __init__(self, model: MultimodalModel, config: EngineConfig):
        num_blocks = config.num_blocks(model.kv_bytes_per_block(config.block_size))
        self.kv = model.allocate_kv_cache(num_blocks, config.block_size)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.runner = ModelRunner(model, self.kv)
        self.choices = ChoiceFanout()
        self.held = HeldKV(self.blocks)
        self._rejected: list[EngineEvent] = []  # refused at `add_request`, answered by the next step
        self._tokens_computed = 0
        self._generated_tokens = 0
        self._prompt_step_s = 0.0
        log.info("KV cache: %d blocks of %d tokens", num_blocks, config.block_size)

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request. With n > 1, choice 0 is prefilled first and the other choices
        join once its prompt blocks are committed, so they hit them in the prefix cache."""
        if request.sampling.n > 1 and (request.hold_kv or request.prefilled_token is not None):
            error = "a request prefilled apart samples one choice (n=1)"
            self._rejected.append(EngineOutput(request.request_id, [], "error", error=error))
            return
        self._admit(self.choices.split(request), request.request_id, 0)

    def _admit(self, request: EngineRequest, origin: str, index: int) -> None:
        """Queue the sequence of `request`, choice `index` of request `origin`."""
        self.choices.track(request.request_id, origin, index)
        seq = Sequence(
            request,
            list(request.prompt_token_ids),
            len(request.prompt_token_ids),
            generator=make_generator(request.sampling),
        )
        if request.prefilled_token is not None:
            seq.token_ids.append(request.prefilled_token)
            seq.awaiting_kv = True
        try:
            self.scheduler.add(seq)
        except ValueError as exc:  # can never fit: answer at the next step
            self.choices.done(request.request_id)
            self._rejected.append(EngineOutput(origin, [], "error", index=index, error=str(exc)))

    def abort(self, request_id: str) -> None:
        for sid in self.choices.drop(request_id):
            self.held.release(sid)
            self.scheduler.abort(sid)

    def release(self, request_id: str) -> None:
        self.held.release(request_id)

    def kv_loaded(self, request_id: str) -> None:
        seq = next((s for s in self.scheduler.loading if s.request_id == request_id), None)
        if seq is not None:  # else aborted meanwhile
            self.scheduler.kv_loaded(seq)

    def has_unfinished(self) -> bool:
        return bool(self._rejected) or self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        b = self.blocks
        return EngineStats(
            len(self.scheduler.running),
            len(self.scheduler.waiting),
            b.num_blocks,
            b.num_free_blocks,
            b.prefix_queries,
            b.prefix_hits,
            self._tokens_computed,
            self._generated_tokens,
            round(self._prompt_step_s * 1e6),
            len(self.held),
        )

    @torch.inference_mode()
    def step(self) -> list[EngineEvent]:
        """Schedule, run the model on the scheduled chunks, postprocess what it produced.

        Events of the step: refusals of the requests added since the last step, a `KVAdmitted`
        for each `prefilled_token` request admitted now, then each scheduled sequence's failure
        or sampled token (an `EngineOutput` under its request's id and choice index).
        """
        events, self._rejected = self._rejected, []
        chunks = self.scheduler.schedule()
        for seq in self.scheduler.take_admitted_for_kv():
            cached = seq.num_cached_tokens // self.blocks.block_size
            events.append(KVAdmitted(seq.request_id, self.blocks.prompt_blocks(seq), cached))
        if chunks:
            self._postprocess(chunks, self._run(chunks), events)
        return events

    def _run(self, chunks: list[ScheduledChunk]) -> StepResult:
        start = time.perf_counter()
        result = self.runner.run(chunks)
        if any(c.start < c.seq.num_prompt_tokens for c in chunks):
            self._prompt_step_s += time.perf_counter() - start
        return result

    def _postprocess(self, chunks: list[ScheduledChunk], result: StepResult, events: list[EngineEvent]) -> None:
        """Retire failed sequences, record the step in the scheduler, and append each sampled
        token to `events`; start the siblings of a choice 0 that sampled its first token."""
        for sid, message in result.failed.items():
            self.scheduler.abort(sid)
            origin, index = self.choices.done(sid)
            events.append(EngineOutput(origin, [], "error", index=index, error=message))
        ran = [c for c in chunks if c.seq.request_id not in result.failed] if result.failed else chunks
        self._tokens_computed += sum(c.num_tokens for c in ran)
        self._generated_tokens += len(result.sampled)
        finished = {seq.request_id: reason for seq, reason in self.scheduler.finish_step(ran, result.sampled)}
        for chunk in ran:
            seq = chunk.seq
            sid = seq.request_id
            token = result.sampled.get(sid)
            if token is None:
                continue
            origin, index = self.choices.origin(sid)
            for i, choice in self.choices.take_siblings(sid):  # choice 0's prompt is cached: the others start
                self._admit(choice, origin, i)
            reason = finished.get(sid)
            held = rope_delta = None
            if reason is not None:
                self.choices.done(sid)
                if seq.request.hold_kv:
                    held = self.held.hold(seq)
                    rope_delta = seq.rope.delta if seq.rope is not None else None
            logprob = result.logprobs.get(sid)
            events.append(
                EngineOutput(
                    origin,
                    [token],
                    reason,
                    index=index,
                    logprobs=[logprob] if logprob else None,
                    held_blocks=held,
                    rope_delta=rope_delta,
                )
            )

    def check_invariants(self) -> None:
        """Raise AssertionError, with what is wrong, unless the engine's bookkeeping agrees:
        waiting sequences hold no blocks; the block pool is consistent with the running,
        loading and held sequences (`BlockManager.check_invariants`); held sequences are
        finished and not live; every live sequence, and only those, is tracked by the fan-out.

        For tests, after any `step`: O(pool + sequences), never called on the hot path.
        """
        sched = self.scheduler
        for seq in sched.waiting:
            assert not seq.block_table, f"waiting {seq.request_id} holds blocks {seq.block_table}"
        live = [*sched.running, *sched.loading]
        held = list(self.held.sequences)
        self.held.check_invariants()
        live_ids = {s.request_id for s in live}
        both = live_ids & {s.request_id for s in held}
        assert not both, f"requests {sorted(both)} are both live and held"
        self.blocks.check_invariants(live + held, held)
        self.choices.check_invariants()
        queued = live_ids | {s.request_id for s in sched.waiting}
        tracked = set(self.choices.tracked)
        assert tracked == queued, f"tracked but not queued: {tracked - queued}; queued, untracked: {queued - tracked}"
