"""The embedding cache on disk shared by a native encoder and PD workers (no NIXL).

One safetensors file per media hash, written atomically (a temporary file in the same
directory, then `os.replace`), so a reader sees a whole file or none.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from epdserve.utils.files import atomic_target

_KEY = "embedding"
_PLAIN = re.compile(r"[0-9a-f]{64}")  # content hashes name their file as they are


class EmbeddingStorage:
    """`[length, E]` embeddings under `root`, keyed by media hash or client uuid."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        # Client uuids may hold any characters: those name their file by their own hash.
        name = key if _PLAIN.fullmatch(key) else hashlib.sha256(key.encode()).hexdigest()
        return self.root / f"{name}.safetensors"

    def load(self, key: str, length: int | None = None) -> torch.Tensor | None:
        """The embedding, or None when it is absent, unreadable or not `length` rows."""
        try:
            tensor = load_file(self.path(key))[_KEY]
        except (FileNotFoundError, SafetensorError, KeyError, OSError):
            return None
        return tensor if length is None or tensor.shape[0] == length else None

    def contains(self, key: str) -> bool:
        return self.path(key).is_file()

    def save(self, key: str, embedding: torch.Tensor) -> None:
        with atomic_target(self.path(key), suffix=".safetensors") as tmp:
            save_file({_KEY: embedding.detach().to("cpu").contiguous()}, str(tmp))
