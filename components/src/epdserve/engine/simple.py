"""Step-1 engine: one contiguous KV cache per sequence, interleaved decoding.

Each `step` prefills the requests admitted since the last step and decodes one token for
every running sequence, so concurrent requests progress together. The paged engine replaces
it behind the same `Engine` interface.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from epdserve.engine.base import Engine, EngineOutput, EngineRequest, MultiModalInput
from epdserve.engine.sampling import apply_penalties, make_generator, sample, token_logprob
from epdserve.models.base import MultimodalModel

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    request: EngineRequest
    generator: torch.Generator | None
    cache: Any = None
    output_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_ids)


class SimpleEngine(Engine):
    def __init__(self, model: MultimodalModel, max_num_seqs: int, max_model_len: int):
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[_Sequence] = deque()
        self.running: dict[str, _Sequence] = {}

    def add_request(self, request: EngineRequest) -> None:
        self.waiting.append(_Sequence(request, make_generator(request.sampling)))

    def abort(self, request_id: str) -> None:
        self.running.pop(request_id, None)
        self.waiting = deque(s for s in self.waiting if s.request.request_id != request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> list[EngineOutput]:
        outputs = [self._guarded(seq, self._decode) for seq in list(self.running.values())]
        while self.waiting and len(self.running) < self.max_num_seqs:
            outputs.append(self._guarded(self.waiting.popleft(), self._prefill))
        return outputs

    def _guarded(self, seq: _Sequence, run) -> EngineOutput:
        """Run one sequence's model call; a failure ends that request only."""
        try:
            return run(seq)
        except Exception as exc:
            rid = seq.request.request_id
            log.exception("[%s] generation failed", rid)
            self.running.pop(rid, None)
            return EngineOutput(rid, [], "error", error=str(exc))

    def _prefill(self, seq: _Sequence) -> EngineOutput:
        req = seq.request
        embeds = self._prompt_embeddings(req)
        seq.cache = self.model.new_cache()
        logits = self.model.forward(embeds, seq.cache)
        self.running[req.request_id] = seq
        out = self._append(seq, logits)
        out.num_prompt_tokens = len(req.prompt_token_ids)
        return out

    def _decode(self, seq: _Sequence) -> EngineOutput:
        last = torch.tensor(seq.output_ids[-1:], device=self.model.device)
        return self._append(seq, self.model.forward(self.model.embed(last), seq.cache))

    def _append(self, seq: _Sequence, logits: torch.Tensor) -> EngineOutput:
        params = seq.request.sampling
        adjusted = apply_penalties(logits, params, seq.request.prompt_token_ids, seq.output_ids)
        token = sample(adjusted, params, seq.generator)
        logprobs = [token_logprob(logits, token, params.logprobs)] if params.logprobs is not None else None
        seq.output_ids.append(token)
        finish = None
        if token in params.stop_token_ids:
            finish = "stop"
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            finish = "length"
        if finish:
            del self.running[seq.request.request_id]
        return EngineOutput(seq.request.request_id, [token], finish, logprobs=logprobs)

    def _prompt_embeddings(self, req: EngineRequest) -> torch.Tensor:
        ids = torch.tensor(req.prompt_token_ids, device=self.model.device)
        embeds = self.model.embed(ids)
        for item, emb in zip(req.mm_inputs, self._encode(req.mm_inputs)):
            if emb.shape[0] != item.length:
                raise ValueError(f"media item {item.hash} gave {emb.shape[0]} embeddings "
                                 f"for {item.length} placeholders")
            embeds[item.offset : item.offset + item.length] = emb.to(embeds.dtype)
        return embeds

    def _encode(self, items: list[MultiModalInput]) -> list[torch.Tensor]:
        """Embeddings per item; items with encoder inputs are batched per modality."""
        result: list[torch.Tensor | None] = [it.embeddings for it in items]
        for modality in {it.modality for it in items if it.features is not None}:
            idx = [i for i, it in enumerate(items) if it.modality == modality and it.features is not None]
            batch = {k: torch.cat([items[i].features[k] for i in idx]) for k in items[idx[0]].features}
            for i, emb in zip(idx, self.model.encode(modality, batch)):
                result[i] = emb
        return result  # type: ignore[return-value]
