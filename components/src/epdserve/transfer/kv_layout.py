"""Where a KV pool's blocks lie in memory, as (address, bytes) ranges for one NIXL READ."""

from __future__ import annotations

from dataclasses import dataclass

from epdserve.attention.kv_cache import KVCache
from epdserve.protocol import epdserve_pb2 as pb

Range = tuple[int, int]  # (address, bytes)


@dataclass(frozen=True)
class KVLayout:
    """A `KVCache.pool` [2, num_layers, num_blocks, block...]: the K (kv = 0) or V (kv = 1)
    of layer `layer`, block `block` starts at base + ((kv * num_layers + layer) * num_blocks
    + block) * block_bytes; `block_bytes` is one layer's K (or V) of one block."""

    base: int
    num_layers: int
    num_blocks: int
    block_bytes: int

    @classmethod
    def of(cls, kv: KVCache) -> KVLayout:
        pool = kv.pool
        if not pool.is_contiguous():
            raise ValueError("the KV pool must be contiguous")
        return cls(pool.data_ptr(), pool.shape[1], pool.shape[2], pool[0, 0, 0].nbytes)

    @classmethod
    def from_proto(cls, msg: pb.KVLayout) -> KVLayout:
        return cls(msg.base, msg.num_layers, msg.num_blocks, msg.block_bytes)

    def to_proto(self) -> pb.KVLayout:
        return pb.KVLayout(
            base=self.base, num_layers=self.num_layers, num_blocks=self.num_blocks, block_bytes=self.block_bytes
        )

    def addr(self, kv: int, layer: int, block: int) -> int:
        return self.base + ((kv * self.num_layers + layer) * self.num_blocks + block) * self.block_bytes


def paired_ranges(
    local: KVLayout, local_blocks: list[int], remote: KVLayout, remote_blocks: list[int]
) -> tuple[list[Range], list[Range]]:
    """Ranges reading `remote_blocks[i]` into `local_blocks[i]`, every layer's K and V; blocks
    consecutive on both sides go as one range. Both pools hold the same model's KV."""
    if len(local_blocks) != len(remote_blocks):
        raise ValueError(f"{len(local_blocks)} local blocks for {len(remote_blocks)} remote ones")
    if (local.num_layers, local.block_bytes) != (remote.num_layers, remote.block_bytes):
        raise ValueError("the KV pools differ in layers or block size")
    runs: list[tuple[int, int, int]] = []  # (local start, remote start, length)
    for lb, rb in zip(local_blocks, remote_blocks, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == lb and runs[-1][1] + runs[-1][2] == rb:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((lb, rb, 1))
    mine: list[Range] = []
    theirs: list[Range] = []
    for kv in (0, 1):
        for layer in range(local.num_layers):
            for lb, rb, n in runs:
                mine.append((local.addr(kv, layer, lb), n * local.block_bytes))
                theirs.append((remote.addr(kv, layer, rb), n * remote.block_bytes))
    return mine, theirs
