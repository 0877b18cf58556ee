"""The PD worker role: prefill and decode, with media as bytes (EPD: encoded here) or as
embeddings an encode worker produced (E/PD)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from epdserve.engine.async_engine import AsyncEngine
from epdserve.engine.base import EngineRequest, SamplingParams, TokenLogprob
from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.worker.media_sources import MediaResolver


def sampling_from_proto(p: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                          seed=p.seed if p.HasField("seed") else None,
                          max_tokens=p.max_tokens, stop_token_ids=tuple(p.stop_token_ids),
                          repetition_penalty=p.repetition_penalty or 1.0, presence_penalty=p.presence_penalty,
                          frequency_penalty=p.frequency_penalty,
                          logprobs=p.logprobs if p.HasField("logprobs") else None, n=max(p.n, 1))


def logprob_to_proto(lp: TokenLogprob) -> pb.Logprob:
    return pb.Logprob(token_id=lp.token_id, logprob=lp.logprob,
                      top=[pb.Logprob(token_id=t, logprob=v) for t, v in lp.top])


class PDHandler:
    """Serves `GenerateRequest` -> stream of `TokenDelta`."""

    def __init__(self, engine: AsyncEngine, media: MediaResolver):
        self.engine = engine
        self.media = media

    async def generate(self, payload: bytes) -> AsyncIterator[bytes]:
        req = pb.GenerateRequest.FromString(payload)
        async with self.media.resolve(req) as mm_inputs:
            ereq = EngineRequest(req.request_id, list(req.token_ids), sampling_from_proto(req.sampling), mm_inputs)
            finished = False
            try:
                async with contextlib.aclosing(self.engine.generate(ereq)) as outputs:
                    async for out in outputs:
                        if out.error is not None:
                            raise EpdError(500, f"generation failed: {out.error}")
                        yield pb.TokenDelta(token_ids=out.new_token_ids, finish_reason=out.finish_reason or "",
                                            index=out.index,
                                            logprobs=[logprob_to_proto(lp) for lp in out.logprobs or ()]
                                            ).SerializeToString()
                finished = True
            finally:
                if not finished:   # aborted: a step in flight may still read the inputs
                    await self.engine.settled()
