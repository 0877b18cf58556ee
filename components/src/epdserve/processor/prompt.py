"""Builds the worker's view of a request: token ids with expanded media placeholders."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import jinja2

from epdserve.config import MediaConfig
from epdserve.media.fetch import MediaFetcher
from epdserve.media.image import probe_image
from epdserve.media.types import MediaInfo
from epdserve.models.base import NO_MM_KWARGS, MMKwargs, ModelFamily
from epdserve.processor.chat import MediaRef, attach_uuids, convert_messages, template_takes_parts
from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.protocol.openai import ChatCompletionRequest, CompletionRequest


@dataclass
class Prompt:
    token_ids: list[int]
    media: list[pb.MediaItem] = field(default_factory=list)


@dataclass(frozen=True)
class _Media:
    ref: MediaRef
    data: bytes
    info: MediaInfo

    def hash(self, mm_kwargs_key: str) -> str:
        """The item's cache key (embedding cache, prefix cache, encoder routing): its content
        hash or client uuid, folded with the processing options (another resolution, another
        embedding)."""
        base = self.ref.uuid or hashlib.sha256(self.data).hexdigest()
        return hashlib.sha256(f"{base}\n{mm_kwargs_key}".encode()).hexdigest() if mm_kwargs_key else base


def mm_kwargs_key(mm_kwargs: MMKwargs) -> str:
    """Checked processing options as canonical JSON ("" for none): equal options, equal text."""
    return json.dumps(dict(mm_kwargs), sort_keys=True, separators=(",", ":")) if mm_kwargs else ""


class PromptBuilder:
    """Chat template, tokenization, media fetch and placeholder expansion for one model."""

    def __init__(
        self,
        family: ModelFamily,
        tokenizer: Any,
        templater: Any,
        media: MediaConfig,
        enable_multimodal: bool,
        fetcher: MediaFetcher,
    ):
        """`templater` is the HF processor (or tokenizer) whose `chat_template` and
        `apply_chat_template` render prompts exactly as `transformers` users do."""
        self.family = family
        self.tokenizer = tokenizer
        self.templater = templater
        self.takes_parts = template_takes_parts(templater.chat_template or "")
        self.media = media
        self.enable_multimodal = enable_multimodal
        self.fetcher = fetcher
        self.placeholders = {family.placeholder_token_id(m): m for m in family.modalities}
        self.vocab_size = family.vocab_size
        try:  # fails start-up on options the model does not take
            family.check_mm_kwargs(media.mm_processor_kwargs)
        except ValueError as exc:
            raise ValueError(f"--mm-processor-kwargs: {exc}") from None

    async def build(self, req: ChatCompletionRequest | CompletionRequest) -> Prompt:
        if isinstance(req, CompletionRequest):
            return Prompt(self._completion_ids(req.prompt))
        if not self.templater.chat_template:
            raise EpdError.bad_request("this model has no chat template; use /v1/completions")
        messages, refs = convert_messages(req.messages, self.takes_parts)
        self._check_media_allowed(refs)
        mm_kwargs = self._mm_kwargs(req.mm_processor_kwargs)
        refs = attach_uuids(refs, req.multi_modal_uuids)
        try:
            text = self.templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except jinja2.TemplateError as exc:  # e.g. the template's raise_exception on role order
            raise EpdError.bad_request(f"the chat template rejected the messages: {exc}", param="messages") from exc
        return self._expand(self._tokenize(text), await self._load_all(refs), mm_kwargs)

    def _mm_kwargs(self, requested: dict | None) -> MMKwargs:
        """The server's processing options overridden by the request's, checked (400)."""
        merged = {**self.media.mm_processor_kwargs, **(requested or {})}
        if not merged:
            return NO_MM_KWARGS
        try:
            return self.family.check_mm_kwargs(merged)
        except ValueError as exc:
            raise EpdError.bad_request(str(exc), param="mm_processor_kwargs") from None

    async def _load_all(self, refs: list[MediaRef]) -> list[_Media]:
        """Fetch every item concurrently; the first failure cancels the other fetches."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._load(ref)) for ref in refs]
        except* EpdError as errors:
            raise errors.exceptions[0] from None
        return [t.result() for t in tasks]

    def _tokenize(self, text: str) -> list[int]:
        # Templates that write the BOS themselves must not get a second one.
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def _completion_ids(self, prompt: str | list) -> list[int]:
        if isinstance(prompt, str):
            ids = self._tokenize(prompt)
        elif prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            if not all(0 <= t < self.vocab_size for t in ids):
                raise EpdError.bad_request(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        elif len(prompt) == 1:
            return self._completion_ids(prompt[0])
        else:
            raise EpdError.bad_request("prompt must be one string or one list of token ids", param="prompt")
        if not ids:
            raise EpdError.bad_request("the prompt is empty", param="prompt")
        if any(t in self.placeholders for t in ids):
            raise EpdError.bad_request(
                "completion prompts cannot carry media placeholders; use /v1/chat/completions with media parts",
                param="prompt",
            )
        return ids

    def _check_media_allowed(self, refs: list[MediaRef]) -> None:
        if not refs:
            return
        if not self.enable_multimodal:
            raise EpdError.bad_request(
                "this model was deployed without --enable-multimodal; requests may not carry media", param="messages"
            )
        for modality in {r.modality for r in refs}:
            count = sum(r.modality == modality for r in refs)
            if modality not in self.family.modalities:
                raise EpdError.bad_request(f"this model does not accept {modality} input", param="messages")
            limit = self.media.limit_per_prompt.get(modality, 0)
            if count > limit:
                raise EpdError.bad_request(
                    f"at most {limit} {modality}(s) may be provided in one prompt; got {count}", param="messages"
                )

    async def _load(self, ref: MediaRef) -> _Media:
        data = await self.fetcher.fetch(ref.url, ref.modality)
        if not data:
            raise EpdError.bad_request(f"media at {ref.url[:80]} is empty")
        info = probe_image(data) if ref.modality == "image" else MediaInfo(ref.modality)
        return _Media(ref, data, info)

    def _expand(self, ids: list[int], items: list[_Media], mm_kwargs: MMKwargs) -> Prompt:
        """Replace each media placeholder with its item's tokens (`ModelFamily.expand_placeholder`)."""
        options = mm_kwargs_key(mm_kwargs)
        queues = {m: [it for it in items if it.ref.modality == m] for m in self.family.modalities}
        out: list[int] = []
        media: list[pb.MediaItem] = []
        for tok in ids:
            modality = self.placeholders.get(tok)
            if modality is None:
                out.append(tok)
                continue
            if not queues[modality]:
                raise EpdError.bad_request(f"the prompt has more {modality} placeholders than {modality}s")
            item = queues[modality].pop(0)
            try:
                expansion = self.family.expand_placeholder(modality, item.info, mm_kwargs)
            except ValueError as exc:  # e.g. an image the processor cannot resize
                raise EpdError.bad_request(str(exc), param="messages") from None
            mask = expansion.embed_mask
            media.append(
                pb.MediaItem(
                    modality=modality,
                    hash=item.hash(options),
                    offset=len(out),
                    length=len(expansion.token_ids),
                    data=item.data,
                    embed_mask=bytes(mask) if mask is not None else b"",
                    grid=expansion.grid or (),
                    mm_kwargs=options,
                )
            )
            out.extend(expansion.token_ids)
        if any(queues.values()):
            raise EpdError.bad_request("the chat template placed fewer media placeholders than media items")
        return Prompt(out, media)
