"""The interface of a memory tier (host DRAM now, device HBM later).

A memory tier is a preallocated pool plus an allocator. The store decides what
lives where and when bytes move; the tier only hands out and takes back
extents, and views them as tensors for the one copy that fills or drains them.
"""

from __future__ import annotations

from typing import Protocol

import torch


class MemoryTier(Protocol):
    name: str
    capacity: int

    @property
    def used_bytes(self) -> int: ...

    def chunk_size(self, nbytes: int) -> int:
        """Pool bytes a block of ``nbytes`` would occupy."""
        ...

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a fresh extent, or None when the pool has no room."""
        ...

    def free(self, offset: int) -> None: ...

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """A contiguous uint8 tensor over the extent's first ``nbytes`` bytes."""
        ...

    def close(self) -> None: ...
