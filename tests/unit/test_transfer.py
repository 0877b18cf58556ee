"""NIXL hand-off pieces in one process: the region allocator, a READ between two agents with
its notification, the NIXL embedding cache, the cache on disk, encoder routing, and the
encode worker's vision-only model."""

from __future__ import annotations

import contextlib
import asyncio
import io
import time

import pytest
import torch
from PIL import Image

from epdserve.attention.kv_cache import KVCache
from epdserve.config import TransferTimeouts
from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.transfer.agent import TransferAgent, torch_dtype
from epdserve.transfer.kv_layout import KVLayout, paired_ranges
from epdserve.transfer.region import ALIGNMENT, RegionAllocator, Span
from epdserve.worker.ec_storage import EmbeddingStorage
from epdserve.worker.embedding_cache import EmbeddingCache
from epdserve.worker.kv_transfer import KVTransfer
from support.oracle import make_image

CPU = torch.device("cpu")


def test_allocator_aligns_and_coalesces():
    a = RegionAllocator(4 * ALIGNMENT)
    spans = [a.alloc(10), a.alloc(ALIGNMENT + 1), a.alloc(1)]
    assert [s.offset for s in spans] == [0, ALIGNMENT, 3 * ALIGNMENT]
    assert a.alloc(1) is None
    a.free(spans[0])
    a.free(spans[2])
    assert a.alloc(2 * ALIGNMENT) is None   # two holes of one unit each
    a.free(spans[1])
    assert a.allocated_bytes == a.allocations == 0
    assert a.alloc(4 * ALIGNMENT) == Span(0, 4 * ALIGNMENT)   # all merged back


async def test_read_moves_tensors_and_notifies_the_holder():
    holder = TransferAgent("test-holder", 1 << 20, CPU)
    reader = TransferAgent("test-reader", 1 << 20, CPU)
    try:
        tensors, remotes = [torch.randn(16, 64), torch.randn(3, 5).to(torch.bfloat16)], []
        for t in tensors:
            span = holder.alloc(t.numel() * t.element_size())
            holder.view(span, t.dtype, tuple(t.shape)).copy_(t)
            remotes.append(holder.remote_tensor(span, t.dtype, tuple(t.shape)))
        done = holder.expect(b"req-1")
        into = reader.alloc(sum(r.nbytes for r in remotes))
        offsets = await reader.read(holder.handoff(b"req-1"), remotes, into, timeout=10)
        await asyncio.wait_for(done, 10)
        for t, r, off in zip(tensors, remotes, offsets):
            got = reader.view(Span(into.offset + off, r.nbytes), torch_dtype(r.dtype), tuple(r.shape))
            assert torch.equal(got, t)
        assert reader.stats()["nixl_live_transfers"] == 0 and reader.stats()["nixl_remote_agents"] == 1
        holder.forget(b"req-1")
        assert holder.stats()["nixl_expected_notifs"] == 0
    finally:
        reader.close()
        holder.close()


async def test_read_from_a_vanished_peer_is_a_503():
    reader = TransferAgent("test-reader-2", 1 << 16, CPU)
    ghost = TransferAgent("test-ghost", 1 << 16, CPU)
    handoff = ghost.handoff(b"x")
    remote = ghost.remote_tensor(ghost.alloc(1024), torch.float32, (256,))
    ghost.close()
    try:
        with pytest.raises(EpdError) as err:
            await reader.read(handoff, [remote], reader.alloc(1024), timeout=2)
        assert err.value.code == 503
        assert reader.stats()["nixl_live_transfers"] == 0
    finally:
        reader.close()


async def test_cache_is_lru_by_bytes_and_never_evicts_pinned():
    agent = TransferAgent("test-cache", 3 * 4096, CPU)
    cache = EmbeddingCache(agent)
    try:
        a = cache.insert("a", torch.ones(16, 64))        # 4 KiB each: room for three
        cache.insert("b", torch.ones(16, 64) * 2)
        cache.unpin(cache.insert("c", torch.ones(16, 64) * 3))
        cache.unpin(cache.lookup("b"))                   # b is now more recent than c
        cache.unpin(cache.lookup("b"))
        cache.insert("d", torch.ones(16, 64) * 4)        # evicts c: a is pinned, b recent
        assert cache.lookup("c") is None and cache.evictions == 1
        cache.unpin(a)
        assert torch.equal(agent.view(a.span, a.dtype, a.shape), torch.ones(16, 64))
        with pytest.raises(EpdError) as err:
            cache.insert("huge", torch.ones(64, 64))      # 16 KiB > the region
        assert err.value.code == 503
    finally:
        agent.close()


