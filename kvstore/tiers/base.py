"""The memory tiers (device HBM, host DRAM): a preallocated pool plus an allocator.

The store decides what lives where and when bytes move; a tier only hands
out and takes back extents, and views them as tensors for the one copy that
fills or drains them.
"""

from __future__ import annotations

import torch

from kvstore.allocator import SlabAllocator


class MemoryTier:
    """One pool (a uint8 tensor on some device) carved by a slab allocator."""

    name: str

    def __init__(self, pool: torch.Tensor, allocator: SlabAllocator) -> None:
        self.allocator = allocator
        self.capacity = allocator.capacity
        self._pool = pool

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_bytes

    @property
    def pool(self) -> torch.Tensor:
        return self._pool

    def chunk_size(self, nbytes: int) -> int:
        """Pool bytes a block of ``nbytes`` would occupy."""
        return self.allocator.chunk_size(nbytes)

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a fresh extent, or None when the pool has no room."""
        return self.allocator.alloc(nbytes)

    def free(self, offset: int) -> None:
        self.allocator.free(offset)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """A contiguous uint8 tensor over the extent's first ``nbytes`` bytes."""
        return self._pool[offset : offset + nbytes]

    def close(self) -> None:
        self._pool = torch.empty(0, dtype=torch.uint8)
