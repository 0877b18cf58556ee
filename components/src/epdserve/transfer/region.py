"""First-fit allocator over one registered memory region (offsets and sizes in bytes)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

ALIGNMENT = 256  # every span starts on a cache-line and DMA-friendly boundary


@dataclass(frozen=True)
class Span:
    offset: int
    nbytes: int


class RegionAllocator:
    """Hands out aligned spans of `[0, capacity)`; freed neighbours coalesce.

    Not thread-safe: its owner calls it from one thread (the event loop).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)] if capacity > 0 else []  # sorted (offset, size)
        self.allocated_bytes = 0
        self.allocations = 0

    def alloc(self, nbytes: int) -> Span | None:
        """An aligned span of at least `nbytes` (rounded up to ALIGNMENT), or None if no hole fits."""
        size = max(ALIGNMENT, -(-nbytes // ALIGNMENT) * ALIGNMENT)
        for i, (offset, hole) in enumerate(self._free):
            if hole >= size:
                if hole == size:
                    del self._free[i]
                else:
                    self._free[i] = (offset + size, hole - size)
                self.allocated_bytes += size
                self.allocations += 1
                return Span(offset, size)
        return None

    def free(self, span: Span) -> None:
        i = bisect.bisect_left(self._free, (span.offset, 0))
        offset, size = span.offset, span.nbytes
        if i < len(self._free) and offset + size == self._free[i][0]:  # merge with the next hole
            size += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # and the previous
            offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
            self._free[i - 1] = (offset, size)
        else:
            self._free.insert(i, (offset, size))
        self.allocated_bytes -= span.nbytes
        self.allocations -= 1
