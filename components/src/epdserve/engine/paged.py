"""The paged engine: block pool, continuous batching scheduler, batched model runner."""

from __future__ import annotations

import logging
from dataclasses import dataclass

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
    num_kv_blocks: int | None = None       # wins over kv_cache_memory
    kv_cache_memory: int | None = None     # bytes; default: enough for max_num_seqs full sequences, at most 2 GiB
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def num_blocks(self, bytes_per_block: int) -> int:
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        per_seq = -(-self.max_model_len // self.block_size)
        budget = self.kv_cache_memory or min(DEFAULT_KV_CACHE_MEMORY, per_seq * self.max_num_seqs * bytes_per_block)
        return max(budget // bytes_per_block, per_seq)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_cache_queries: int
    prefix_cache_hits: int


class PagedEngine(Engine):
    def __init__(self, model: MultimodalModel, config: EngineConfig):
        num_blocks = config.num_blocks(model.kv_bytes_per_block(config.block_size))
        self.kv = model.allocate_kv_cache(num_blocks, config.block_size)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.max_model_len), self.blocks)
        self.runner = ModelRunner(model, self.kv, config.block_size)
        self._rejected: list[EngineOutput] = []
        log.info("KV cache: %d blocks of %d tokens", num_blocks, config.block_size)

    def add_request(self, request: EngineRequest) -> None:
        seq = Sequence(request, list(request.prompt_token_ids), len(request.prompt_token_ids),
                       generator=make_generator(request.sampling))
        try:
            self.scheduler.add(seq)
        except ValueError as exc:   # can never fit: answer at the next step
            self._rejected.append(EngineOutput(request.request_id, [], "error", error=str(exc)))

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._rejected) or self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        b = self.blocks
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), b.num_blocks,
                           b.num_free_blocks, b.prefix_queries, b.prefix_hits)

    @torch.inference_mode()
    def step(self) -> list[EngineOutput]:
        outputs, self._rejected = self._rejected, []
        chunks = self.scheduler.schedule()
        if not chunks:
            return outputs
        result = self.runner.run(chunks)
        for rid, message in result.failed.items():
            self.scheduler.abort(rid)
            outputs.append(EngineOutput(rid, [], "error", error=message))
        ran = [c for c in chunks if c.seq.request_id not in result.failed]
        finished = {seq.request_id: reason for seq, reason in self.scheduler.finish_step(ran, result.sampled)}
        for chunk in ran:
            seq = chunk.seq
            token = result.sampled.get(seq.request_id)
            if token is None:
                continue
            first = seq.num_output_tokens == 1
            logprob = result.logprobs.get(seq.request_id)
            outputs.append(EngineOutput(seq.request_id, [token], finished.get(seq.request_id),
                                        num_prompt_tokens=seq.num_prompt_tokens if first else 0,
                                        logprobs=[logprob] if logprob else None))
        return outputs
