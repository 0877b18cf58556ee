"""Per-request state inside the paged engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from epdserve.engine.base import EngineRequest, MultiModalInput
from epdserve.models.base import RopePositions


class SequenceStatus(Enum):
    WAITING = "waiting"  # not admitted, or preempted (its KV must be recomputed)
    LOADING = "loading"  # holds blocks; its prompt's KV comes from a prefill worker
    RUNNING = "running"  # holds blocks; prefilling (chunk by chunk) or decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request's tokens and where their KV lives.

    `token_ids` holds the prompt followed by the generated tokens. The KV of
    `token_ids[:num_computed_tokens]` is in the blocks of `block_table` (block_size tokens
    each, in order). Each scheduled step computes `token_ids[num_computed_tokens :
    num_computed_tokens + n]`; when that reaches `num_tokens` the step samples the next
    token. Prefill is the case n > 1 (chunked when the token budget is short); decode is the
    case of one uncomputed token, the last one sampled.
    """

    request: EngineRequest
    token_ids: list[int]
    num_prompt_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # of the last admission, served from the prefix cache
    block_table: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, in order
    awaiting_kv: bool = False  # admission loads the prompt's KV instead of computing it
    # Encoder outputs of the media items, kept while positions still need them.
    mm_embeddings: list[torch.Tensor | None] = field(default_factory=list)
    # M-RoPE models: its rotary positions, computed at its first chunk; a pure function of the
    # prompt, so they hold across preemption and recompute.
    rope: RopePositions | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def media(self) -> list[MultiModalInput]:
        return self.request.mm_inputs

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens
