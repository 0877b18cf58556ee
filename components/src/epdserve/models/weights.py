"""Reading selected tensors of a Hugging Face checkpoint (single or sharded safetensors)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def read_tensors(model_dir: Path, rename: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """The tensors whose checkpoint key `rename` maps to a name (None: skip), under that name.

    Only the selected tensors are read from disk (safetensors files are memory-mapped).
    Raises ValueError when the directory has no safetensors checkpoint.
    """
    model_dir = Path(model_dir)
    if (model_dir / INDEX).is_file():
        files = sorted(set(json.loads((model_dir / INDEX).read_text())["weight_map"].values()))
    elif (model_dir / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise ValueError(f"{model_dir} has no {SINGLE} or {INDEX}")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():
                if (new := rename(key)) is not None:
                    out[new] = f.get_tensor(key)
    return out
