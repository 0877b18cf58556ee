"""The processor role: chat template, tokenization, media, routing; announces the model to frontends."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from transformers import AutoProcessor, GenerationConfig

from epdserve.media.fetch import MediaFetcher
from epdserve.processor.encoders import EncoderRouter
from epdserve.processor.handler import ProcessorHandler
from epdserve.processor.prompt import PromptBuilder
from epdserve.processor.routing import Router
from epdserve.runtime.pool import InstancePool
from epdserve.runtime.service import BACKEND, DECODE, ENCODER, PREFILL, PROCESSOR, Service

log = logging.getLogger(__name__)


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


def _eos_token_ids(model_dir: str, tokenizer: Any) -> list[int]:
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
