"""Reading selected tensors of a Hugging Face checkpoint (single or sharded safetensors)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

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
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if (new := rename(key)) is not None:
                    out[new] = f.get_tensor(key)
    return out


def load_modules(
    model_dir: Path,
    modules: dict[str, nn.Module],
    rename: Callable[[str], str | None],
    dtype: torch.dtype | None,
    device: torch.device,
) -> None:
    """Load each module of `modules` strictly from the tensors `read_tensors(model_dir, rename)`
    names with its key as prefix; then move it to `device` and its floating tensors to `dtype`
    (None: the checkpoint's). Other tensors (complex rotary tables) keep their dtype, which
    `Module.to(dtype)` would not: it drops their imaginary part."""
    weights = read_tensors(model_dir, rename)
    for prefix, module in modules.items():
        state = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
        target = dtype or next(iter(state.values())).dtype
        module.to(device)
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(target)


def check_loaded(model_dir: Path, info: Mapping[str, Any]) -> None:
    """Fail on what `from_pretrained(..., output_loading_info=True)` only warns about: checkpoint
    keys the model has no place for, and weights the checkpoint lacks. Names them."""
    problems = {
        "unknown checkpoint keys": sorted(info.get("unexpected_keys") or ()),
        "weights missing from the checkpoint": sorted(info.get("missing_keys") or ()),
    }
    found = [f"{what} {keys[:8]} ({len(keys)} in all)" for what, keys in problems.items() if keys]
    if found:
        raise ValueError(f"{model_dir}: " + "; ".join(found))
