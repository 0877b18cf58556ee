"""Tiny random-weight Hugging Face model directories for tests and benchmarks.

    python -m epdserve.tools.tiny_model --family llava|llama4|qwen2_5_vl|qwen3_vl --out DIR [--preset tiny|bench]
        [--hidden-size N] [--num-layers N] [--num-heads N] [--num-kv-heads N]
        [--intermediate-size N] [--vocab-size N] [--image-size N] [--patch-size N]
        [--vision-hidden-size N] [--vision-layers N] [--seed N]
        [--weight-layout transformers|llava-hf] [--dtype float32|bfloat16]

The directory is a standard one: ``AutoProcessor.from_pretrained(DIR)`` and
``AutoModelForImageTextToText.from_pretrained(DIR)`` load it offline. Everything is built
locally: the tokenizer is a byte-level BPE trained on a built-in English corpus, the weights
are random (deterministic per ``--seed``) and scaled x3 so greedy outputs depend on the input.

Presets (llava; build times on a 2-core CPU, measured with transformers 5.23):
  tiny  -- hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128, vocab 1024, 32px
           images in 8px patches (16 image tokens per image), CLIP tower hidden 32 x 2 layers
           with 4 heads; 0.24 M parameters (1 MB); builds in 0.2 s (4 s as a fresh CLI process,
           mostly imports).
  bench -- hidden 512, 8 layers, 8 heads, 4 kv heads, intermediate 1376, vocab 8192, 224px
           images in 14px patches (256 image tokens per image), CLIP tower hidden 256 x 4
           layers; 35.4 M parameters (141 MB in float32); builds in 1.5 s (6 s via the CLI).
Image tokens per image: (image_size // patch_size) ** 2 (CLIP's CLS feature is dropped).

Presets (llama4; the same sizes, except 4 layers and, in ``tiny``, 4px patches):
  tiny  -- hidden 64, 4 layers (0, 2: dense MLP 128, RoPE + qk-norm, chunked attention;
           1, 3: MoE of 4 experts of 64 + a shared one, top-1, NoPE with temperature tuning,
           floor_scale 8 so that it matters), 4 heads of 16, 2 kv heads, vocab 1024,
           attention_chunk_size 1024 (the family caps its context there), 32px tiles in 4px
           patches, pixel shuffle 0.5 (16 image tokens per tile), up to 4 tiles + a global
           tile (16 to 80 image tokens), vision hidden 32 x 2 layers; 0.40 M parameters
           (1.6 MB); builds in 0.7 s.
  bench -- hidden 512, 8 layers, 224px tiles in 14px patches (64 image tokens per tile, 64
           to 320 per image), vision hidden 256 x 4 layers; 48.7 M parameters (195 MB in
           float32); builds in 7 s.
The tokenizer has Llama 4's special tokens and does not prepend <|begin_of_text|>: Llama 4's
published chat template (the one `transformers` ships) writes it. EOS: <|end_of_text|>,
<|eom|>, <|eot|> (generation_config), as the published checkpoints.

Qwen2.5-VL and Qwen3-VL (``tools/tiny_qwen.py``): the preset's sizes with 4px patches and
dynamic resolution (the 64x48 test image: 48 image tokens); the tiny ones build in about 1 s.

Weight layouts (``--weight-layout``; llama4 writes what transformers 5 saves: ``vision_model.*``,
``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``):
  transformers -- what transformers 5 ``save_pretrained`` writes: ``vision_tower.embeddings.*``,
                  ``language_model.model.*``, ``language_model.lm_head.*``,
                  ``multi_modal_projector.*``.
  llava-hf     -- the published llava-hf/llava-1.5-*-hf checkpoints: the same, except the CLIP
                  tower sits under ``vision_tower.vision_model.*``.

New families are one builder function each, registered in ``FAMILIES``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    Llama4Config,
    Llama4ForConditionalGeneration,
    Llama4ImageProcessor,
    Llama4Processor,
    Llama4TextConfig,
    Llama4VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llama4.processing_llama4 import chat_template as LLAMA4_CHAT_TEMPLATE
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from epdserve.tools.tiny_qwen import build_qwen2_5_vl, build_qwen3_vl
from epdserve.tools.tiny_spec import (
    DTYPES,
    MAX_POSITIONS,
    PRESETS,
    VISION_HEADS,
    WEIGHT_LAYOUTS,
    TinySpec,
    init_model,
    save_model,
    text_sizes,
)
from epdserve.tools.tiny_tokenizer import train_bpe_tokenizer

# Per-family defaults under the preset: Llama 4's tiny model needs 4 layers to hold a dense, an
# MoE, a RoPE and a NoPE layer twice, and 4px patches for 16 image tokens per tile.
# Qwen's 4px patches give 48 tokens for the 64x48 test image (1 to 64 within its pixel bounds).
FAMILY_DEFAULTS: dict[str, dict[str, int]] = {
    "llava": {},
    "llama4": {"num_layers": 4, "patch_size": 4},
    "qwen2_5_vl": {"patch_size": 4},
    "qwen3_vl": {"patch_size": 4},
}

# --------------------------------------------------------------------------- llava

# LLaVA-1.5 (llava-hf) template, extended to accept string contents.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _llava_hf_key(key: str) -> str:
    """transformers-5 key -> published llava-hf key (the CLIP tower gains ``vision_model``)."""
    if key.startswith("vision_tower."):
        return "vision_tower.vision_model." + key.removeprefix("vision_tower.")
    return key


def build_llava(spec: TinySpec, out: Path) -> None:
    """LLaVA-1.5: Llama text model + CLIP vision tower, ``<image>`` expanded per patch."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tokenizer = train_bpe_tokenizer(
        spec.vocab_size,
        specials,
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        pad="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=MAX_POSITIONS,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    text_config = LlamaConfig(
        **text_sizes(spec),
        rms_norm_eps=1e-5,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
    )
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=4 * spec.vision_hidden_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=VISION_HEADS,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
    )
    tokens_per_image = (spec.image_size // spec.patch_size) ** 2
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=ids["<image>"],
        image_seq_length=tokens_per_image,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    model = init_model(LlavaForConditionalGeneration, config, spec.seed)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
    )
    save_model(model, out, spec.dtype, _llava_hf_key if spec.weight_layout == "llava-hf" else None)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,  # CLS, dropped by "default"
    )
    processor.save_pretrained(out)


# --------------------------------------------------------------------------- llama4

LLAMA4_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
]
LLAMA4_EXPERTS = 4
LLAMA4_MAX_TILES = 4  # max_patches: images become 1, 2, 3 or 4 tiles (+ a global tile)
LLAMA4_CHUNK_SIZE = 1024  # attention_chunk_size, below MAX_POSITIONS: our context cap shows
LLAMA4_FLOOR_SCALE = 8  # temperature tuning changes queries from position 7 on (real: 8192)


def build_llama4(spec: TinySpec, out: Path) -> None:
    """Llama 4: MoE text model (odd layers MoE, even dense; odd layers NoPE with temperature
    tuning, even RoPE with qk-norm) + tiling vision model; the published chat template."""
    # Llama 4's template writes <|begin_of_text|> itself; the tokenizer adds nothing.
    tokenizer = train_bpe_tokenizer(
        spec.vocab_size,
        LLAMA4_SPECIALS,
        bos="<|begin_of_text|>",
        eos="<|eot|>",
        unk=None,
        pad="<|finetune_right_pad|>",
        prepend_bos=False,
        model_max_length=MAX_POSITIONS,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAMA4_SPECIALS}
    eos = [ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]]
    text_config = Llama4TextConfig(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        intermediate_size=spec.intermediate_size // 2,
        intermediate_size_mlp=spec.intermediate_size,
        vocab_size=spec.vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        num_local_experts=LLAMA4_EXPERTS,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        no_rope_layer_interval=2,
        attention_chunk_size=LLAMA4_CHUNK_SIZE,
        floor_scale=LLAMA4_FLOOR_SCALE,
        use_qk_norm=True,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=eos,
        pad_token_id=ids["<|finetune_right_pad|>"],
    )
    # pixel_shuffle_ratio 0.5 folds 2x2 patches into one token of 4x the width, which the
    # adapter MLP takes in: its input (intermediate_size) must be 4 * hidden_size.
    projector_dim = 2 * spec.vision_hidden_size
    vision_config = Llama4VisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=4 * spec.vision_hidden_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=VISION_HEADS,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        pixel_shuffle_ratio=0.5,
        projector_input_dim=projector_dim,
        projector_output_dim=projector_dim,
        vision_output_dim=projector_dim,
    )
    config = Llama4Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=ids["<|patch|>"],
        boi_token_index=ids["<|image_start|>"],
        eoi_token_index=ids["<|image_end|>"],
        pad_token_id=ids["<|finetune_right_pad|>"],
        tie_word_embeddings=False,
    )
    model = init_model(Llama4ForConditionalGeneration, config, spec.seed)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=eos,
        pad_token_id=ids["<|finetune_right_pad|>"],
    )
    save_model(model, out, spec.dtype)

    image_processor = Llama4ImageProcessor(
        size={"height": spec.image_size, "width": spec.image_size},
        max_patches=LLAMA4_MAX_TILES,
    )
    tokenizer.chat_template = LLAMA4_CHAT_TEMPLATE
    processor = Llama4Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        pixel_shuffle_ratio=0.5,
        chat_template=LLAMA4_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)


# --------------------------------------------------------------------------- entry points

FAMILIES: dict[str, Callable[[TinySpec, Path], None]] = {
    "llava": build_llava,
    "llama4": build_llama4,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
}


def make_spec(preset: str = "tiny", family: str = "llava", **overrides: Any) -> TinySpec:
    """The family's defaults, then the preset's sizes, then ``overrides`` (TinySpec field
    names), checked."""
    spec = dataclasses.replace(TinySpec(), **{**FAMILY_DEFAULTS[family], **PRESETS[preset], **overrides})
    if spec.weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout must be one of {WEIGHT_LAYOUTS}")
    if spec.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}")
    if spec.hidden_size % spec.num_heads or spec.num_heads % spec.num_kv_heads:
        raise ValueError("hidden_size must be a multiple of num_heads, num_heads of num_kv_heads")
    if spec.image_size % spec.patch_size or spec.vision_hidden_size % VISION_HEADS:
        raise ValueError(
            f"image_size must be a multiple of patch_size, vision_hidden_size a multiple of {VISION_HEADS}"
        )
    return spec


def build_tiny_model(family: str, out: Path | str, *, preset: str = "tiny", **overrides: Any) -> Path:
    """Write a tiny ``family`` model directory to ``out`` (created if needed); return it.

    ``overrides`` are TinySpec fields (hidden_size=..., seed=..., weight_layout=...).
    The same arguments always give byte-identical files.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    FAMILIES[family](make_spec(preset, family, **overrides), out)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: flags are the TinySpec fields in kebab case; unset ones come from the preset."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    for field in dataclasses.fields(TinySpec):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "weight_layout":
            parser.add_argument(flag, choices=WEIGHT_LAYOUTS)
        elif field.name == "dtype":
            parser.add_argument(flag, choices=tuple(DTYPES))
        else:
            parser.add_argument(flag, type=int)
    args = vars(parser.parse_args(argv))
    family, out, preset = args.pop("family"), args.pop("out"), args.pop("preset")
    overrides = {k: v for k, v in args.items() if v is not None}
    print(build_tiny_model(family, out, preset=preset, **overrides))


if __name__ == "__main__":
    main()
