"""Tiny Qwen2.5-VL and Qwen3-VL model directories (see `epdserve.tools.tiny_model`).

Both share Qwen's tokens and published chat template and a dynamic-resolution image
processor: an image is resized to multiples of ``patch_size * merge`` (merge 2) between
``QWEN_MIN_PIXELS`` and ``QWEN_MAX_PIXELS`` and yields one token per merged 2x2 patch block
(the default 64x48 test image: 48 tokens at 4px patches). The text decoder's rotary is M-RoPE
over (temporal, height, width) sections: contiguous in Qwen2.5-VL, interleaved in Qwen3-VL.

  qwen2_5_vl -- Qwen2 decoder (q/k/v biases); vision blocks alternate window attention (16px
                windows, 2x2 merged patches) and full attention (``fullatt_block_indexes``).
  qwen3_vl   -- Qwen3 decoder (per-head q/k RMSNorm); the vision model's deepstack mergers
                feed every vision layer's features (``deepstack_visual_indexes``) into the
                first text layers, the last of them the decoder's last layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import (
    BaseVideoProcessor,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from epdserve.tools.tiny_spec import MAX_POSITIONS, VISION_HEADS, TinySpec, init_model, save_model, text_sizes
from epdserve.tools.tiny_tokenizer import train_bpe_tokenizer

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_MERGE = 2
QWEN_MIN_PIXELS = 16 * 16
QWEN_MAX_PIXELS = 64 * 64
QWEN_ROPE_THETA = 10000.0

# Qwen2-VL's published chat template (Qwen2.5-VL and Qwen3-VL ship variants of it): a default
# system turn, then <|vision_start|><|image_pad|><|vision_end|> per image part.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(spec: TinySpec) -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    tokenizer = train_bpe_tokenizer(
        spec.vocab_size,
        QWEN_SPECIALS,
        bos=None,
        eos="<|im_end|>",
        unk=None,
        pad="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        model_max_length=MAX_POSITIONS,
    )
    return tokenizer, {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}


def _image_processor(spec: TinySpec) -> Qwen2VLImageProcessor:
    return Qwen2VLImageProcessor(
        size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
        patch_size=spec.patch_size,
        temporal_patch_size=2,
        merge_size=QWEN_MERGE,
    )


def _mrope_section(spec: TinySpec) -> list[int]:
    """Rotary frequencies (head_dim / 2) split over (t, h, w) as the published 16:24:24."""
    half = spec.hidden_size // spec.num_heads // 2
    h = w = 3 * half // 8
    return [half - h - w, h, w]


def _build(
    spec: TinySpec,
    out: Path,
    model_cls: type[PreTrainedModel],
    config_cls: type[PretrainedConfig],
    processor_cls: type[ProcessorMixin],
    video_processor_cls: type[BaseVideoProcessor],
    rope: dict[str, Any],
    text: dict[str, Any],
    vision: dict[str, Any],
) -> None:
    """What both families share; `rope`, `text` and `vision` add their own config fields."""
    tokenizer, ids = _tokenizer(spec)
    text_config = dict(
        text_sizes(spec),
        rms_norm_eps=1e-6,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "rope_theta": QWEN_ROPE_THETA, "mrope_section": _mrope_section(spec)}
        | rope,
        **text,
    )
    vision_config = dict(
        depth=spec.vision_layers,
        hidden_size=spec.vision_hidden_size,
        intermediate_size=2 * spec.vision_hidden_size,
        num_heads=VISION_HEADS,
        patch_size=spec.patch_size,
        spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=2,
        out_hidden_size=spec.hidden_size,
        **vision,
    )
    config = config_cls(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = init_model(model_cls, config, spec.seed)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    save_model(model, out, spec.dtype)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    processor = processor_cls(
        image_processor=_image_processor(spec),
        tokenizer=tokenizer,
        video_processor=video_processor_cls(patch_size=spec.patch_size, merge_size=QWEN_MERGE),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)


def build_qwen2_5_vl(spec: TinySpec, out: Path) -> None:
    """Qwen2.5-VL: Qwen2 text model with M-RoPE + windowed ViT with a 2x2 patch merger."""
    vision = dict(window_size=spec.patch_size * QWEN_MERGE * 2, fullatt_block_indexes=[spec.vision_layers - 1])
    _build(
        spec,
        out,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLVideoProcessor,
        rope={},
        text={},
        vision=vision,
    )


def build_qwen3_vl(spec: TinySpec, out: Path) -> None:
    """Qwen3-VL: Qwen3 text model with interleaved M-RoPE + ViT with deepstack mergers."""
    vision = dict(
        num_position_embeddings=64,  # an 8x8 table, interpolated to each image's grid
        deepstack_visual_indexes=list(range(min(spec.vision_layers, spec.num_layers))),
    )
    _build(
        spec,
        out,
        Qwen3VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
        rope={"mrope_interleaved": True},
        text={"head_dim": spec.hidden_size // spec.num_heads},
        vision=vision,
    )
