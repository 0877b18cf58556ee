"""The engine contract: requests with token ids and media in, tokens out.

The engine knows nothing of NATS, etcd, HTTP or NIXL; `AsyncEngine` drives any `Engine`
from an asyncio program, and tests drive it in-process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 means off
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()  # EOS ids, unless the request ignores EOS, and extras
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k: the sampled token's and the top k
    n: int = 1  # choices sampled from one prompt (its blocks shared)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability and the `top` (token id, logprob) alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class MultiModalInput:
    """One media item of a prompt, spliced in at `token_ids[offset : offset + length]`.

    Exactly one of `features` (encoder inputs, e.g. pixel_values, encoded by the engine) or
    `embeddings` (`[num_embeddings, E]`, already encoded) is set. Items of one modality with
    `features` are encoded together, as `transformers` does for one prompt. `embed_mask`
    (bool `[length]`) names the positions that take embedding rows, in order; the others keep
    their token's embedding (Llama 4's tile separators). None: every position.
    """

    modality: str
    hash: str
    offset: int
    length: int
    features: dict[str, torch.Tensor] | None = None
    embeddings: torch.Tensor | None = None
    embed_mask: torch.Tensor | None = None
    grid: tuple[int, int, int] | None = None  # its patch grid, for M-RoPE models (`Expansion.grid`)

    @property
    def num_embeddings(self) -> int:
        """Rows of the item's embedding: its masked positions, or all `length`."""
        return self.length if self.embed_mask is None else int(self.embed_mask.sum())


def embed_mask_from_bytes(mask: bytes) -> torch.Tensor | None:
    """A wire embed mask (one byte 0/1 a position; empty: every position) as `embed_mask`."""
    return torch.tensor(list(mask), dtype=torch.bool) if mask else None


def embedding_rows(length: int, mask: bytes) -> int:
    """Embedding rows of an item of `length` positions with the wire embed mask `mask`."""
    return mask.count(1) if mask else length


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    mm_inputs: list[MultiModalInput] = field(default_factory=list)
    # Keep the prompt's KV blocks once the request finishes (its finishing output names them
    # in `held_blocks`) until `Engine.release`: a prefill worker's blocks wait there for a
    # decode worker to read them.
    hold_kv: bool = False
    # The decode side: the first output token, sampled by a prefill worker. On admission the
    # engine emits a `KVAdmitted` naming the blocks for the prompt's KV; the caller loads it
    # there and calls `kv_loaded`; decoding goes on from this token.
    prefilled_token: int | None = None
    # With `prefilled_token`, for models with rotary positions of several axes (M-RoPE): the
    # shift of the positions after the prompt, as the prefill worker's `EngineOutput.rope_delta`
    # gave it (the prompt's own positions are never needed here).
    rope_delta: int | None = None


@dataclass
class EngineOutput:
    """Tokens a request produced in one step; `finish_reason` is set on its last output."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS) or "length"; each choice finishes once
    index: int = 0  # the choice, when the request samples n > 1
    error: str | None = None  # set when the request failed inside the engine
    logprobs: list[TokenLogprob] | None = None  # one per new token, when requested
    # Set on the finishing output of a `hold_kv` request only: the blocks holding its
    # prompt's KV, in order, kept for the caller (not freed, not reused) until
    # `Engine.release(request_id)`.
    held_blocks: list[int] | None = None
    # With `held_blocks`, for M-RoPE models: the shift of positions after the prompt, which
    # whoever decodes from the held KV passes on as `EngineRequest.rope_delta`.
    rope_delta: int | None = None


@dataclass(frozen=True)
class KVAdmitted:
    """A `prefilled_token` request was admitted: load its prompt's KV into `blocks`, then call
    `Engine.kv_loaded(request_id)`; the request produces no tokens before that.

    `blocks` are the request's blocks for its prompt, in order; the first `cached_blocks` of
    them already hold their KV (prefix cache hits) and need no load. Emitted once, before any
    `EngineOutput` of the request; never for a request without `prefilled_token`.
    """

    request_id: str
    blocks: list[int]
    cached_blocks: int = 0


# What `Engine.step` returns and `AsyncEngine.generate` yields, per request in step order.
EngineEvent = EngineOutput | KVAdmitted


class Engine(ABC):
    """Single-threaded core: `add_request`, `abort`, `release` and `kv_loaded` between `step`
    calls, never during.

    A request's events, in order: at most one `KVAdmitted` (a `prefilled_token` request
    only), then `EngineOutput`s until each of its choices finished (`finish_reason` set) or one
    failed (`error` set).
    """

    @abstractmethod
    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; its events appear in later `step` results."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Drop a live request (queued, loading or running) and free its blocks at once; a
        finished `hold_kv` request's held blocks are freed too, so that a caller giving up
        never leaks them. Unknown ids are ignored."""

    @abstractmethod
    def release(self, request_id: str) -> None:
        """Free the blocks a finished `hold_kv` request holds (its `held_blocks`): the reader
        is done with them. Not an abort: a live or unknown request is not touched."""

    @abstractmethod
    def kv_loaded(self, request_id: str) -> None:
        """The prompt's KV of a `prefilled_token` request is in its blocks: decode it."""

    @abstractmethod
    def step(self) -> list[EngineEvent]:
        """Advance every scheduled request by one model call; return the events of the step."""

    @abstractmethod
    def has_unfinished(self) -> bool:
        """True while any request is queued or running."""
