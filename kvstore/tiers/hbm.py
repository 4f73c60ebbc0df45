"""The HBM tier: one preallocated pool of GPU memory with the same slab
allocator as DRAM, the fastest tier. It is built only where CUDA exists.

The pool is one ``torch.empty`` on the device, taken once at start-up: the
caching allocator never sees per-block allocations, and the engine's own
memory planning sees one fixed reservation.
"""

from __future__ import annotations

import torch

from kvstore.allocator import SlabAllocator
from kvstore.config import HbmConfig
from kvstore.errors import ConfigError
from kvstore.tier import Tier
from kvstore.tiers.base import MemoryTier


class HbmTier(MemoryTier):
    name = Tier.HBM

    def __init__(self, config: HbmConfig, *, device: torch.device | str | None = None) -> None:
        """``device`` overrides ``config.device``; tests on hosts without a GPU
        pass a host device to exercise placement and demotion."""
        dev = torch.device(device if device is not None else config.device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(
                    f"hbm.capacity is {config.capacity} but this host has no CUDA GPU "
                    "(torch.cuda.is_available() is False); the HBM tier exists only "
                    "where a GPU does: leave hbm.capacity at 0"
                )
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            if index >= torch.cuda.device_count():
                raise ConfigError(
                    f"hbm.device {config.device!r}: this host has "
                    f"{torch.cuda.device_count()} GPU(s)"
                )
            dev = torch.device("cuda", index)
        allocator = SlabAllocator(config.capacity, config.effective_page_size)
        try:
            pool = torch.empty(allocator.capacity, dtype=torch.uint8, device=dev)
        except torch.OutOfMemoryError as e:
            raise ConfigError(
                f"hbm.capacity {config.capacity} does not fit on {dev}: {e}"
            ) from None
        super().__init__(pool, allocator)
