"""Encodes the media items of concurrent requests together, on one encoder thread."""

from __future__ import annotations

import asyncio
import logging
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
    """

    def __init__(self, encoder: MediaEncoder, max_items: int = 16):
        self.encoder = encoder
        self.max_items = max_items
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.calls = 0

    async def encode(self, modality: str, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The item's `[length, H]` embedding on the encoder's device."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="encode-batcher")
        job = _Job(modality, features, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.done

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
                live = [j for j in group if not j.done.done()]   # skip items whose requests left
                if not live:
                    continue
                try:
                    outs = await asyncio.to_thread(self._encode, modality, live)
                except Exception as exc:   # fails these items' requests, not the worker
                    log.exception("encoding %d %s item(s) failed", len(live), modality)
                    for job in live:
                        if not job.done.done():
                            job.done.set_exception(exc)
                    continue
                for job, out in zip(live, outs):
                    if not job.done.done():
                        job.done.set_result(out)

    def _encode(self, modality: str, jobs: list[_Job]) -> list[torch.Tensor]:
        batch = {k: torch.cat([j.features[k] for j in jobs]) for k in jobs[0].features}
        self.calls += 1
        with torch.inference_mode():
            return self.encoder.encode(modality, batch)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
