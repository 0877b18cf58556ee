"""Engine requests built the way the processor builds them, with the HF processor."""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch

from epdserve.engine.base import EngineEvent, EngineOutput, EngineRequest, KVAdmitted, MultiModalInput, SamplingParams
from epdserve.engine.paged import PagedEngine
from epdserve.media.image import decode_image, probe_image
from epdserve.models.base import ModelFamily
from epdserve.models.registry import load_family
from support.oracle import load_hf


@lru_cache(maxsize=8)
def family_of(model_dir) -> ModelFamily:
    return load_family(model_dir)


def engine_request(model_dir, runner, rid: str, text: str, images: list[bytes], max_tokens: int) -> EngineRequest:
    """The request the processor would send for one user turn, built with the HF processor:
    each image's tokens (and embed mask) are the family's expansion, found in the HF ids."""
    processor, model = load_hf(model_dir)
    family = family_of(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pil = [decode_image(b) for b in images]
    ids = processor(text=prompt, images=pil or None, return_tensors="pt")["input_ids"][0].tolist()
    mm, pos = [], 0
    for k, img in enumerate(pil):
        expansion = family.expand_placeholder("image", probe_image(images[k]))
        tokens, mask = expansion.token_ids, expansion.embed_mask
        start = next((i for i in range(pos, len(ids)) if ids[i:i + len(tokens)] == tokens), None)
        assert start is not None, f"image {k}'s expansion is not in the HF processor's ids"
        mm.append(MultiModalInput("image", hashlib.sha256(images[k]).hexdigest(), start, len(tokens),
                                  features=runner.preprocess("image", [img]),
                                  embed_mask=None if mask is None else torch.tensor(mask), grid=expansion.grid))
        pos = start + len(tokens)
    eos = model.generation_config.eos_token_id
    stops = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return EngineRequest(rid, ids, SamplingParams(max_tokens=max_tokens, stop_token_ids=stops), mm)


def load_kv(dst, dst_blocks: list[int], src, src_blocks: list[int]) -> None:
    """What a decode worker's READ does: `src_blocks` of one engine's KV pool into `dst_blocks`
    of another's (PagedEngines), every layer's K and V."""
    dst_kv, src_kv = dst.runner.kv, src.runner.kv
    for d, s in zip(dst_kv.key + dst_kv.value, src_kv.key + src_kv.value, strict=True):
        d[dst_blocks] = s[src_blocks]


def step_checked(engine: PagedEngine) -> list[EngineEvent]:
    """`engine.step()`, then `engine.check_invariants()`: the block pool, held KV and n > 1
    fan-out agree after every step the tests take."""
    events = engine.step()
    engine.check_invariants()
    return events


def step_outputs(engine: PagedEngine) -> list[EngineOutput]:
    """`step_checked`, for requests that load no KV: every event is an `EngineOutput`."""
    events = step_checked(engine)
    assert not any(isinstance(e, KVAdmitted) for e in events), events
    return [e for e in events if isinstance(e, EngineOutput)]
