"""Assembles each role from the shared machinery: a `Service` per role, started in order."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import ClassVar

import torch

from epdserve.config import Role, WorkerConfig
from epdserve.engine.async_engine import AsyncEngine
from epdserve.engine.paged import EngineConfig, PagedEngine
from epdserve.engine.scheduler import SchedulerConfig
from epdserve.kernels.cpu import CpuKernels, load_cpu_kernels
from epdserve.models.base import MediaEncoder, ModelFamily, MultimodalModel
from epdserve.runtime.mailbox import Mailbox, mailbox_subject
from epdserve.runtime.service import BACKEND, DECODE, ENCODER, PREFILL, Service
from epdserve.transfer.agent import TransferAgent
from epdserve.worker.ec_storage import EmbeddingStorage
from epdserve.worker.embedding_cache import EmbeddingCache
from epdserve.worker.encode import MediaEmbedder, NixlEncodeHandler, StorageEncodeHandler
from epdserve.worker.encode_batcher import EncodeBatcher
from epdserve.worker.kv_transfer import KVTransfer
from epdserve.worker.media_sources import MediaResolver
from epdserve.worker.pd import PDHandler, PrefillHandler

log = logging.getLogger(__name__)


class PDService(Service):
    """The language model on the paged engine: prefill and decode (`--multimodal-worker`, and
    text-only workers), prefill only (`--is-prefill-worker`: the first token, then the KV goes
    to a decode worker over NIXL), or decode (`--multimodal-decode-worker`: continues
    requests prefilled elsewhere, prefills the others itself). Media arrive as bytes (encoded
    here), as embeddings over NIXL, or in the embedding cache on disk."""

    COMPONENTS: ClassVar[dict[Role, str]] = {Role.PREFILL: PREFILL, Role.ENCODE_PREFILL: PREFILL, Role.DECODE: DECODE}

    async def start(self) -> None:
        c = self.config
        model = await asyncio.to_thread(load_model, c, self.family)
        config = engine_config(c, self.max_model_len)
        paged = await asyncio.to_thread(PagedEngine, model, config)
        self.engine = AsyncEngine(paged)
        self.engine.start()
        component = self.COMPONENTS.get(c.role, BACKEND)
        # Registered once here (staging region, KV pool), so that the first request does not pay
        # for it. Prefill and decode roles are multimodal roles: they have an agent.
        self.agent = (
            TransferAgent(f"{component}-{self.runtime.instance_id}", c.embedding_buffer_bytes, model.device)
            if c.enable_multimodal
            else None
        )
        self.kv = KVTransfer(self.agent, paged.kv) if component != BACKEND else None
        storage = EmbeddingStorage(c.ec_storage_path) if c.ec_storage_path else None
        self.mailbox = Mailbox() if c.enable_multimodal else None  # encode workers post results here
        media = MediaResolver(model, self.agent, storage, self.mailbox)
        handler = (
            PrefillHandler(self.engine, media, self.kv, c.kv_handoff_timeout)
            if component == PREFILL
            else PDHandler(self.engine, media, self.kv)
        )
        subject = await self.runtime.serve(component, "generate", handler.generate)
        if self.mailbox is not None:
            await self.runtime.plane.listen(mailbox_subject(subject), self.mailbox.put)
        await self.serve_stats(component, self._counters)
        await self.runtime.publish_card(self.card("tokens", component, subject))

    def _counters(self) -> dict[str, int]:
        engine = dataclasses.asdict(self.engine.engine.stats())
        mailbox = {"mailbox_unclaimed": self.mailbox.unclaimed} if self.mailbox is not None else {}
        agent = self.agent.stats() if self.agent is not None else {}
        return engine | mailbox | agent | (self.kv.stats() if self.kv is not None else {})

    async def stop(self) -> None:
        await self.engine.stop()
        if self.agent is not None:
            self.agent.close()


class EncodeService(Service):
    """Media encoding for PD/prefill workers: the tower and projector only. Embeddings go out
    over NIXL from a registered cache, or (native encoder) into the embedding cache on disk."""

    async def start(self) -> None:
        c = self.config
        encoder = await asyncio.to_thread(load_encoder, c, self.family)
        self.batcher = EncodeBatcher(encoder)
        embedder = MediaEmbedder(encoder, self.batcher)
        self.agent = None
        if c.role is Role.NATIVE_ENCODER:
            handler = StorageEncodeHandler(embedder, EmbeddingStorage(c.ec_storage_path), self.runtime.plane.post)
        else:
            self.agent = TransferAgent(f"{ENCODER}-{self.runtime.instance_id}", c.encoder_cache_bytes, encoder.device)
            handler = NixlEncodeHandler(embedder, EmbeddingCache(self.agent), self.agent, self.runtime.plane.post)
        subject = await self.runtime.serve(ENCODER, "encode", handler.encode)
        await self.serve_stats(ENCODER, handler.stats)
        await self.runtime.publish_card(self.card("media", ENCODER, subject))

    async def stop(self) -> None:
        await self.batcher.close()
        if self.agent is not None:
            self.agent.close()


def _placement(c: WorkerConfig) -> tuple[torch.dtype | None, torch.device, CpuKernels | None]:
    """(dtype, device, CPU kernels) the worker's flags name; None dtype keeps the checkpoint's."""
    dtype = None if c.dtype == "auto" else getattr(torch, c.dtype)
    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else torch.device(c.device)
    )
    kernels = load_cpu_kernels(c.kernel_cache_dir) if c.cpu_kernels and device.type == "cpu" else None
    return dtype, device, kernels


def load_model(c: WorkerConfig, family: ModelFamily) -> MultimodalModel:
    """The worker's model, placed as its flags say, with the CPU kernels unless turned off."""
    return family.load_runner(*_placement(c))


def load_encoder(c: WorkerConfig, family: ModelFamily) -> MediaEncoder:
    """The encode worker's media encoder, placed as `load_model` places the model."""
    return family.load_encoder(*_placement(c))


def engine_config(c: WorkerConfig, max_model_len: int) -> EngineConfig:
    """The paged engine's settings from the worker's flags."""
    return EngineConfig(
        block_size=c.block_size,
        num_kv_blocks=c.num_kv_blocks,
        kv_cache_memory=c.kv_cache_memory,
        scheduler=SchedulerConfig(
            max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens, max_model_len=max_model_len
        ),
    )
