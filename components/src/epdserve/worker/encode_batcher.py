"""Encodes the media items of concurrent requests together, one encoder call at a time."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import torch

from epdserve.models.base import MediaEncoder

log = logging.getLogger(__name__)


@dataclass
class _Job:
    modality: str
    features: dict[str, torch.Tensor]
    done: asyncio.Future[torch.Tensor]


class EncodeBatcher:
    """`encode` one preprocessed item; items queued while the encoder runs go into its next
    call, up to `max_items` per call, grouped by modality and feature shapes.

    Encoding several images in one call changes float rounding in the last bits, as batching
    does in any engine; greedy outputs stay those of per-prompt encoding.

    `encode_if_idle` lets the thread that preprocessed an item encode it right there while
    the encoder is idle: the batch would have been that item alone, and at one request at a
    time the hops to the batcher's thread and back were a visible part of an image's TTFT.
    """

    def __init__(self, encoder: MediaEncoder, max_items: int = 16):
        self.encoder = encoder
        self.max_items = max_items
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._encoder_busy = threading.Lock()  # held by whichever thread runs the encoder
        self.calls = 0
        self.busy_s = 0.0  # wall time inside the encoder, cumulative

    async def encode(self, modality: str, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The item's `[length, H]` embedding on the encoder's device."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="encode-batcher")
        job = _Job(modality, features, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.done

    def encode_if_idle(self, modality: str, features: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """From a worker thread: the item's embedding, encoded in this thread when nothing is
        queued and the encoder is idle; None otherwise (then `encode` it)."""
        if not self._queue.empty() or not self._encoder_busy.acquire(blocking=False):
            return None
        try:
            return self._call_encoder(modality, [features])[0]
        finally:
            self._encoder_busy.release()

    async def _run(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            while len(jobs) < self.max_items and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                shapes = tuple((k, tuple(v.shape[1:])) for k, v in sorted(job.features.items()))
                groups.setdefault((job.modality, shapes), []).append(job)
            for (modality, _), group in groups.items():
                live = [j for j in group if not j.done.done()]  # skip items whose requests left
                if not live:
                    continue
                try:
                    outs = await asyncio.to_thread(self._encode, modality, live)
                except Exception as exc:  # fails these items' requests, not the worker
                    log.exception("encoding %d %s item(s) failed", len(live), modality)
                    for job in live:
                        if not job.done.done():
                            job.done.set_exception(exc)
                    continue
                for job, out in zip(live, outs, strict=True):
                    if not job.done.done():
                        job.done.set_result(out)

    def _encode(self, modality: str, jobs: list[_Job]) -> list[torch.Tensor]:
        with self._encoder_busy:
            return self._call_encoder(modality, [j.features for j in jobs])

    def _call_encoder(self, modality: str, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Under `_encoder_busy`, whichever thread calls it."""
        batch = {k: torch.cat([f[k] for f in items]) for k in items[0]}
        self.calls += 1
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                return self.encoder.encode(modality, batch)
        finally:
            self.busy_s += time.perf_counter() - start

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
