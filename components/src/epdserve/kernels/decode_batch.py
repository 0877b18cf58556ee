"""The input a fused decode-attention kernel takes: the one-query chunks of a forward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class DecodeBatch:
    """The one-query chunks of a forward, for a kernel that attends them all in one call.

    rows [S] int64: each one's row in the packed batch. block_tables [S, max_blocks] int32:
    its block table, zero-padded. context_len [S] int32: its positions in the cache."""

    rows: torch.Tensor
    block_tables: torch.Tensor
    context_len: torch.Tensor

    @classmethod
    def build(
        cls, rows: list[int], tables: list[Sequence[int]], context_len: list[int], block_size: int
    ) -> DecodeBatch | None:
        if not rows:
            return None
        used = [-(-n // block_size) for n in context_len]
        width = max(used)
        padded = [list(t[:n]) + [0] * (width - n) for t, n in zip(tables, used, strict=True)]
        return cls(
            torch.tensor(rows, dtype=torch.long),
            torch.tensor(padded, dtype=torch.int32),
            torch.tensor(context_len, dtype=torch.int32),
        )