def test_storage_writes_atomically_and_checks_length(tmp_path):
    store = EmbeddingStorage(tmp_path / "ec")
    emb = torch.randn(7, 8)
    store.save("f" * 64, emb)
    store.save("client uuid / with slashes", emb)
    assert torch.equal(store.load("f" * 64, 7), emb)
    assert store.load("f" * 64, 8) is None and store.load("missing") is None
    assert torch.equal(store.load("client uuid / with slashes"), emb)
    assert sorted(p.name for p in (tmp_path / "ec").iterdir())[1] == "f" * 64 + ".safetensors"
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "ec").iterdir())


class _Pool:
    def __init__(self, ids):
        self.ids, self.turn = ids, 0

    def cards(self):
        return [pb.ModelCard(instance_id=i, subject=i) for i in self.ids]

    def pick(self):
        self.turn += 1
        return self.cards()[self.turn % len(self.ids)]


def test_router_prefers_the_encoder_holding_the_items():
    from epdserve.processor.encoders import EncoderRouter
    pool = _Pool(["e1", "e2"])
    router = EncoderRouter(pool)
    router.record("e2", ["h1", "h2"])
    router.record("e1", ["h3"])
    assert router.pick(["h1", "h3", "h2"]).instance_id == "e2"
    assert router.pick(["h1"], exclude=frozenset({"e2"})).instance_id == "e1"
    assert {router.pick(["new"]).instance_id for _ in range(4)} == {"e1", "e2"}
    pool.ids = ["e1"]                                    # e2 died: its items go elsewhere
    assert router.pick(["h1"]).instance_id == "e1"
    assert router.pick(["h1"], exclude=frozenset({"e1"})) is None


def test_encoder_loads_only_the_vision_weights_and_encodes_like_the_full_model(tiny_llava, tiny_runner):
    from epdserve.models.registry import load_family
    encoder = load_family(tiny_llava).load_encoder(None, CPU)
    loaded = {n for n, p in encoder.hf.named_parameters() if p.device.type != "meta"}
    assert loaded and all(n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in loaded)
    images = [Image.open(io.BytesIO(make_image(i))).convert("RGB") for i in range(2)]
    with torch.inference_mode():
        expected = tiny_runner.encode("image", tiny_runner.preprocess("image", images))
        got = encoder.encode("image", encoder.preprocess("image", images))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


class _StubEmbedder:
    """Stands in for the vision tower: every item embeds to a constant."""

    async def embed(self, item: pb.MediaItem) -> torch.Tensor:
        return torch.full((item.length, 8), 1.0)

    def stats(self) -> dict[str, int]:
        return {}


async def _no_post(subject: str, payload: bytes, request_id: str) -> None:
    raise AssertionError("the request names nobody to post to")


@pytest.mark.parametrize("how", ["cancelled", "timed out", "read"])
async def test_encode_handler_unpins_on_every_ending(how):
    from epdserve.worker.encode import NixlEncodeHandler
    agent = TransferAgent(f"test-encode-{how.replace(' ', '-')}", 1 << 16, CPU)
    reader = TransferAgent(f"test-pd-{how.replace(' ', '-')}", 1 << 16, CPU)
    handler = NixlEncodeHandler(_StubEmbedder(), EmbeddingCache(agent), agent, _no_post, TransferTimeouts(embedding_hold_timeout=0.2))
    req = pb.EncodeRequest(request_id="r", media=[pb.MediaItem(modality="image", hash=h, length=4, data=b"x")
                                                   for h in ("a", "b", "a")])
    try:
        stream = handler.encode(req.SerializeToString())
        result = pb.EncodeResult.FromString(await anext(stream))
        assert handler.cache.stats()["cache_pinned"] == 3
        if how == "cancelled":
            await stream.aclose()
        else:
            if how == "read":
                tensors = [m.embedding for m in result.media]
                await reader.read(result.handoff, tensors, reader.alloc(sum(t.nbytes for t in tensors)), timeout=5)
            started = asyncio.get_running_loop().time()
            assert [x async for x in stream] == []
            waited = asyncio.get_running_loop().time() - started
            assert waited < 0.15 if how == "read" else waited >= 0.2
        assert handler.cache.stats()["cache_pinned"] == 0
        assert agent.stats()["nixl_expected_notifs"] == 0
    finally:
        reader.close()
        agent.close()


def test_kv_ranges_merge_blocks_consecutive_on_both_sides():
    local, remote = KVLayout(1000, 2, 8, 10), KVLayout(5000, 2, 16, 10)
    mine, theirs = paired_ranges(local, [2, 3, 4, 7], remote, [9, 10, 12, 13])
    # runs (2->9, 2 blocks), (4->12, 1), (7->13, 1); for K and V of both layers
    assert len(mine) == len(theirs) == 2 * 2 * 3
    assert mine[:3] == [(1000 + 20, 20), (1000 + 40, 10), (1000 + 70, 10)]
    assert theirs[:3] == [(5000 + 90, 20), (5000 + 120, 10), (5000 + 130, 10)]
    assert mine[-1] == (local.addr(1, 1, 7), 10) and theirs[-1] == (remote.addr(1, 1, 13), 10)
    with pytest.raises(ValueError):
        paired_ranges(local, [1], KVLayout(0, 3, 8, 10), [1])


