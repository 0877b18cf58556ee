"""A tiny random-weight LLaVA-1.5 directory laid out like the published ``llava-hf/llava-1.5-7b-hf``.

``epdserve.tools.tiny_model`` writes what ``transformers`` 5 ``save_pretrained`` writes (a
byte-level BPE tokenizer, ``chat_template.jinja``, the current config format). Real users
point the server at checkpoints downloaded from the Hub, which look different. This builder
reproduces the published files and conventions, with tiny sizes and random weights:

  config.json               older published format: ``image_token_index``, ``torch_dtype``,
                            ``ignore_index``, top-level ``vocab_size``, partial sub-configs
                            (``text_config`` model_type llama, ``vision_config`` model_type
                            clip_vision_model); the text vocabulary is padded to a multiple of
                            64 like 32064 (ids past the tokenizer's last token exist in the
                            embedding and lm_head but have no token)
  generation_config.json    bos 1, eos 2, pad = ``<pad>``
  preprocessor_config.json  ``CLIPImageProcessor``: shortest_edge 336, 336x336 center crop,
                            bicubic (resample 3), OpenAI CLIP mean/std
  processor_config.json     ``LlavaProcessor``, patch_size 14, ``default`` strategy,
                            ``num_additional_image_tokens`` 1
  chat_template.json        the llava-hf 1.5 template (legacy processor file): "USER: " /
                            "ASSISTANT:", images first then text, ``{% generation %}`` tags
  tokenizer.json            SentencePiece-style Llama BPE (``tokenizers`` library): byte
                            fallback (``<0x00>``..``<0xFF>`` at ids 3..258), Metaspace
                            pre-tokenizer (``▁``, prepend_scheme "first"), the Llama decoder
                            (Replace ▁, ByteFallback, Fuse, Strip one leading space), BOS
                            template post-processor; ``<unk>``=0, ``<s>``=1, ``</s>``=2;
                            ``<image>`` and ``<pad>`` added at the end (like 32000 / 32001)
  tokenizer_config.json     ``LlamaTokenizer``, add_bos_token true, add_eos_token false,
                            legacy false, padding_side left, ``added_tokens_decoder``
  special_tokens_map.json, added_tokens.json
  model.safetensors         (or ``model-0000i-of-0000n.safetensors`` + index when
                            ``num_shards`` > 1, as published) random weights scaled x3, in
                            the llava-hf key layout: ``vision_tower.vision_model.*``,
                            ``language_model.model.*``, ``language_model.lm_head.*``,
                            ``multi_modal_projector.*``; stored in ``dtype``

Not reproduced: ``tokenizer.model`` (the SentencePiece protobuf; ``transformers`` 5 reads
``tokenizer.json`` first and ``sentencepiece`` is not installed here).

    python tests/llava_hf_style.py OUT [--dtype float16|float32|bfloat16] [--num-shards N]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, LlavaForConditionalGeneration
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from epdserve.tools.tiny_spec import init_model
from epdserve.tools.tiny_tokenizer import english_corpus

# --------------------------------------------------------------------------- sizes

BASE_VOCAB = 1000        # SentencePiece pieces (the published model: 32000)
IMAGE_TOKEN_ID = BASE_VOCAB       # "<image>", like 32000
PAD_TOKEN_ID = BASE_VOCAB + 1     # "<pad>", like 32001
VOCAB_PAD_MULTIPLE = 64           # 32002 -> 32064 in the published config
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=4096)
VISION = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              image_size=336, patch_size=14, projection_dim=32)
IMAGE_TOKENS = (VISION["image_size"] // VISION["patch_size"]) ** 2  # 576, CLS dropped
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
# Of seeds 0..5, 5 gives the most varied greedy outputs across images, image order and text
# (7 distinct 8-token outputs for 8 test prompts; seed 0 gives 4, mostly one repeated token).
DEFAULT_SEED = 5

# The llava-hf/llava-1.5-*-hf chat template, verbatim (list contents only).
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

SPECIALS = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- tokenizer

def train_sentencepiece_style_bpe() -> Tokenizer:
    """A Llama-style ``tokenizers`` BPE: specials 0..2, byte tokens 3..258, learned pieces up
    to ``BASE_VOCAB``, then ``<image>`` and ``<pad>``; deterministic (fixed corpus)."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Training splits on whitespace so pieces never span words ("▁word", as SentencePiece).
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always",
                                                         split=True)
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, special_tokens=[*SPECIALS, *BYTE_TOKENS],
                                  show_progress=False)
    trainer_tok.train_from_iterator(english_corpus(4 * BASE_VOCAB), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = trained["vocab"]
    if len(vocab) != BASE_VOCAB or [vocab[t] for t in (*SPECIALS, *BYTE_TOKENS)] != list(range(259)):
        raise RuntimeError(f"unexpected trained vocabulary ({len(vocab)} pieces)")
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=1, right=0),
    ])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                            AddedToken("<pad>", special=True, normalized=False)])
    if tok.token_to_id("<image>") != IMAGE_TOKEN_ID or tok.token_to_id("<pad>") != PAD_TOKEN_ID:
        raise RuntimeError("<image>/<pad> did not land at the end of the vocabulary")
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    return tok


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def write_tokenizer(out: Path) -> None:
    train_sentencepiece_style_bpe().save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _added(t) for i, t in
                                 [(0, "<unk>"), (1, "<s>"), (2, "</s>"),
                                  (IMAGE_TOKEN_ID, "<image>"), (PAD_TOKEN_ID, "<pad>")]},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False,
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    })
    _write_json(out / "special_tokens_map.json", {
        "bos_token": _special("<s>"), "eos_token": _special("</s>"),
        "pad_token": _special("<pad>"), "unk_token": _special("<unk>"),
    })
    _write_json(out / "added_tokens.json", {"<image>": IMAGE_TOKEN_ID, "<pad>": PAD_TOKEN_ID})


