"""Maps a HF model directory to its `ModelFamily` by the config's `model_type`."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from epdserve.models.base import ModelFamily
from epdserve.models.llama4 import Llama4Family
from epdserve.models.llava import LlavaFamily
from epdserve.models.qwen_vl import QwenVLFamily

FAMILIES: tuple[type[ModelFamily], ...] = (LlavaFamily, Llama4Family, QwenVLFamily)


def load_family(model_dir: str | Path) -> ModelFamily:
    """Read `config.json` of `model_dir` and return the family that serves it.

    Raises ValueError naming the model type when no family supports it.
    """
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    for family in FAMILIES:
        if config.model_type in family.model_types:
            return family(path, config)
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"unsupported model type {config.model_type!r} in {path}; supported: {supported}")
