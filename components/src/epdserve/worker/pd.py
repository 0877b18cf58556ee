"""The worker roles that run the language model: PD (prefill and decode), prefill, decode.

Media arrive as bytes (EPD: encoded here), as embeddings an encode worker produced (E/PD), or
not at all: a decode worker's request continues from a prefill worker's first token, and
its prompt's KV is READ from the prefill worker into the blocks the engine gives it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import replace

from epdserve.engine.async_engine import AsyncEngine
from epdserve.engine.base import EngineOutput, EngineRequest, KVAdmitted, SamplingParams, TokenLogprob
from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.transfer.hold import ReadHold
from epdserve.worker.kv_transfer import KVTransfer
from epdserve.worker.media_sources import MediaResolver, placed_input

log = logging.getLogger(__name__)


def sampling_from_proto(p: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        max_tokens=p.max_tokens,
        stop_token_ids=tuple(p.stop_token_ids),
        repetition_penalty=p.repetition_penalty or 1.0,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        n=max(p.n, 1),
    )


def logprob_to_proto(lp: TokenLogprob) -> pb.Logprob:
    return pb.Logprob(
        token_id=lp.token_id, logprob=lp.logprob, top=[pb.Logprob(token_id=t, logprob=v) for t, v in lp.top]
    )


def _delta(out: EngineOutput, finish_reason: str | None) -> pb.TokenDelta:
    return pb.TokenDelta(
        token_ids=out.new_token_ids,
        finish_reason=finish_reason or "",
        index=out.index,
        logprobs=[logprob_to_proto(lp) for lp in out.logprobs or ()],
    )


async def _outputs(
    engine: AsyncEngine,
    request: EngineRequest,
    on_admitted: Callable[[KVAdmitted], Awaitable[None]] | None = None,
) -> AsyncGenerator[EngineOutput, None]:
    """`request`'s outputs; an error output raises. A `prefilled_token` request's `KVAdmitted`
    goes to `on_admitted` (which loads the KV and calls `kv_loaded`) before any output. Leaving
    early returns only once the engine dropped the request: a step in flight may still read its
    inputs, which can alias memory that the caller frees next (embeddings in a transfer region)."""
    finished = False
    try:
        async with contextlib.aclosing(engine.generate(request)) as events:
            async for event in events:
                if isinstance(event, KVAdmitted):
                    if on_admitted is None:
                        raise EpdError(500, "the engine gave KV blocks to a request that loads no KV")
                    await on_admitted(event)
                    continue
                if event.error is not None:
                    raise EpdError(500, f"generation failed: {event.error}")
                yield event
        finished = True
    finally:
        if not finished:
            await engine.settled()


class PDHandler:
    """Serves `GenerateRequest` -> stream of `TokenDelta`. With `kv` (decode workers), a request
    carrying a `KVHandoff` goes on from the prefill worker's first token after its prompt's KV
    is READ; requests without one are prefilled here."""

    def __init__(self, engine: AsyncEngine, media: MediaResolver, kv: KVTransfer | None = None):
        self.engine = engine
        self.media = media
        self.kv = kv

    async def generate(self, payload: bytes) -> AsyncIterator[bytes]:
        req = pb.GenerateRequest.FromString(payload)
        sampling = sampling_from_proto(req.sampling)
        if req.HasField("kv"):
            async for delta in self._decode(req, sampling):
                yield delta
            return
        async with self.media.resolve(req) as mm_inputs:
            ereq = EngineRequest(req.request_id, list(req.token_ids), sampling, mm_inputs)
            async for out in _outputs(self.engine, ereq):
                yield _delta(out, out.finish_reason).SerializeToString()

    async def _decode(self, req: pb.GenerateRequest, sampling: SamplingParams) -> AsyncIterator[bytes]:
        if self.kv is None:
            raise EpdError(503, "this worker takes no KV from prefill workers")
        received = time.monotonic()
        # The media items come without data: the prompt's blocks are keyed by their hashes (a
        # prefix cache hit needs the same media), never computed here.
        ereq = EngineRequest(
            req.request_id,
            list(req.token_ids),
            sampling,
            [placed_input(m) for m in req.media],
            prefilled_token=req.kv.first_token,
            rope_delta=req.kv.rope_delta if req.kv.HasField("rope_delta") else None,
        )
        kv = self.kv

        async def load(admitted: KVAdmitted) -> None:  # its blocks wait for the prompt's KV
            await kv.load(req.kv, admitted.blocks, admitted.cached_blocks, received)
            self.engine.kv_loaded(admitted.request_id)

        async for out in _outputs(self.engine, ereq, on_admitted=load):
            yield _delta(out, out.finish_reason).SerializeToString()


class PrefillHandler:
    """Serves `GenerateRequest` -> one `TokenDelta`: the first token, with a `KVHandoff` of the
    prompt's KV unless the request finished with it. The blocks stay held (a `ReadHold`), and
    the stream open, until the decode worker's READ notifies, the stream is cancelled, or
    `hold_timeout` seconds pass; the engine releases them then, and in every other path."""

    def __init__(
        self,
        engine: AsyncEngine,
        media: MediaResolver,
        kv: KVTransfer,
        hold_timeout: float,
    ):
        self.engine = engine
        self.media = media
        self.kv = kv
        self.hold_timeout = hold_timeout

    async def generate(self, payload: bytes) -> AsyncIterator[bytes]:
        req = pb.GenerateRequest.FromString(payload)
        rid = req.request_id
        sampling = sampling_from_proto(req.sampling)
        with ReadHold(self.kv.agent, rid, lambda: self.engine.release(rid), "the prompt's KV") as hold:
            async with self.media.resolve(req) as mm_inputs:
                ereq = EngineRequest(rid, list(req.token_ids), replace(sampling, max_tokens=1), mm_inputs, hold_kv=True)
                (out,) = [o async for o in _outputs(self.engine, ereq)]
            # The engine stopped at one token: the request ends here only if the token did.
            finished = out.finish_reason == "stop" or sampling.max_tokens <= 1
            delta = _delta(out, out.finish_reason if finished else None)
            if finished:
                yield delta.SerializeToString()
                return
            if out.held_blocks is None:
                raise EpdError(500, "the engine held no KV blocks for the prompt")
            delta.kv.CopyFrom(self.kv.handoff(hold.expect(), out.held_blocks, out.new_token_ids[0], self.hold_timeout))
            if out.rope_delta is not None:
                delta.kv.rope_delta = out.rope_delta
            yield delta.SerializeToString()
            await hold.wait(self.hold_timeout)
