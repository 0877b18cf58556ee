"""Llama 4 against `transformers`: the tiny model, the processor's image token layout, the
paged engine's greedy output, and the split-off vision encoder."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from epdserve.config import MediaConfig
from epdserve.engine.paged import EngineConfig, PagedEngine
from epdserve.engine.scheduler import SchedulerConfig
from epdserve.media.fetch import MediaFetcher
from epdserve.media.image import probe_image
from epdserve.models.llama4 import Llama4Family
from epdserve.models.registry import load_family
from epdserve.processor.prompt import PromptBuilder
from epdserve.protocol.openai import ChatCompletionRequest
from support.engine import assert_no_leak, drive
from support.engine_requests import engine_request
from support.oracle import data_url, decode_image, hf_greedy, load_hf, make_image

# (width, height) -> tile grid with max_patches 4 on 32 px tiles: 1x1 (no global tile), 1x2,
# 3x1 and 2x2 (+ a global tile each), and a panorama squeezed into 1x4.
SIZES = {"one-tile": (20, 20), "1x2": (64, 32), "3x1": (32, 96), "2x2": (64, 48), "1x4": (200, 33)}


@pytest.fixture(scope="module")
def runner(tiny_llama4_runner):
    """The worker-side model, with the CPU kernels as a worker loads it."""
    return tiny_llama4_runner


def user_turn(text: str, images: list[bytes]) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(png)}} for png in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def test_tiny_model_loads_with_auto_classes(tiny_llama4: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_llama4)
    model, info = AutoModelForImageTextToText.from_pretrained(tiny_llama4, output_loading_info=True)
    assert type(model).__name__ == "Llama4ForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(processor).__name__ == "Llama4Processor"
    text = model.config.text_config
    # Every kind of layer is there: dense and MoE, RoPE and NoPE.
    assert 0 < len(text.moe_layers) < text.num_hidden_layers
    assert 0 in text.no_rope_layers and 1 in text.no_rope_layers
    assert "chunked_attention" in text.layer_types


def test_context_length_is_capped_at_the_attention_chunk(tiny_llama4: Path) -> None:
    family = load_family(tiny_llama4)
    assert isinstance(family, Llama4Family)
    text = family.hf_config.text_config
    assert family.context_length == text.attention_chunk_size < text.max_position_embeddings


@pytest.mark.parametrize("sizes", [[s] for s in SIZES.values()] + [[SIZES["2x2"], SIZES["one-tile"]]],
                         ids=[*SIZES, "two-images"])
def test_prompt_equals_the_hf_processor(tiny_llama4: Path, sizes: list[tuple[int, int]]) -> None:
    """The processor's prompt (image placeholders expanded from each image's size alone) is
    token for token the HF processor's, and each item's embed mask marks its <|patch|> tokens."""
    processor, _ = load_hf(tiny_llama4)
    pngs = [make_image(i, size) for i, size in enumerate(sizes)]
    messages = user_turn("What is shown?", pngs)
    family = load_family(tiny_llama4)
    media = MediaConfig()
    builder = PromptBuilder(family, processor.tokenizer, processor, media, True, MediaFetcher(media))
    prompt = asyncio.run(builder.build(ChatCompletionRequest(model="m", messages=messages)))

    hf_text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * len(pngs) + [{"type": "text", "text": "What is shown?"}]}],
        add_generation_prompt=True, tokenize=False)
    expected = processor(text=hf_text, images=[decode_image(p) for p in pngs])["input_ids"][0]
    assert prompt.token_ids == list(expected)
    patch = family.hf_config.image_token_index
    assert [len(item.embed_mask) for item in prompt.media] == [item.length for item in prompt.media]
    masked = [item.offset + i for item in prompt.media for i, flag in enumerate(item.embed_mask) if flag]
    assert masked == [i for i, t in enumerate(prompt.token_ids) if t == patch]
    for item, png in zip(prompt.media, pngs, strict=True):
        assert sum(item.embed_mask) == family.num_placeholders(probe_image(png))


CASES = {
    "text": ("Tell me about the farmer and the boat", [], 12),
    "one-image": ("What is shown?", [make_image(1)], 12),
    "two-images": ("Compare them.", [make_image(2), make_image(3, SIZES["one-tile"])], 10),
    "wide-image": ("Describe it", [make_image(4, SIZES["1x4"])], 12),
}


@pytest.mark.parametrize("config", [
    EngineConfig(block_size=16),
    # 24-token steps split every image's 80 positions over several chunks.
    EngineConfig(block_size=4, scheduler=SchedulerConfig(max_num_batched_tokens=24)),
], ids=["roomy", "chunked"])
def test_engine_matches_generate(tiny_llama4: Path, runner, config: EngineConfig) -> None:
    engine = PagedEngine(runner, config)
    for rid, (text, images, n) in CASES.items():
        engine.add_request(engine_request(tiny_llama4, runner, rid, text, images, n))
    got, _ = drive(engine)
    for rid, (text, images, n) in CASES.items():
        assert got[rid] == hf_greedy(tiny_llama4, user_turn(text, images), images=images, max_tokens=n), rid
    assert_no_leak(engine)


@torch.inference_mode()
def test_split_encoder_equals_the_full_model(tiny_llama4: Path) -> None:
    encoder = load_family(tiny_llama4).load_encoder(None, torch.device("cpu"))
    assert all(p.is_meta for p in encoder.hf.language_model.parameters())   # no text weights read
    processor, model = load_hf(tiny_llama4)
    pil = [decode_image(make_image(5, size)) for size in (SIZES["2x2"], SIZES["one-tile"], SIZES["3x1"])]
    got = encoder.encode("image", encoder.preprocess("image", pil))
    pixels = processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
    whole = model.get_image_features(pixel_values=pixels.to(model.dtype)).pooler_output
    expected = whole.flatten(0, 1).split([5 * 16, 16, 4 * 16])
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)
