"""What the store's pieces share: one lock, the index, the tiers, the counters."""

from __future__ import annotations

import threading

import torch

from kvstore.config import StoreConfig
from kvstore.errors import ClosedError
from kvstore.keys import ScopedKey
from kvstore.stats import Counters
from kvstore.store.index import BlockIndex
from kvstore.store.space import TierSpace
from kvstore.tiers.hbm import HbmTier
from transfer.memory import Progress


class StoreParts:
    """One lock guards all metadata (index, tiers' allocators, policies,
    counters); bytes move outside it, in reserved or pinned extents."""

    def __init__(
        self, config: StoreConfig, hbm: HbmTier | None, progress: Progress | None = None
    ) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)  # the demoter waits on it
        self.index = BlockIndex()
        self.counters = Counters()
        self.space = TierSpace(config, hbm, self.index, self.counters, progress)
        self.closed = False

    def check_open(self) -> None:
        if self.closed:
            raise ClosedError("store is closed")

    def nudge(self) -> None:
        """DRAM may have passed its high watermark: wake the demoter. Lock held."""
        if self.space.above_high():
            self.wake.notify_all()

    def write_ssd(
        self,
        key: ScopedKey,
        flat: torch.Tensor,
        digest: int,
        parent: ScopedKey | None,
        compress: bool,
    ) -> None:
        """Write one record to SSD: room is made under the lock, bytes are
        written outside it (StorageError where the disk refuses)."""
        ssd = self.space.ssd
        assert ssd is not None
        with self.lock:
            self.space.make_ssd_room(flat.numel())
        ssd.put(key, flat, digest, parent=parent, compress=compress)
