"""The base of every role inside a worker process, and the component names roles register under."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable

from epdserve.config import WorkerConfig
from epdserve.models.base import ModelFamily
from epdserve.protocol import epdserve_pb2 as pb
from epdserve.runtime.component import Runtime

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