# --------------------------------------------------------------------------- configs

def config_dict(dtype: str) -> dict:
    """config.json in the published (transformers 4.36-era) format, tiny sizes."""
    vocab = math.ceil((PAD_TOKEN_ID + 1) / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": IMAGE_TOKEN_ID,
        "model_type": "llava",
        "pad_token_id": PAD_TOKEN_ID,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            **TEXT,
            "model_type": "llama",
            "rms_norm_eps": 1e-05,
            "torch_dtype": dtype,
            "vocab_size": vocab,
        },
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": "4.36.0.dev0",
        "vision_config": {
            **VISION,
            "model_type": "clip_vision_model",
            "vocab_size": 32000,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": vocab,
    }


def write_processor_files(out: Path) -> None:
    size = VISION["image_size"]
    _write_json(out / "preprocessor_config.json", {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(OPENAI_CLIP_STD),
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": size},
    })
    _write_json(out / "processor_config.json", {
        "num_additional_image_tokens": 1,
        "patch_size": VISION["patch_size"],
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": "default",
    })
    _write_json(out / "chat_template.json", {"chat_template": LLAVA_HF_CHAT_TEMPLATE})


# --------------------------------------------------------------------------- weights

def llava_hf_key(key: str) -> str:
    """transformers-5 saved key -> published llava-hf key (the CLIP tower gains vision_model)."""
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key.removeprefix("vision_tower.")
    return key


def write_weights(out: Path, dtype: str, seed: int, num_shards: int) -> None:
    config = AutoConfig.from_pretrained(out)
    model = init_model(LlavaForConditionalGeneration, config, seed)
    with tempfile.TemporaryDirectory() as tmp:
        # save_pretrained gives the checkpoint key names transformers itself reads back.
        model.to(DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True)
        tensors = {llava_hf_key(k): v for k, v in load_file(Path(tmp) / "model.safetensors").items()}
    names = sorted(tensors)
    if num_shards <= 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        (out / "model.safetensors").chmod(0o644)
        return
    weight_map: dict[str, str] = {}
    for i in range(num_shards):
        shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[i::num_shards]
        save_file({k: tensors[k] for k in part}, out / shard, metadata={"format": "pt"})
        (out / shard).chmod(0o644)
        weight_map.update({k: shard for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


# --------------------------------------------------------------------------- entry point

def build_llava_hf_style(out: Path | str, dtype: str = "float16", *, seed: int = DEFAULT_SEED,
                         num_shards: int = 1) -> Path:
    """Write the directory (created if needed) and return it; deterministic per arguments."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config_dict(dtype))
    _write_json(out / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": PAD_TOKEN_ID, "transformers_version": "4.36.0.dev0",
    })
    write_processor_files(out)
    write_tokenizer(out)
    write_weights(out, dtype, seed, num_shards)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="float16", choices=tuple(DTYPES))
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    a = parser.parse_args()
    print(build_llava_hf_style(a.out, a.dtype, seed=a.seed, num_shards=a.num_shards))
