"""Token sampling from last-position logits."""

from __future__ import annotations

import torch

from epdserve.engine.base import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A per-request RNG: seeded requests are reproducible, greedy ones need none."""
    if params.temperature <= 0:
        return None
    gen = torch.Generator()
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from `[V]` float32 logits."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float().cpu() / params.temperature   # the per-request generator lives on the CPU
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
