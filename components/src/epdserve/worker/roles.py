"""Every role of a worker process in one table: what it registers as, its handler, and what it
needs built first.

`ROLES[config.role]` is read by the worker services (worker/services.py: the language model's
`PDService` for a role with a `generate` handler, the encoder's `EncodeService` for one with an
`encode` handler; each builds the parts the spec asks for, then the handler from them) and by
`python -m epdserve.worker`, which runs those services and, where the spec says so, the
processor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from epdserve.config import Role, WorkerConfig
from epdserve.engine.async_engine import AsyncEngine
from epdserve.runtime.mailbox import Post
from epdserve.runtime.service import BACKEND, DECODE, ENCODER, PREFILL, PROCESSOR
from epdserve.transfer.agent import TransferAgent
from epdserve.worker.ec_storage import EmbeddingStorage
from epdserve.worker.embedding_cache import EmbeddingCache
from epdserve.worker.encode import MediaEmbedder, NixlEncodeHandler, StorageEncodeHandler
from epdserve.worker.kv_transfer import KVTransfer
from epdserve.worker.media_sources import MediaResolver
from epdserve.worker.pd import PDHandler, PrefillHandler

T = TypeVar("T")


class GenerateHandler(Protocol):
    """Serves `GenerateRequest` -> stream of `TokenDelta`."""

    def generate(self, payload: bytes) -> AsyncIterator[bytes]: ...


class EncodeHandler(Protocol):
    """Serves `EncodeRequest` -> `EncodeResult`, and the encode worker's counters."""

    def encode(self, payload: bytes) -> AsyncIterator[bytes]: ...

    def stats(self) -> dict[str, int]: ...


@dataclass(frozen=True)
class Parts:
    """What a role's handler is built from; a part is None unless the role's spec needs it."""

    config: WorkerConfig
    post: Post  # the request plane's `post`, for MediaDelivery
    engine: AsyncEngine | None = None
    media: MediaResolver | None = None
    kv: KVTransfer | None = None
    embedder: MediaEmbedder | None = None
    agent: TransferAgent | None = None
    storage: EmbeddingStorage | None = None


@dataclass(frozen=True)
class RoleSpec:
    """One role's wiring.

    `component`: the discovery component its worker part registers under. `generate`: builds
    its `generate` handler; the role runs the language model on the paged engine. `encode`:
    builds its `encode` handler; the role runs the media encoder alone (tower + projector).
    Neither: no worker part. `processor`: the process also runs the processor, after the
    worker part. Needs, built before the handler: `nixl_agent`, a NIXL agent (with
    `--enable-multimodal`, which every role but text requires); `kv_transfer`, the engine's
    KV pool registered with it (prefill workers hand KV out, decode workers READ it in);
    `mailbox`, where encode workers deliver media (with `--enable-multimodal`);
    `ec_storage`, the embedding cache on disk, when `--ec-storage-path` names one.
    """

    component: str
    generate: Callable[[Parts], GenerateHandler] | None = None
    encode: Callable[[Parts], EncodeHandler] | None = None
    processor: bool = False
    nixl_agent: bool = False
    kv_transfer: bool = False
    mailbox: bool = False
    ec_storage: bool = False


def need(part: T | None, what: str) -> T:
    """`part`, which the role's spec promised; ValueError (a wiring bug or missing flag) if absent."""
    if part is None:
        raise ValueError(f"this role needs {what}")
    return part


def _pd(p: Parts) -> PDHandler:
    return PDHandler(need(p.engine, "an engine"), need(p.media, "a media resolver"), p.kv)


def _prefill(p: Parts) -> PrefillHandler:
    engine, media = need(p.engine, "an engine"), need(p.media, "a media resolver")
    return PrefillHandler(engine, media, need(p.kv, "a KV transfer"), p.config.transfer.kv_handoff_timeout)


def _nixl_encode(p: Parts) -> NixlEncodeHandler:
    agent = need(p.agent, "a NIXL agent")
    return NixlEncodeHandler(need(p.embedder, "an embedder"), EmbeddingCache(agent), agent, p.post, p.config.transfer)


def _storage_encode(p: Parts) -> StorageEncodeHandler:
    return StorageEncodeHandler(need(p.embedder, "an embedder"), need(p.storage, "--ec-storage-path"), p.post)


ROLES: dict[Role, RoleSpec] = {
    # The processor alone: it registers itself (processor/service.py).
    Role.PROCESSOR: RoleSpec(PROCESSOR, processor=True),
    # Text-only: a PD worker and its processor in one process.
    Role.TEXT: RoleSpec(BACKEND, generate=_pd, processor=True, nixl_agent=True, mailbox=True, ec_storage=True),
    # Prefill and decode; media as bytes (encoded here), over NIXL, or on disk.
    Role.PD: RoleSpec(BACKEND, generate=_pd, nixl_agent=True, mailbox=True, ec_storage=True),
    # The first token, then the prompt's KV held for a decode worker's READ.
    Role.PREFILL: RoleSpec(
        PREFILL, generate=_prefill, nixl_agent=True, kv_transfer=True, mailbox=True, ec_storage=True
    ),
    Role.ENCODE_PREFILL: RoleSpec(
        PREFILL, generate=_prefill, nixl_agent=True, kv_transfer=True, mailbox=True, ec_storage=True
    ),
    # Continues requests prefilled elsewhere (READs their KV), prefills the others itself.
    Role.DECODE: RoleSpec(DECODE, generate=_pd, nixl_agent=True, kv_transfer=True, mailbox=True, ec_storage=True),
    # Embeddings in a NIXL-registered cache, held for the prefilling worker's READ.
    Role.ENCODE: RoleSpec(ENCODER, encode=_nixl_encode, nixl_agent=True),
    # Embeddings written to the embedding cache on disk.
    Role.NATIVE_ENCODER: RoleSpec(ENCODER, encode=_storage_encode, ec_storage=True),
}
