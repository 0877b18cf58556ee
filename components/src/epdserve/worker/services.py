"""Assembles each role from the shared machinery: a `Service` per role, started in order."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable

import torch
from transformers import AutoProcessor, GenerationConfig

from epdserve.config import Role, WorkerConfig
from epdserve.engine.async_engine import AsyncEngine
from epdserve.engine.paged import EngineConfig, PagedEngine
from epdserve.engine.scheduler import SchedulerConfig
from epdserve.media.fetch import MediaFetcher
from epdserve.kernels.cpu import CpuKernels, load_cpu_kernels
from epdserve.models.base import MediaEncoder, ModelFamily, MultimodalModel
from epdserve.processor.encoders import EncoderRouter
from epdserve.processor.handler import ProcessorHandler
from epdserve.processor.prompt import PromptBuilder
from epdserve.processor.routing import Router
from epdserve.protocol import epdserve_pb2 as pb
from epdserve.runtime.component import Runtime
from epdserve.runtime.mailbox import Mailbox, mailbox_subject
from epdserve.runtime.pool import InstancePool
from epdserve.transfer.agent import TransferAgent
from epdserve.worker.ec_storage import EmbeddingStorage
from epdserve.worker.embedding_cache import EmbeddingCache
from epdserve.worker.encode import MediaEmbedder, NixlEncodeHandler, StorageEncodeHandler
from epdserve.worker.encode_batcher import EncodeBatcher
from epdserve.worker.media_sources import MediaResolver
from epdserve.worker.kv_transfer import KVTransfer
from epdserve.worker.pd import PDHandler, PrefillHandler

log = logging.getLogger(__name__)

# Component names in discovery; BACKEND: workers that prefill and decode.
PROCESSOR, BACKEND, PREFILL, DECODE, ENCODER = "processor", "backend", "prefill", "decode", "encoder"


class Service(ABC):
    """One role inside a worker process. `stop` runs after the runtime stopped routing here
    and drained in-flight requests."""

    def __init__(self, config: WorkerConfig, runtime: Runtime, family: ModelFamily):
        self.config = config
        self.runtime = runtime
        self.family = family

    @property
    def max_model_len(self) -> int:
        return min(self.config.max_model_len or self.family.context_length, self.family.context_length)

    def card(self, input: str, component: str, subject: str) -> pb.ModelCard:
        c = self.config
        return pb.ModelCard(
            served_model_name=c.served_model_name,
            model_path=c.model,
            model_type=self.family.hf_config.model_type,
            input=input,
            context_length=self.max_model_len,
            enable_multimodal=c.enable_multimodal,
            modalities=self.family.modalities if c.enable_multimodal else [],
            limit_mm_per_prompt=dict(c.media.limit_per_prompt) if c.enable_multimodal else {},
            subject=subject,
            instance_id=self.runtime.instance_id,
            component=component,
            created=int(time.time()),
        )

    @abstractmethod
    async def start(self) -> None: ...

    async def stop(self) -> None:
        return None

    async def serve_stats(self, component: str, counters: Callable[[], dict[str, int]]) -> None:
        """Serve `counters()` as `WorkerStats` on this instance's `stats` endpoint."""

        async def stats(_: bytes) -> AsyncIterator[bytes]:
            yield pb.WorkerStats(counters=counters()).SerializeToString()

        await self.runtime.serve(component, "stats", stats)


class ProcessorService(Service):
    """Announces the model to frontends only while at least one backend serves it."""

    async def start(self) -> None:
        c = self.config
        hf_processor = await asyncio.to_thread(AutoProcessor.from_pretrained, c.model)
        tokenizer = getattr(hf_processor, "tokenizer", hf_processor)
        templater = hf_processor if getattr(hf_processor, "chat_template", None) else tokenizer
        self.fetcher = MediaFetcher(c.media)
        prompts = PromptBuilder(self.family, tokenizer, templater, c.media, c.enable_multimodal, self.fetcher)
        watch = await self.runtime.watch_cards(c.served_model_name)

        def pool(component: str, what: str) -> InstancePool:
            return InstancePool(
                watch,
                what=f"{what} for model {c.served_model_name!r}",
                accept=lambda card: card.served_model_name == c.served_model_name and card.component == component,
            )

        self.router = Router(
            self.runtime.plane, pool(BACKEND, "worker"), pool(PREFILL, "prefill worker"), pool(DECODE, "decode worker")
        )
        encoders = EncoderRouter(pool(ENCODER, "encode worker"))
        handler = ProcessorHandler(
            prompts,
            tokenizer,
            self.router,
            encoders,
            self.runtime.plane,
            _eos_token_ids(c.model, tokenizer),
            self.max_model_len,
        )
        subject = await self.runtime.serve(PROCESSOR, "generate", handler.generate)
        self._card = self.card("text", PROCESSOR, subject)
        self._changed = asyncio.Event()
        watch.add_listener(self._changed.set)
        self._gate = asyncio.create_task(self._follow_backends())

    async def _follow_backends(self) -> None:
        announced = False
        while True:
            alive = self.router.any_alive
            if alive != announced:
                try:
                    if alive:
                        await self.runtime.publish_card(self._card)
                    else:
                        await self.runtime.withdraw_card(self._card)
                except Exception:  # an etcd hiccup must not freeze the announcement
                    log.warning("updating the model card failed; retrying", exc_info=True)
                    await asyncio.sleep(1)
                    continue
                announced = alive
                log.info(
                    "model %r %s", self.config.served_model_name, "announced" if alive else "withdrawn: no backend"
                )
            await self._changed.wait()
            self._changed.clear()

    async def stop(self) -> None:
        self._gate.cancel()
        await self.fetcher.close()


class PDService(Service):
    """The language model on the paged engine: prefill and decode (`--multimodal-worker`, and
    text-only workers), prefill only (`--is-prefill-worker`: the first token, then the KV goes
    to a decode worker over NIXL), or decode (`--multimodal-decode-worker`: continues
    requests prefilled elsewhere, prefills the others itself). Media arrive as bytes (encoded
    here), as embeddings over NIXL, or in the embedding cache on disk."""

    COMPONENTS = {Role.PREFILL: PREFILL, Role.ENCODE_PREFILL: PREFILL, Role.DECODE: DECODE}

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


def _eos_token_ids(model_dir: str, tokenizer) -> list[int]:
    """EOS ids from generation_config.json, else the tokenizer's, as `generate()` uses them."""
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]
