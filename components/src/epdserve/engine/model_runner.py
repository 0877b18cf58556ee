"""One forward over a batch of scheduled chunks: inputs, media splicing, sampling."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from epdserve.attention.kv_cache import KVCache
from epdserve.attention.paged import AttentionMetadata
from epdserve.engine.base import TokenLogprob
from epdserve.engine.sampling import apply_penalties, sample, token_logprob
from epdserve.engine.scheduler import ScheduledChunk
from epdserve.engine.sequence import Sequence
from epdserve.models.base import MediaSpan, MultimodalModel, RopePositions

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    sampled: dict[str, int] = field(default_factory=dict)  # request id -> new token
    failed: dict[str, str] = field(default_factory=dict)  # request id -> error message
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)


class ModelRunner:
    """Owns the KV cache; runs scheduled chunks through the model and samples.

    Media embeddings are computed when a chunk first touches an item's placeholders and kept
    on the sequence until its last placeholder is computed (chunks may split an item).
    """

    def __init__(self, model: MultimodalModel, kv: KVCache):
        self.model = model
        self.kv = kv

    def run(self, chunks: list[ScheduledChunk]) -> StepResult:
        result = StepResult()
        ready = []
        for chunk in chunks:
            try:
                self._encode_media(chunk)
                ready.append(chunk)
            except Exception as exc:  # a bad media item fails its request only
                log.exception("[%s] encoding media failed", chunk.seq.request_id)
                result.failed[chunk.seq.request_id] = str(exc)
        if not ready:
            return result
        device = self.model.device
        ids = torch.tensor([t for c in ready for t in c.seq.token_ids[c.start : c.start + c.num_tokens]], device=device)
        embeds = self.model.embed(ids)
        row = 0
        for chunk in ready:
            self._splice_media(chunk, embeds, row)
            row += chunk.num_tokens
        meta = self._metadata(ready)
        hidden = self.model.forward(embeds, meta, self.kv)  # rows of the sampling chunks
        sampling = [c for c in ready if c.samples]
        if sampling:
            logits = self.model.compute_logits(hidden)
            for chunk, raw in zip(sampling, logits, strict=True):
                seq, params = chunk.seq, chunk.seq.request.sampling
                adjusted = apply_penalties(raw, params, seq.token_ids, seq.num_prompt_tokens)
                token = sample(adjusted, params, seq.generator)
                result.sampled[seq.request_id] = token
                if params.logprobs is not None:
                    result.logprobs[seq.request_id] = token_logprob(raw, token, params.logprobs)
        return result

    def _metadata(self, chunks: list[ScheduledChunk]) -> AttentionMetadata:
        meta = AttentionMetadata.build(
            [(c.seq.block_table, c.start, c.num_tokens) for c in chunks],
            self.kv.block_size,
            self.model.device,
            [c.samples for c in chunks],
        )
        ropes = [self._rope(c.seq) for c in chunks]
        if any(r is not None for r in ropes):
            rows = [r.at(c.start, c.num_tokens) for r, c in zip(ropes, chunks, strict=True) if r is not None]
            if len(rows) < len(chunks):
                raise ValueError("a batch mixes sequences with and without rotary positions")
            axes = max(r.shape[0] for r in rows)
            meta.rope_positions = torch.cat([r.expand(axes, -1) for r in rows], dim=1).to(self.model.device)
        return meta

    def _rope(self, seq: Sequence) -> RopePositions | None:
        """`seq`'s rotary positions (M-RoPE models), computed once; None for other models."""
        if seq.rope is None:
            delta = seq.request.rope_delta
            if delta is not None:
                seq.rope = RopePositions(None, delta)
            else:
                spans = [MediaSpan(m.offset, m.length, m.grid) for m in seq.media]
                seq.rope = self.model.rope_positions(seq.token_ids[: seq.num_prompt_tokens], spans)
        return seq.rope

    def _encode_media(self, chunk: ScheduledChunk) -> None:
        """Encoder outputs for the items this chunk touches, batched per modality as
        `transformers` encodes one prompt's items together."""
        seq = chunk.seq
        if not seq.mm_embeddings:
            seq.mm_embeddings = [item.embeddings for item in seq.media]
        end = chunk.start + chunk.num_tokens
        todo = [
            i
            for i, item in enumerate(seq.media)
            if seq.mm_embeddings[i] is None and item.offset < end and item.offset + item.length > chunk.start
        ]
        for modality in {seq.media[i].modality for i in todo}:
            idx = [i for i in todo if seq.media[i].modality == modality]
            feats = [f for i in idx if (f := seq.media[i].features) is not None]
            if len(feats) < len(idx):
                raise ValueError(f"{modality} item without features or embeddings")
            batch = {k: torch.cat([f[k] for f in feats]) for k in feats[0]}
            for i, emb in zip(idx, self.model.encode(modality, batch), strict=True):
                if emb.shape[0] != seq.media[i].num_embeddings:
                    raise ValueError(
                        f"media item {seq.media[i].hash} gave {emb.shape[0]} embeddings "
                        f"for {seq.media[i].num_embeddings} placeholders"
                    )
                seq.mm_embeddings[i] = emb

    def _splice_media(self, chunk: ScheduledChunk, embeds: torch.Tensor, row: int) -> None:
        """Overwrite placeholder rows of this chunk with encoder outputs (only at an item's
        `embed_mask` positions, when it has one); drop finished items."""
        seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
        for i, item in enumerate(seq.media):
            lo, hi = max(start, item.offset), min(end, item.offset + item.length)
            if lo >= hi:
                continue
            emb, rows = seq.mm_embeddings[i], embeds[row + lo - start : row + hi - start]
            assert emb is not None, f"media item {item.hash} reached the model unencoded"  # _encode_media ran
            first, last = lo - item.offset, hi - item.offset
            if item.embed_mask is None:
                rows.copy_(emb[first:last])
            else:
                # The item's embedding rows run over its masked positions only: the chunk's
                # first one is the number of masked positions before the chunk.
                mask = item.embed_mask[first:last].to(embeds.device)
                skipped = int(item.embed_mask[:first].sum())
                rows[mask] = emb[skipped : skipped + int(mask.sum())].to(embeds.dtype)
            if hi == item.offset + item.length:
                seq.mm_embeddings[i] = item.embeddings  # None unless precomputed: frees memory
