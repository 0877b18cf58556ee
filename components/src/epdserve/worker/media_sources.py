"""A generate request's media items -> engine inputs, from wherever each item comes.

An item arrives as its encoded bytes (EPD: this worker encodes it), as embeddings in an
encode worker's NIXL memory (E/PD: one READ per request into this worker's registered
staging region), or as embeddings in the embedding cache on disk (the EC-connector topology).
In the last two cases the request comes without the items' sources: it names the key of the
`MediaDelivery` the encode worker posts to this worker's mailbox once it has encoded them.

READ embeddings stay where they landed, in the staging region, for the request's lifetime:
copying them out into fresh memory costs about 1 ms per MB in page faults, several times the
READ itself. While the region is more than half full, a request's embeddings are copied out
and its span freed at once instead, so that a burst never waits for long generations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import torch

from epdserve.config import TransferTimeouts
from epdserve.engine.base import MultiModalInput, embed_mask_from_bytes, embedding_rows
from epdserve.models.base import NO_MM_KWARGS, MediaEncoder, MMKwargs
from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.runtime.mailbox import Mailbox
from epdserve.transfer.agent import TransferAgent, torch_dtype
from epdserve.transfer.region import Span
from epdserve.worker.ec_storage import EmbeddingStorage


def apply_encode_result(req: pb.GenerateRequest, result: pb.EncodeResult) -> None:
    """Point `req`'s media items at where the encoder put their embeddings (its NIXL memory or
    the embedding storage)."""
    if len(result.media) != len(req.media):
        raise EpdError(500, f"the encode worker answered {len(result.media)} media item(s) for {len(req.media)}")
    for item, encoded in zip(req.media, result.media, strict=True):
        if encoded.WhichOneof("source") == "embedding":
            item.embedding.CopyFrom(encoded.embedding)
        else:
            item.in_ec_storage = True
    req.handoff.CopyFrom(result.handoff)


def placed_input(item: pb.MediaItem) -> MultiModalInput:
    """`item`'s place in the prompt (positions, hash, embed mask, grid) as an engine input,
    still without its features or embeddings."""
    grid = tuple(item.grid)
    return MultiModalInput(
        item.modality,
        item.hash,
        item.offset,
        item.length,
        embed_mask=embed_mask_from_bytes(item.embed_mask),
        grid=(grid[0], grid[1], grid[2]) if len(grid) == 3 else None,
    )


def item_mm_kwargs(item: pb.MediaItem) -> MMKwargs:
    """The processing options the processor checked for `item`."""
    return json.loads(item.mm_kwargs) if item.mm_kwargs else NO_MM_KWARGS


class MediaResolver:
    """`agent` is None on workers that cannot receive embeddings over NIXL, `storage` None
    without `--ec-storage-path`, `mailbox` None on workers that take no media from encode
    workers. `timeouts.read_timeout` bounds the wait for staging room plus the READ;
    `timeouts.encoder_result_timeout` the wait for an encoder's delivery."""

    def __init__(
        self,
        model: MediaEncoder,
        agent: TransferAgent | None,
        storage: EmbeddingStorage | None,
        mailbox: Mailbox | None,
        timeouts: TransferTimeouts,
    ):
        self.model = model
        self.agent = agent
        self.storage = storage
        self.mailbox = mailbox
        self.timeouts = timeouts
        self._freed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def resolve(self, req: pb.GenerateRequest) -> AsyncIterator[list[MultiModalInput]]:
        """The request's engine inputs, valid until the context exits (the engine must be
        done with them by then)."""
        if req.media_mailbox_key:
            await self._await_encoder(req)
        remote = [i for i, item in enumerate(req.media) if item.WhichOneof("source") == "embedding"]
        held: Span | None = None
        try:
            embeddings = {}
            if remote:
                tensors, held = await self._read(req, [req.media[i] for i in remote])
                embeddings = dict(zip(remote, tensors, strict=True))
            # Decoding and resizing a photo, or reading a file, takes ms: keep it off the event loop.
            local = len(remote) < len(req.media)
            yield await asyncio.to_thread(self._inputs, req, embeddings) if local else self._inputs(req, embeddings)
        finally:
            if held is not None:
                self._release(held)

    async def _await_encoder(self, req: pb.GenerateRequest) -> None:
        if self.mailbox is None:
            raise EpdError(503, "this worker takes no media from encode workers")
        try:
            delivery = await self.mailbox.take(req.media_mailbox_key, self.timeouts.encoder_result_timeout)
        except TimeoutError:
            waited = self.timeouts.encoder_result_timeout
            raise EpdError(
                503, f"no encode worker delivered the media of request {req.request_id} in {waited:.0f} s"
            ) from None
        apply_encode_result(req, delivery.result)

    def _inputs(self, req: pb.GenerateRequest, embeddings: dict[int, torch.Tensor]) -> list[MultiModalInput]:
        inputs = []
        for i, item in enumerate(req.media):
            mm = placed_input(item)
            source = item.WhichOneof("source")
            if source == "data":
                mm.features = self.model.features(item.modality, item.data, item_mm_kwargs(item))
            elif source == "embedding":
                mm.embeddings = embeddings[i]
            elif source == "in_ec_storage":
                mm.embeddings = self._stored(item)
            else:
                raise EpdError.bad_request(f"media item {item.hash[:16]} has no data")
            inputs.append(mm)
        return inputs

    def _stored(self, item: pb.MediaItem) -> torch.Tensor:
        if self.storage is None:
            raise EpdError(503, "this worker has no --ec-storage-path to read embeddings from")
        rows = embedding_rows(item.length, item.embed_mask)
        embedding = self.storage.load(item.hash, rows)
        if embedding is None:
            raise EpdError(503, f"embedding of media item {item.hash[:16]} ({rows} rows) is not in {self.storage.root}")
        return embedding.to(self.model.device)

    async def _read(self, req: pb.GenerateRequest, items: list[pb.MediaItem]) -> tuple[list[torch.Tensor], Span | None]:
        """The items' embeddings, and the staging span they alias (None: copied out, freed)."""
        agent = self._nixl
        tensors = [item.embedding for item in items]
        for item, t in zip(items, tensors, strict=True):
            rows = embedding_rows(item.length, item.embed_mask)
            if len(t.shape) != 2 or t.shape[0] != rows:
                raise EpdError(
                    500, f"embedding of media item {item.hash[:16]} has shape {list(t.shape)} for {rows} placeholders"
                )
        deadline = time.monotonic() + self.timeouts.read_timeout
        nbytes = sum(t.nbytes for t in tensors)
        allocator = agent.allocator
        hold = allocator.allocated_bytes + nbytes <= allocator.capacity // 2
        span = await self._alloc(nbytes, deadline)
        try:
            offsets = await agent.read(req.handoff, tensors, span, max(deadline - time.monotonic(), 0.001))
            views = [
                agent.view(Span(span.offset + off, t.nbytes), torch_dtype(t.dtype), tuple(t.shape))
                for off, t in zip(offsets, tensors, strict=True)
            ]
        except BaseException:
            self._release(span)
            raise
        if hold:
            return views, span
        copies = [v.clone() for v in views]
        self._release(span)
        return copies, None

    @property
    def _nixl(self) -> TransferAgent:
        if self.agent is None:
            raise EpdError(503, "this worker cannot receive embeddings over NIXL")
        return self.agent

    def _release(self, span: Span) -> None:
        self._nixl.free(span)
        self._freed.set()

    async def _alloc(self, nbytes: int, deadline: float) -> Span:
        """A staging span, waiting for other requests' reads to free room until `deadline`."""
        agent = self._nixl
        if nbytes > agent.allocator.capacity:
            raise EpdError(
                503,
                f"the request's embeddings ({nbytes} bytes) exceed this worker's "
                f"--embedding-buffer-bytes ({agent.allocator.capacity})",
            )
        while (span := agent.alloc(nbytes)) is None:
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), deadline - time.monotonic())
            except TimeoutError:
                raise EpdError(503, "no room to receive embeddings: too many requests in flight") from None
        return span
