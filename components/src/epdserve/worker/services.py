"""The worker services: each builds what its role's `RoleSpec` (worker/roles.py) needs, then its handler."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import torch

from epdserve.config import WorkerConfig
from epdserve.engine.async_engine import AsyncEngine
from epdserve.engine.paged import EngineConfig, PagedEngine
from epdserve.engine.scheduler import SchedulerConfig
from epdserve.kernels.cpu import CpuKernels, load_cpu_kernels
from epdserve.models.base import MediaEncoder, ModelFamily, MultimodalModel
from epdserve.runtime.mailbox import Mailbox, mailbox_subject
from epdserve.runtime.service import Service
from epdserve.transfer.agent import TransferAgent
from epdserve.worker.ec_storage import EmbeddingStorage
from epdserve.worker.encode import MediaEmbedder
from epdserve.worker.encode_batcher import EncodeBatcher
from epdserve.worker.kv_transfer import KVTransfer
from epdserve.worker.media_sources import MediaResolver
from epdserve.worker.roles import ROLES, Parts, RoleSpec, need

log = logging.getLogger(__name__)


class _RoleService(Service):
    """A worker part, wired as its role's `RoleSpec` (worker/roles.py) says."""

    @property
    def spec(self) -> RoleSpec:
        return ROLES[self.config.role]

    def _agent(self, capacity: int, device: torch.device) -> TransferAgent | None:
        """The role's NIXL agent, registering `capacity` bytes on `device` now, so that the
        first request does not pay for it; None when the role needs none."""
        if not (self.spec.nixl_agent and self.config.enable_multimodal):
            return None
        return TransferAgent(f"{self.spec.component}-{self.runtime.instance_id}", capacity, device)

    def _storage(self) -> EmbeddingStorage | None:
        path = self.config.ec_storage_path
        return EmbeddingStorage(path) if self.spec.ec_storage and path else None


class PDService(_RoleService):
    """The language model on the paged engine, for the roles with a `generate` handler: prefill
    and decode (`--multimodal-worker`, and text-only workers), prefill only
    (`--is-prefill-worker`: the first token, then the KV goes to a decode worker over NIXL), or
    decode (`--multimodal-decode-worker`: continues requests prefilled elsewhere, prefills the
    others itself). Media arrive as bytes (encoded here), as embeddings over NIXL, or in the
    embedding cache on disk."""

    async def start(self) -> None:
        c, spec = self.config, self.spec
        build = need(spec.generate, "a generate handler")
        model = await asyncio.to_thread(load_model, c, self.family)
        config = engine_config(c, self.max_model_len)
        self.paged = await asyncio.to_thread(PagedEngine, model, config)
        self.engine = AsyncEngine(self.paged)
        self.engine.start()
        self.agent = self._agent(c.embedding_buffer_bytes, model.device)
        self.kv = (
            KVTransfer(need(self.agent, "--enable-multimodal"), self.paged.kv, c.transfer) if spec.kv_transfer else None
        )
        # Encode workers deliver media here.
        self.mailbox = Mailbox(c.transfer.mailbox_ttl) if spec.mailbox and c.enable_multimodal else None
        media = MediaResolver(model, self.agent, self._storage(), self.mailbox, c.transfer)
        parts = Parts(c, self.runtime.plane.post, engine=self.engine, media=media, kv=self.kv, agent=self.agent)
        handler = build(parts)
        subject = await self.runtime.serve(spec.component, "generate", handler.generate)
        if self.mailbox is not None:
            await self.runtime.plane.listen(mailbox_subject(subject), self.mailbox.put)
        await self.serve_stats(spec.component, self._counters)
        await self.runtime.publish_card(self.card("tokens", spec.component, subject))

    def _counters(self) -> dict[str, int]:
        engine = dataclasses.asdict(self.paged.stats())
        mailbox = {"mailbox_unclaimed": self.mailbox.unclaimed} if self.mailbox is not None else {}
        agent = self.agent.stats() if self.agent is not None else {}
        return engine | mailbox | agent | (self.kv.stats() if self.kv is not None else {})

    async def stop(self) -> None:
        await self.engine.stop()
        if self.agent is not None:
            self.agent.close()


class EncodeService(_RoleService):
    """Media encoding for PD/prefill workers, for the roles with an `encode` handler: the tower
    and projector only. Embeddings go out over NIXL from a registered cache, or (native
    encoder) into the embedding cache on disk."""

    async def start(self) -> None:
        c, spec = self.config, self.spec
        build = need(spec.encode, "an encode handler")
        encoder = await asyncio.to_thread(load_encoder, c, self.family)
        self.batcher = EncodeBatcher(encoder)
        self.agent = self._agent(c.encoder_cache_bytes, encoder.device)
        embedder = MediaEmbedder(encoder, self.batcher)
        parts = Parts(c, self.runtime.plane.post, embedder=embedder, agent=self.agent, storage=self._storage())
        handler = build(parts)
        subject = await self.runtime.serve(spec.component, "encode", handler.encode)
        await self.serve_stats(spec.component, handler.stats)
        await self.runtime.publish_card(self.card("media", spec.component, subject))

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
