"""The paged engine: block pool, continuous batching scheduler, batched model runner."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch

from epdserve.engine.base import Engine, EngineOutput, EngineRequest
from epdserve.engine.block_manager import BlockManager
from epdserve.engine.model_runner import ModelRunner
from epdserve.engine.sampling import make_generator
from epdserve.engine.scheduler import Scheduler, SchedulerConfig
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
        self._rejected: list[EngineOutput] = []
        self._tokens_computed = 0
        self._generated_tokens = 0
        self._prompt_step_s = 0.0
        self._origin: dict[str, tuple[str, int]] = {}  # sequence id -> (request id, choice index)
        self._choice_ids: dict[str, list[str]] = {}  # request id -> its sequence ids (n > 1)
        self._forks: dict[str, list[tuple[int, EngineRequest]]] = {}  # choice 0 -> (index, choice) waiting
        self._held: dict[str, Sequence] = {}  # finished hold_kv request id -> its sequence
        log.info("KV cache: %d blocks of %d tokens", num_blocks, config.block_size)

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request. With n > 1, choice 0 is prefilled first and the other choices
        join once its prompt blocks are committed, so they hit them in the prefix cache."""
        n = request.sampling.n
        if n > 1 and (request.hold_kv or request.prefilled_token is not None):
            self._rejected.append(
                EngineOutput(
                    request.request_id, [], "error", error="a request prefilled apart samples one choice (n=1)"
                )
            )
            return
        if n == 1:
            self._admit(request, request.request_id, 0)
            return
        choices = [self._choice(request, i) for i in range(n)]
        self._choice_ids[request.request_id] = [c.request_id for c in choices]
        self._admit(choices[0], request.request_id, 0)
        self._forks[choices[0].request_id] = list(enumerate(choices))[1:]

    @staticmethod
    def _choice(request: EngineRequest, index: int) -> EngineRequest:
        seed = request.sampling.seed
        sampling = replace(request.sampling, n=1, seed=None if seed is None else (seed + index) % 2**64)
        return EngineRequest(f"{request.request_id}#{index}", request.prompt_token_ids, sampling, request.mm_inputs)

    def _admit(self, request: EngineRequest, origin: str, index: int) -> None:
        self._origin[request.request_id] = (origin, index)
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
            self._origin.pop(request.request_id)
            self._rejected.append(EngineOutput(origin, [], "error", index=index, error=str(exc)))

    def abort(self, request_id: str) -> None:
        for sid in self._choice_ids.pop(request_id, [request_id]):
            if (held := self._held.pop(sid, None)) is not None:
                self.blocks.free(held)
            self._forks.pop(sid, None)
            self._origin.pop(sid, None)
            self.scheduler.abort(sid)

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
            len(self._held),
        )

    def _hold(self, seq: Sequence) -> list[int] | None:
        """For a finished `hold_kv` sequence: keep it (its blocks stay referenced until `abort`)
        and return the blocks holding its prompt's KV."""
        if not seq.request.hold_kv:
            return None
        self._held[seq.request_id] = seq
        return self._prompt_blocks(seq)

    def _prompt_blocks(self, seq: Sequence) -> list[int]:
        return seq.block_table[: self.blocks.num_blocks_for(seq.num_prompt_tokens)]

    @torch.inference_mode()
    def step(self) -> list[EngineOutput]:
        outputs, self._rejected = self._rejected, []
        chunks = self.scheduler.schedule()
        for seq in self.scheduler.take_admitted_for_kv():
            origin, index = self._origin[seq.request_id]
            outputs.append(
                EngineOutput(
                    origin,
                    [],
                    index=index,
                    kv_blocks=self._prompt_blocks(seq),
                    kv_cached_blocks=seq.num_cached_tokens // self.blocks.block_size,
                )
            )
        if not chunks:
            return outputs
        start = time.perf_counter()
        result = self.runner.run(chunks)
        if any(c.start < c.seq.num_prompt_tokens for c in chunks):
            self._prompt_step_s += time.perf_counter() - start
        for sid, message in result.failed.items():
            self.scheduler.abort(sid)
            origin, index = self._origin.pop(sid)
            outputs.append(EngineOutput(origin, [], "error", index=index, error=message))
        ran = [c for c in chunks if c.seq.request_id not in result.failed]
        self._tokens_computed += sum(c.num_tokens for c in ran)
        self._generated_tokens += len(result.sampled)
        finished = {seq.request_id: reason for seq, reason in self.scheduler.finish_step(ran, result.sampled)}
        for chunk in ran:
            sid = chunk.seq.request_id
            token = result.sampled.get(sid)
            if token is None:
                continue
            origin, index = self._origin[sid]
            for i, choice in self._forks.pop(sid, ()):  # choice 0's prompt is cached: the others start
                self._admit(choice, origin, i)
            if sid in finished:
                del self._origin[sid]
                if origin in self._choice_ids and not any(c in self._origin for c in self._choice_ids[origin]):
                    del self._choice_ids[origin]
            logprob = result.logprobs.get(sid)
            outputs.append(
                EngineOutput(
                    origin,
                    [token],
                    finished.get(sid),
                    index=index,
                    logprobs=[logprob] if logprob else None,
                    kv_blocks=self._hold(chunk.seq) if sid in finished else None,
                )
            )
        return outputs
