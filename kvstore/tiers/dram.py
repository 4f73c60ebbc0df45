"""The DRAM tier: one preallocated host-memory pool with a slab allocator.

The pool is a single anonymous mapping, advised to use transparent huge
pages and faulted in once at start-up: first touch of fresh memory runs at
under 1 GB/s here, 15-20x slower than a copy into faulted memory, so the hot
path must never be the first to touch a page.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os

import torch

from kvstore.allocator import SlabAllocator
from kvstore.config import DramConfig
from kvstore.errors import ConfigError
from kvstore.tier import Tier
from kvstore.tiers.base import MemoryTier
from kvstore.units import format_size
from transfer.memory import MADV_HUGEPAGE, Progress, madvise, prefault


class DramTier(MemoryTier):
    name = Tier.DRAM

    def __init__(self, config: DramConfig, progress: Progress | None = None) -> None:
        """``progress``: called as the pool is faulted in (it can take seconds)."""
        allocator = SlabAllocator(config.capacity, config.effective_page_size)
        # Private: anonymous shared memory is shmem, which ignores THP advice.
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        try:
            if allocator.capacity > total:  # refused up front: overcommit might grant it
                raise OSError(errno.ENOMEM, "more than the host's memory")
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            self._map = mmap.mmap(-1, allocator.capacity, flags=flags)
        except OSError as e:
            raise ConfigError(
                f"cannot reserve a {format_size(allocator.capacity)} DRAM pool ({e.strerror}); "
                f"this host has {format_size(total)}: lower dram.capacity (--dram-capacity)"
            ) from None
        if config.hugepages:
            madvise(self._map, MADV_HUGEPAGE)
        if config.prefault:
            prefault(self._map, progress)
        super().__init__(torch.frombuffer(self._map, dtype=torch.uint8), allocator)

    def close(self) -> None:
        # Views handed out earlier may still export the mapping; the kernel
        # frees it when the last one goes.
        super().close()
        with contextlib.suppress(BufferError):
            self._map.close()