async def test_read_of_kv_blocks_between_registered_pools():
    """A decode worker's READ: chosen blocks of the prefill side's KV pool into other blocks
    of its own, every layer's K and V, one transfer and its notification."""
    prefill_kv = KVCache.allocate(3, 12, 4, 2, 8, torch.float32, CPU)
    decode_kv = KVCache.allocate(3, 10, 4, 2, 8, torch.float32, CPU)
    prefill_kv.pool.copy_(torch.randn_like(prefill_kv.pool))
    holder, reader = TransferAgent("test-kv-prefill", 0, CPU), TransferAgent("test-kv-decode", 0, CPU)
    try:
        holder.register(prefill_kv.pool)
        reader.register(decode_kv.pool)
        src, dst = [5, 6, 7, 2], [0, 1, 2, 8]
        sent = pb.KVLayout.FromString(KVLayout.of(prefill_kv).to_proto().SerializeToString())   # as it travels
        mine, theirs = paired_ranges(KVLayout.of(decode_kv), dst, KVLayout.from_proto(sent), src)
        done = holder.expect(b"kv-1")
        await reader.read_ranges(holder.handoff(b"kv-1"), mine, theirs, timeout=10)
        await asyncio.wait_for(done, 10)
        for d, s in zip(decode_kv.key + decode_kv.value, prefill_kv.key + prefill_kv.value):
            assert torch.equal(d[dst], s[src])
        assert torch.count_nonzero(decode_kv.key[0][[3, 4, 5, 6, 7, 9]]) == 0   # nothing else written
        assert reader.stats()["nixl_registrations"] == 1 and reader.stats()["nixl_live_transfers"] == 0
        holder.forget(b"kv-1")
    finally:
        reader.close()
        holder.close()


async def test_kv_load_reads_in_time_and_refuses_once_the_hold_may_have_run_out():
    """`KVTransfer.load` as a decode worker runs it: the blocks it lacks, one READ, the holder
    notified; but no READ at all once the holder may have freed (and reused) the blocks."""
    prefill_kv = KVCache.allocate(2, 8, 4, 2, 8, torch.float32, CPU)
    decode_kv = KVCache.allocate(2, 8, 4, 2, 8, torch.float32, CPU)
    prefill_kv.pool.copy_(torch.randn_like(prefill_kv.pool))
    holder, reader = TransferAgent("test-kvt-prefill", 0, CPU), TransferAgent("test-kvt-decode", 0, CPU)
    try:
        sender, receiver = KVTransfer(holder, prefill_kv, TransferTimeouts()), KVTransfer(reader, decode_kv, TransferTimeouts())
        handoff = sender.handoff(b"kv-2", [1, 2, 5], first_token=7, hold_s=1.5)
        with pytest.raises(EpdError) as err:   # 0.6 s after arrival: under the 1 s margin of 1.5 s
            await receiver.load(handoff, [3, 4, 6], 0, received=time.monotonic() - 0.6)
        assert err.value.code == 503 and receiver.stats()["kv_blocks_read"] == 0
        done = holder.expect(b"kv-2")
        await receiver.load(handoff, [3, 4, 6], 1, received=time.monotonic())   # block 3 is cached
        await asyncio.wait_for(done, 10)
        for d, s in zip(decode_kv.key + decode_kv.value, prefill_kv.key + prefill_kv.value):
            assert torch.equal(d[[4, 6]], s[[2, 5]]) and torch.count_nonzero(d[3]) == 0
        assert receiver.stats()["kv_blocks_read"] == 2 and receiver.stats()["kv_blocks_cached"] == 1
        holder.forget(b"kv-2")
    finally:
        reader.close()
        holder.close()


@pytest.mark.parametrize("how", ["read", "timed out", "raised", "never handed out"])
async def test_a_read_hold_forgets_and_releases_once_on_every_ending(how):
    from epdserve.transfer.hold import ReadHold
    holder = TransferAgent(f"test-hold-{how.replace(' ', '-')}", 1 << 12, CPU)
    reader = TransferAgent(f"test-hold-reader-{how.replace(' ', '-')}", 1 << 12, CPU)
    released = []
    try:
        with contextlib.suppress(RuntimeError), ReadHold(holder, "r", lambda: released.append(1), "it") as hold:
            if how == "raised":
                hold.expect()
                raise RuntimeError
            if how == "read":
                reader.notify(hold.handoff())
            elif how == "timed out":
                hold.expect()
            assert await hold.wait(0.5 if how == "read" else 0.05) is (how == "read")
            hold.close()   # early, by hand: the exit does nothing more
        assert released == [1] and holder.stats()["nixl_expected_notifs"] == 0
    finally:
        reader.close()
        holder.close()
