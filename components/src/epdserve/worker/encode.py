"""The encode worker roles: media in, embeddings handed to the worker that prefills.

`NixlEncodeHandler` (`--multimodal-encode-worker`) keeps embeddings in its NIXL-registered
cache and answers with where they are; the prefill side READs them and the READ's
notification unpins them. `StorageEncodeHandler` (`--native-encoder-worker`) writes them to
the embedding cache on disk instead. Both answer an `EncodeRequest` with one `EncodeResult`,
first delivered (a `MediaDelivery`) to the mailbox of the worker that prefills the request
when it names one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Sequence

import torch

from epdserve.config import TransferTimeouts
from epdserve.engine.base import embedding_rows
from epdserve.models.base import MediaEncoder
from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.runtime.mailbox import Post, post_delivery
from epdserve.transfer.agent import TransferAgent
from epdserve.transfer.hold import ReadHold
from epdserve.worker.ec_storage import EmbeddingStorage
from epdserve.worker.embedding_cache import CachedEmbedding, EmbeddingCache
from epdserve.worker.encode_batcher import EncodeBatcher
from epdserve.worker.media_sources import item_mm_kwargs

log = logging.getLogger(__name__)


class MediaEmbedder:
    """Media item -> its `[rows, H]` embedding (rows: its embed-mask positions): decode,
    preprocess, batched encode. Items with the same hash that are being encoded already wait
    for that encode."""

    def __init__(self, encoder: MediaEncoder, batcher: EncodeBatcher):
        self.encoder = encoder
        self.batcher = batcher
        self._in_flight: dict[str, asyncio.Future[torch.Tensor]] = {}
        self.encoded_items = 0

    async def embed(self, item: pb.MediaItem) -> torch.Tensor:
        future = self._in_flight.get(item.hash)
        if future is None:
            future = self._in_flight[item.hash] = asyncio.ensure_future(self._encode(item))
            future.add_done_callback(functools.partial(self._drop, item.hash))
        # Shielded: one request leaving must not cancel an encode others wait for.
        return await asyncio.shield(future)

    def stats(self) -> dict[str, int]:
        return {
            "encoded_items": self.encoded_items,
            "encoder_calls": self.batcher.calls,
            "encode_us": round(self.batcher.busy_s * 1e6),
        }

    def _drop(self, key: str, future: asyncio.Future[torch.Tensor]) -> None:
        self._in_flight.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved here: every waiter may have left

    async def _encode(self, item: pb.MediaItem) -> torch.Tensor:
        if item.WhichOneof("source") != "data" or not item.data:
            raise EpdError.bad_request(f"media item {item.hash[:16]} came without its data")
        self.encoded_items += 1
        features, embedding = await asyncio.to_thread(self._preprocess_and_maybe_encode, item)
        if embedding is None:
            embedding = await self.batcher.encode(item.modality, features)
        rows = embedding_rows(item.length, item.embed_mask)
        if embedding.shape[0] != rows:
            raise EpdError(
                500, f"media item {item.hash[:16]} gave {embedding.shape[0]} embeddings for {rows} placeholders"
            )
        return embedding

    def _preprocess_and_maybe_encode(self, item: pb.MediaItem) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """In a worker thread: the item's encoder inputs, and its embedding when the encoder
        was idle (one thread hop instead of three)."""
        features = self.encoder.features(item.modality, item.data, item_mm_kwargs(item))
        return features, self.batcher.encode_if_idle(item.modality, features)


def _result_item(item: pb.MediaItem) -> pb.MediaItem:
    return pb.MediaItem(modality=item.modality, hash=item.hash, offset=item.offset, length=item.length)


async def _answer(post: Post, req: pb.EncodeRequest, result: pb.EncodeResult) -> bytes:
    """`result` serialized, once delivered to `req.deliver_to` (when set) as the request's
    `MediaDelivery`: the worker waiting there gets it a hop sooner than through the processor."""
    if req.deliver_to:
        await post_delivery(post, req.deliver_to, pb.MediaDelivery(key=req.request_id, result=result))
    return result.SerializeToString()


class NixlEncodeHandler:
    """Serves `EncodeRequest` -> `EncodeResult` naming each embedding in the NIXL cache.

    The items stay pinned (a `ReadHold`) until the reader's READ notification arrives, the
    stream is cancelled, or `timeouts.embedding_hold_timeout` passes; then the stream ends.
    """

    def __init__(
        self,
        embedder: MediaEmbedder,
        cache: EmbeddingCache,
        agent: TransferAgent,
        post: Post,
        timeouts: TransferTimeouts,
    ):
        self.embedder = embedder
        self.cache = cache
        self.agent = agent
        self.post = post
        self.timeouts = timeouts

    async def encode(self, payload: bytes) -> AsyncIterator[bytes]:
        req = pb.EncodeRequest.FromString(payload)
        entries = await self._pinned_entries(req.media)
        with ReadHold(self.agent, req.request_id, lambda: self.cache.unpin(*entries), "the embeddings") as hold:
            result = pb.EncodeResult(handoff=hold.handoff())
            for item, entry in zip(req.media, entries, strict=True):
                out = _result_item(item)
                out.embedding.CopyFrom(self.cache.remote(entry))
                result.media.append(out)
            yield await _answer(self.post, req, result)
            await hold.wait(self.timeouts.embedding_hold_timeout)

    async def _pinned_entries(self, items: Sequence[pb.MediaItem]) -> list[CachedEmbedding]:
        """Each item's cache entry, pinned: hits as they are, misses encoded (concurrently)."""

        async def entry(item: pb.MediaItem) -> CachedEmbedding:
            if (hit := self.cache.lookup(item.hash)) is not None:
                return hit
            return self.cache.insert(item.hash, await self.embedder.embed(item))

        results = await asyncio.gather(*(entry(it) for it in items), return_exceptions=True)
        pinned = [r for r in results if isinstance(r, CachedEmbedding)]
        if len(pinned) < len(results):
            self.cache.unpin(*pinned)
            raise next(r for r in results if isinstance(r, BaseException))
        return pinned

    def stats(self) -> dict[str, int]:
        return self.agent.stats() | self.cache.stats() | self.embedder.stats()


class StorageEncodeHandler:
    """Serves `EncodeRequest` -> `EncodeResult` once every embedding is in the storage."""

    def __init__(self, embedder: MediaEmbedder, storage: EmbeddingStorage, post: Post):
        self.embedder = embedder
        self.storage = storage
        self.post = post
        self.hits = 0
        self.misses = 0

    async def encode(self, payload: bytes) -> AsyncIterator[bytes]:
        req = pb.EncodeRequest.FromString(payload)
        await asyncio.gather(*(self._store(item) for item in req.media))
        result = pb.EncodeResult()
        for item in req.media:
            out = _result_item(item)
            out.in_ec_storage = True
            result.media.append(out)
        yield await _answer(self.post, req, result)

    async def _store(self, item: pb.MediaItem) -> None:
        if self.storage.contains(item.hash):
            self.hits += 1
            return
        self.misses += 1
        embedding = await self.embedder.embed(item)
        await asyncio.to_thread(self.storage.save, item.hash, embedding)

    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses} | self.embedder.stats()
