"""Where a request runs: one worker that prefills and decodes, or a prefill worker and then
a decode worker (disaggregated), and the stream of its tokens either way."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.runtime.pool import InstancePool
from epdserve.runtime.request_plane import RequestPlane

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """`prefill` runs the prompt and samples the first token, then `worker` decodes from its
    KV; without `prefill`, `worker` does both."""

    worker: pb.ModelCard
    prefill: pb.ModelCard | None = None

    @property
    def prefiller(self) -> pb.ModelCard:
        """The worker that runs the prompt (and so takes its media)."""
        return self.prefill or self.worker


class Router:
    """Routes over three pools of one model's workers: `aggregated` (PD workers), `prefill`
    and `decode`. A request goes disaggregated while both a prefill and a decode worker live
    (one choice only: n > 1 shares the prompt's blocks in one engine), else to a PD worker,
    else to a decode worker, which then prefills itself."""

    def __init__(self, plane: RequestPlane, aggregated: InstancePool, prefill: InstancePool, decode: InstancePool):
        self.plane = plane
        self.aggregated = aggregated
        self.prefill = prefill
        self.decode = decode

    @property
    def any_alive(self) -> bool:
        """Whether some worker can run a request from start to end."""
        return bool(self.aggregated.cards() or self.decode.cards())

    def route(self, n: int) -> Route:
        """Raises EpdError(503) when no worker can take the request."""
        if n == 1 and self.prefill.cards() and self.decode.cards():
            return Route(self.decode.pick(), self.prefill.pick())
        if self.aggregated.cards():
            return Route(self.aggregated.pick())
        return Route(self.decode.pick())

    def tokens(self, route: Route, gen: pb.GenerateRequest) -> AsyncGenerator[bytes, None]:
        """The request's `TokenDelta`s; closing the stream cancels it wherever it runs."""
        if route.prefill is None:
            return self.plane.stream(route.worker.subject, gen.SerializeToString(), gen.request_id)
        return self._disaggregated(route.prefill, route.worker, gen)

    async def _disaggregated(
        self, prefiller: pb.ModelCard, decoder: pb.ModelCard, gen: pb.GenerateRequest
    ) -> AsyncGenerator[bytes, None]:
        rid = gen.request_id
        prefill = self.plane.stream(
            prefiller.subject, gen.SerializeToString(), rid, idle_timeout=self.plane.dead_server_timeout
        )
        # Open until the decode side is done: closing it frees the KV at the prefill worker, if
        # the decode worker's READ has not already.
        async with contextlib.aclosing(prefill):
            data = await anext(prefill, None)
            if data is None:
                raise EpdError(500, f"prefill worker {prefiller.instance_id} ended without a token")
            yield data
            first = pb.TokenDelta.FromString(data)
            if first.finish_reason:
                return
            if not first.HasField("kv"):
                raise EpdError(500, f"prefill worker {prefiller.instance_id} sent no KV handoff")
            log.info("[%s] prefilled by %s, decoding on %s", rid, prefiller.instance_id, decoder.instance_id)
            # No retry on another decode worker: a READ that completed freed the KV there.
            decode = self.plane.stream(
                decoder.subject,
                decode_request(gen, first.kv).SerializeToString(),
                rid,
                idle_timeout=self.plane.dead_server_timeout,
            )
            async with contextlib.aclosing(decode):
                async for data in decode:
                    yield data


def decode_request(gen: pb.GenerateRequest, kv: pb.KVHandoff) -> pb.GenerateRequest:
    """`gen` for a decode worker: the prompt and its media's positions and hashes (its prefix
    cache keys), no media sources; the prompt's KV is where `kv` says."""
    req = pb.GenerateRequest(request_id=gen.request_id, token_ids=gen.token_ids, sampling=gen.sampling, kv=kv)
    for m in gen.media:
        req.media.add(modality=m.modality, hash=m.hash, offset=m.offset, length=m.length, embed_mask=m.embed_mask)
    return req
