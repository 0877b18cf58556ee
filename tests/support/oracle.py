"""Correctness oracle: what plain ``transformers`` generates for a request.

Tests compare the server's token ids with ``hf_greedy`` on the same model directory, inputs
and ``max_tokens``. The model loads as ``from_pretrained(dir)`` does by default (the
checkpoint's dtype, as the server without ``--dtype``) with the directory's default
``AutoProcessor`` (torchvision image processing where torchvision is installed).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from epdserve.tools.images import synthetic_png

# Requests whose greedy output on the default tiny llava (seed 0) ends in EOS, for testing
# stop handling (finish_reason "stop"); the token counts include the EOS.
EOS_PROMPT, EOS_PROMPT_TOKENS = "Why? 14", 8
EOS_CHAT, EOS_CHAT_TOKENS = [{"role": "user", "content": "Hi 5"}], 19


@lru_cache(maxsize=8)
def _load(model_dir: str, config_mtime_ns: int) -> tuple[Any, Any]:
    """(processor, eval model); the mtime in the key drops a rebuilt directory."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    return processor, model


def load_hf(model_dir: str | Path) -> tuple[Any, Any]:
    """The cached (processor, model) pair for ``model_dir``; do not modify them."""
    path = Path(model_dir).resolve()
    return _load(str(path), (path / "config.json").stat().st_mtime_ns)


def _hf_part(part: dict) -> dict:
    """One OpenAI content part -> the HF chat-template part."""
    if part["type"] == "text":
        return {"type": "text", "text": part["text"]}
    if part["type"] == "image_url":
        return {"type": "image"}
    raise ValueError(f"unsupported content part type {part['type']!r}")


def hf_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages -> HF template messages (string contents are kept as they are)."""
    return [
        {"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
         else [_hf_part(p) for p in m["content"]]}
        for m in messages
    ]


def _data_url_images(messages: list[dict]) -> list[bytes]:
    """The bytes of every base64 ``data:`` image URL in ``messages``, in order."""
    return [
        base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
        for m in messages if not isinstance(m["content"], str)
        for p in m["content"]
        if p["type"] == "image_url" and p["image_url"]["url"].startswith("data:")
    ]


def hf_greedy(
    model_dir: str | Path, messages: list[dict] | None = None, *, prompt: str | None = None,
    images: list[bytes] | tuple[bytes, ...] = (), max_tokens: int = 16, processor_kwargs: dict | None = None,
) -> list[int]:
    """Greedy new token ids for a chat (``messages``) or a raw completion ``prompt``.

    ``images`` are encoded images (PNG, JPEG, ...) in prompt order; when empty, the images
    come from the ``data:`` URLs of the messages. The result stops after EOS like
    ``generate`` does and then includes the EOS id; otherwise it has ``max_tokens`` ids.
    ``processor_kwargs`` go to the HF processor's call (e.g. Qwen-VL's ``size``).
    """
    return hf_generate(model_dir, messages, prompt=prompt, images=images, max_tokens=max_tokens,
                       processor_kwargs=processor_kwargs)[1]


def hf_generate(
    model_dir: str | Path, messages: list[dict] | None = None, *, prompt: str | None = None,
    images: list[bytes] | tuple[bytes, ...] = (), max_tokens: int = 16, processor_kwargs: dict | None = None,
) -> tuple[list[int], list[int]]:
    """(prompt token ids, greedy new token ids), with the arguments of ``hf_greedy``."""
    if (messages is None) == (prompt is None):
        raise ValueError("give exactly one of messages and prompt")
    path = Path(model_dir).resolve()
    key = (str(path), (path / "config.json").stat().st_mtime_ns, json.dumps(messages), prompt,
           tuple(hashlib.sha256(b).hexdigest() for b in images), max_tokens, json.dumps(processor_kwargs))
    if key not in _GENERATED:   # the same case on every topology of a family: generated once
        _GENERATED[key] = _generate(path, messages, prompt, images, max_tokens, processor_kwargs or {})
    prompt_ids, new_ids = _GENERATED[key]
    return list(prompt_ids), list(new_ids)


_GENERATED: dict[tuple, tuple[list[int], list[int]]] = {}


def _generate(model_dir: Path, messages: list[dict] | None, prompt: str | None,
              images: list[bytes] | tuple[bytes, ...], max_tokens: int,
              processor_kwargs: dict) -> tuple[list[int], list[int]]:
    processor, model = load_hf(model_dir)
    if messages is not None:
        text = processor.apply_chat_template(
            hf_messages(messages), add_generation_prompt=True, tokenize=False)
        images = images or _data_url_images(messages)
    else:
        text = prompt
    pil = [decode_image(b) for b in images]
    # Float inputs in the model's dtype: Llama 4's image processor returns bfloat16 pixels.
    inputs = processor(text=text, images=pil or None, return_tensors="pt", **processor_kwargs).to(model.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_tokens)
    prompt_ids = inputs["input_ids"][0].tolist()
    return prompt_ids, out[0, len(prompt_ids):].tolist()


def hf_text(model_dir: str | Path, token_ids: list[int]) -> str:
    """``token_ids`` decoded by the directory's tokenizer, special tokens skipped."""
    processor, _ = load_hf(model_dir)
    return processor.tokenizer.decode(token_ids, skip_special_tokens=True)


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> the PIL image a `transformers` user hands the processor: as
    decoded, in its own mode (the processor converts RGBA, LA and P images itself)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def make_image(seed: int, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    """A deterministic PNG of ``size`` (W, H) in ``mode`` (RGB, RGBA, LA, P); see `synthetic_png`."""
    return synthetic_png(seed, size, mode)


def data_url(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URL for an OpenAI ``image_url`` part."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
