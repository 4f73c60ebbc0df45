"""The DRAM tier: one preallocated host-memory pool with a slab allocator.

The pool is a single anonymous mapping, advised to use transparent huge
pages and faulted in once at start-up: first touch of fresh memory runs at
under 1 GB/s here, 15-20x slower than a copy into faulted memory, so the hot
path must never be the first to touch a page.
"""

from __future__ import annotations

import contextlib
import logging
import mmap

import torch

from kvstore.allocator import SlabAllocator
from kvstore.config import DramConfig
from transfer.memory import MADV_HUGEPAGE, madvise, prefault

log = logging.getLogger(__name__)


class DramTier:
    name = "dram"

    def __init__(self, config: DramConfig) -> None:
        self.allocator = SlabAllocator(config.capacity, config.effective_page_size)
        self.capacity = self.allocator.capacity
        # Private: anonymous shared memory is shmem, which ignores THP advice.
        self._map = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if config.hugepages:
            madvise(self._map, MADV_HUGEPAGE)
        if config.prefault:
            prefault(self._map)
        self._pool = torch.frombuffer(self._map, dtype=torch.uint8)

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_bytes

    def chunk_size(self, nbytes: int) -> int:
        return self.allocator.chunk_size(nbytes)

    def alloc(self, nbytes: int) -> int | None:
        return self.allocator.alloc(nbytes)

    def free(self, offset: int) -> None:
        self.allocator.free(offset)

    @property
    def pool(self) -> torch.Tensor:
        return self._pool

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._pool[offset : offset + nbytes]

    def close(self) -> None:
        # Views handed out earlier may still export the mapping; the kernel
        # frees it when the last one goes.
        self._pool = torch.empty(0, dtype=torch.uint8)
        with contextlib.suppress(BufferError):
            self._map.close()
