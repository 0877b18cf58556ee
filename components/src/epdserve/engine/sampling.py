"""Token sampling from last-position logits: penalties, temperature, top-k, top-p, logprobs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from epdserve.engine.base import SamplingParams, TokenLogprob


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


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, token_ids: Sequence[int], num_prompt_tokens: int
) -> torch.Tensor:
    """vLLM's penalties: repetition (HF-style, over prompt and output), presence and
    frequency (over the output, `token_ids[num_prompt_tokens:]`). Returns new `[V]` logits;
    the input is not modified."""
    if params.repetition_penalty == 1.0 and not params.presence_penalty and not params.frequency_penalty:
        return logits
    prompt_ids, output_ids = token_ids[:num_prompt_tokens], token_ids[num_prompt_tokens:]
    logits = logits.clone()
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(list(output_ids), device=logits.device), minlength=vocab)[:vocab]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from `[V]` float32 logits (penalties already applied)."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float().cpu() / params.temperature  # the per-request generator lives on the CPU
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


def token_logprob(raw_logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Log-probability of `token` and the `top` most likely tokens under the raw model
    distribution (before penalties and temperature, as vLLM reports by default)."""
    logprobs = torch.log_softmax(raw_logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top > 0 else None
    pairs = tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else ()
    return TokenLogprob(token, float(logprobs[token]), pairs)
