"""What every tiny-model builder shares: the spec, the presets, seeded init and saving."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Sizes and options of a tiny model; defaults are the ``tiny`` preset."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 1024
    image_size: int = 32
    patch_size: int = 8
    vision_hidden_size: int = 32
    vision_layers: int = 2
    seed: int = 0
    weight_layout: str = "transformers"
    dtype: str = "float32"


PRESETS: dict[str, dict[str, int]] = {
    "tiny": {},
    "bench": dict(
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=1376,
        vocab_size=8192,
        image_size=224,
        patch_size=14,
        vision_hidden_size=256,
        vision_layers=4,
    ),
}

WEIGHT_LAYOUTS = ("transformers", "llava-hf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INIT_SCALE = 3.0  # at the default init, greedy decoding repeats one token whatever the input
VISION_HEADS = 4
MAX_POSITIONS = 2048

# --------------------------------------------------------------------------- weights


def init_model(model_cls: type[PreTrainedModel], config: Any, seed: int) -> PreTrainedModel:
    """Build ``model_cls(config)`` with seeded random weights; matrices scaled by INIT_SCALE."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:  # linear/conv/embedding weights; keep norms and biases
                param.mul_(INIT_SCALE)
    return model


def save_model(model: PreTrainedModel, out: Path, dtype: str, rename: Callable[[str], str] | None = None) -> None:
    """``save_pretrained`` in ``dtype``, then optionally rename the safetensors keys."""
    if DTYPES[dtype] != torch.float32:  # the init's dtype; to() would also make complex buffers real
        model.to(DTYPES[dtype])
    model.save_pretrained(out)
    path = out / "model.safetensors"
    if rename is not None:
        tensors = load_file(path)
        save_file({rename(k): v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    path.chmod(0o644)  # save_pretrained leaves it 0600; servers may run as another user


def text_sizes(spec: TinySpec) -> dict[str, int]:
    """The text decoder's sizes as `transformers` text configs name them."""
    return dict(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        vocab_size=spec.vocab_size,
        max_position_embeddings=MAX_POSITIONS,
    )
