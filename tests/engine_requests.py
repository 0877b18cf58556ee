"""Engine requests built the way the processor builds them, with the HF processor."""

from __future__ import annotations

import hashlib

from epdserve.engine.base import EngineRequest, MultiModalInput, SamplingParams
from epdserve.media.image import decode_image
from oracle import load_hf


def engine_request(model_dir, runner, rid: str, text: str, images: list[bytes], max_tokens: int) -> EngineRequest:
    """The request the processor would send for one user turn, built with the HF processor."""
    processor, _ = load_hf(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pil = [decode_image(b) for b in images]
    ids = processor(text=prompt, images=pil or None, return_tensors="pt")["input_ids"][0].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    mm, pos = [], 0
    for k, img in enumerate(pil):
        start = ids.index(image_id, pos)
        end = start
        while end < len(ids) and ids[end] == image_id:
            end += 1
        mm.append(MultiModalInput("image", hashlib.sha256(images[k]).hexdigest(), start, end - start,
                                  features=runner.preprocess("image", [img])))
        pos = end
    eos = processor.tokenizer.eos_token_id
    return EngineRequest(rid, ids, SamplingParams(max_tokens=max_tokens, stop_token_ids=(eos,)), mm)


def load_kv(dst, dst_blocks: list[int], src, src_blocks: list[int]) -> None:
    """What a decode worker's READ does: `src_blocks` of one engine's KV pool into `dst_blocks`
    of another's (PagedEngines), every layer's K and V."""
    dst_kv, src_kv = dst.runner.kv, src.runner.kv
    for d, s in zip(dst_kv.key + dst_kv.value, src_kv.key + src_kv.value):
        d[dst_blocks] = s[src_blocks]
