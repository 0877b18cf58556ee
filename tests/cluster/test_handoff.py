"""The encode worker posts a request's MediaDelivery straight to the prefilling worker's mailbox."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
import torch

from epdserve.config import PlaneTimeouts, TransferTimeouts
from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.runtime.mailbox import Mailbox, mailbox_subject
from epdserve.runtime.request_plane import RequestPlane
from epdserve.worker.media_sources import MediaResolver, apply_encode_result


def _delivery(key: str, *hashes: str) -> pb.MediaDelivery:
    return pb.MediaDelivery(key=key, result=pb.EncodeResult(media=[pb.MediaItem(hash=h) for h in hashes]))


async def test_a_message_waits_for_its_taker_and_a_taker_for_its_message():
    box = Mailbox()
    box.put("early", _delivery("early", "1").SerializeToString())
    assert await box.take("early", timeout=0.1) == _delivery("early", "1")
    waiting = asyncio.ensure_future(box.take("late", timeout=1))
    await asyncio.sleep(0.01)
    box.deliver(_delivery("late", "2"))
    box.deliver(_delivery("late", "3"))   # claimed already: kept for nobody until the ttl
    assert await waiting == _delivery("late", "2")
    assert box.unclaimed == 1
    with pytest.raises(TimeoutError):
        await box.take("never", timeout=0.05)
    assert box.unclaimed == 1 and not box._waiting


async def test_the_first_message_wins_and_unclaimed_ones_expire():
    box = Mailbox(ttl=0.05)
    box.deliver(_delivery("r", "first"))
    box.deliver(_delivery("r", "second"))
    assert await box.take("r", timeout=0.1) == _delivery("r", "first")
    box.put("gone", b"\xff")   # no MediaDelivery: dropped
    box.deliver(_delivery("gone", "x"))
    await asyncio.sleep(0.1)
    assert box.unclaimed == 0


async def test_posts_reach_the_listener_whole_even_when_chunked(infra):
    timeouts = PlaneTimeouts(drain_timeout=1)
    server = await RequestPlane.connect(infra.nats_server, timeouts)
    client = await RequestPlane.connect(infra.nats_server, timeouts)
    got: list[tuple[str, bytes]] = []
    subject = mailbox_subject(f"test.{uuid.uuid4().hex}")
    big = os.urandom(3 << 20)   # over NATS's default 1 MB max_payload
    try:
        await server.listen(subject, lambda rid, payload: got.append((rid, payload)))
        await client.post(subject, b"small", "r1")
        await client.post(subject, big, "r2")
        for _ in range(200):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        assert got == [("r1", b"small"), ("r2", big)]
    finally:
        await client.close()
        await server.close()


async def test_the_resolver_takes_the_posted_sources_or_gives_up():
    box = Mailbox()
    resolver = MediaResolver(None, None, None, box, TransferTimeouts(encoder_result_timeout=0.05))
    req = pb.GenerateRequest(request_id="r", media_mailbox_key="r",
                             media=[pb.MediaItem(modality="image", hash="a", offset=1, length=4)])
    with pytest.raises(EpdError) as err:
        async with resolver.resolve(req):
            pass
    assert err.value.code == 503 and "delivered" in err.value.message
    # The EC-connector case: the items are in the storage, which this worker lacks (a 503 too,
    # but one that shows the posted result was applied).
    box.deliver(pb.MediaDelivery(key="r", result=pb.EncodeResult(
        media=[pb.MediaItem(modality="image", hash="a", in_ec_storage=True)])))
    with pytest.raises(EpdError) as err:
        async with resolver.resolve(req):
            pass
    assert err.value.code == 503 and "--ec-storage-path" in err.value.message
    assert req.media[0].in_ec_storage


def test_an_encode_result_with_a_wrong_item_count_is_an_error():
    gen = pb.GenerateRequest(media=[pb.MediaItem(modality="image", hash="a"), pb.MediaItem(modality="image", hash="b")])
    short = pb.EncodeResult(media=[pb.MediaItem(modality="image", hash="a", in_ec_storage=True)])
    with pytest.raises(EpdError) as err:
        apply_encode_result(gen, short)
    assert err.value.code == 500 and not gen.media[1].in_ec_storage


class _StubEmbedder:
    async def embed(self, item: pb.MediaItem) -> torch.Tensor:
        return torch.zeros((item.length, 4))


async def test_the_encoder_posts_its_result_before_it_answers(tmp_path):
    from epdserve.worker.ec_storage import EmbeddingStorage
    from epdserve.worker.encode import StorageEncodeHandler
    posts: list[tuple[str, bytes, str]] = []

    async def post(subject: str, payload: bytes, request_id: str) -> None:
        posts.append((subject, payload, request_id))

    handler = StorageEncodeHandler(_StubEmbedder(), EmbeddingStorage(str(tmp_path)), post)
    item = pb.MediaItem(modality="image", hash="h", length=2, data=b"x")
    answer = [x async for x in handler.encode(pb.EncodeRequest(request_id="r", media=[item], deliver_to="pd.mailbox")
                                                 .SerializeToString())]
    assert posts == [("pd.mailbox", pb.MediaDelivery(key="r", result=pb.EncodeResult.FromString(answer[0]))
                      .SerializeToString(), "r")]
    assert [x async for x in handler.encode(pb.EncodeRequest(request_id="r2", media=[item]).SerializeToString())]
    assert len(posts) == 1   # nobody to post to
