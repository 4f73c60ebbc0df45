"""The store's tiers, one eviction policy each, and every move of a copy
between them: reserving room, evicting, demoting HBM to DRAM, making SSD room."""

from __future__ import annotations

from collections.abc import Container

import torch

from kvstore.buffers import copy_bytes
from kvstore.config import StoreConfig
from kvstore.eviction import EvictionPolicy, make_admission, make_policy
from kvstore.keys import ScopedKey
from kvstore.stats import Counters
from kvstore.store.block import Block
from kvstore.store.index import BlockIndex
from kvstore.tier import Tier
from kvstore.tiers.base import MemoryTier
from kvstore.tiers.dram import DramTier
from kvstore.tiers.hbm import HbmTier
from kvstore.tiers.ssd import SsdTier
from transfer.memory import Progress

DECLINED = -1  # reserve_dram: admission kept a put's tail out of a full DRAM


class TierSpace:
    """Where blocks' bytes live. Every method runs under the store's lock;
    the only bytes moved here are an HBM block's copy down to DRAM."""

    def __init__(
        self,
        config: StoreConfig,
        hbm: HbmTier | None,
        index: BlockIndex,
        counters: Counters,
        progress: Progress | None = None,
    ) -> None:
        self.config = config
        self.hbm = hbm
        self.dram = DramTier(config.dram, progress)
        try:
            self.ssd = SsdTier(config.ssd) if config.ssd.enabled else None
        except BaseException:
            self.dram.close()
            raise
        self.index = index
        self.counters = counters
        self._policies = {tier: make_policy(config.eviction) for tier in Tier}
        self.admission = make_admission(config.admission)
        self.high = int(self.dram.capacity * config.dram.high_watermark)
        self.low = int(self.dram.capacity * config.dram.low_watermark)

    def adopt_ssd(self) -> None:
        """Index what a restarted SSD tier holds."""
        assert self.ssd is not None
        for key, b in self.index.adopt(self.ssd.records()):
            self._policies[Tier.SSD].insert(key, b.parent)
            self.counters.account(b.ns_tag, b.nbytes, +1)

    # -- looking ---------------------------------------------------------------

    def policy(self, tier: Tier) -> EvictionPolicy:
        return self._policies[tier]

    def memory(self, tier: Tier) -> MemoryTier:
        pool = self.hbm if tier is Tier.HBM else self.dram if tier is Tier.DRAM else None
        assert pool is not None, f"no {tier} pool"
        return pool

    def view(self, b: Block) -> torch.Tensor:
        """The block's bytes in its memory tier (HBM or DRAM)."""
        return self.memory(b.home).view(b.offset, b.nbytes)

    def above_high(self) -> bool:
        return self.dram.used_bytes > self.high

    def touch(self, key: ScopedKey) -> None:
        b = self.index.get(key)
        if b is not None:
            self._policies[b.home].touch(key)

    # -- reserving ---------------------------------------------------------------

    def reserve_dram(
        self, nbytes: int, keep: Container[ScopedKey] = (), *, tail: ScopedKey | None = None
    ) -> int | None:
        """A DRAM extent for a new block, dropping clean copies (or, with no SSD
        tier, any unpinned block not in ``keep``) to make room; DECLINED where
        ``tail`` (a put's last block) would need room and admission says no."""
        dram = self.dram
        if dram.chunk_size(nbytes) > dram.capacity:
            return None
        offset = dram.alloc(nbytes)
        if offset is None and tail is not None and not self.admission.admit(tail):
            self.counters.put_declined += 1
            return DECLINED
        blocks = self.index.blocks
        while offset is None:
            key = self._policies[Tier.DRAM].victim(
                lambda k: k in keep or self._kept_in_dram(blocks[k])
            )
            if key is None:
                return None
            self.drop_copy(key, blocks[key], Tier.DRAM)
            offset = dram.alloc(nbytes)
        return offset

    def _kept_in_dram(self, b: Block) -> bool:
        """Pinned, or its only copy while an SSD tier could keep one."""
        return b.pins > 0 or (self.ssd is not None and not b.on_ssd)

    def reserve_hbm(self, nbytes: int) -> int | None:
        """An HBM extent for a new block, moving unpinned victims down to DRAM
        (or dropping them where SSD has a copy) to make room."""
        hbm = self.hbm
        assert hbm is not None
        if hbm.chunk_size(nbytes) > hbm.capacity:
            return None
        blocks = self.index.blocks
        offset = hbm.alloc(nbytes)
        while offset is None:
            key = self._policies[Tier.HBM].victim(lambda k: blocks[k].pins > 0)
            if key is None or not self._demote_hbm(key, blocks[key]):
                return None
            offset = hbm.alloc(nbytes)
        return offset

    def _demote_hbm(self, key: ScopedKey, b: Block) -> bool:
        """Move an unpinned HBM block to DRAM (one device-to-host copy); False
        when DRAM has no room and no SSD copy makes dropping it safe."""
        assert self.hbm is not None and b.home is Tier.HBM and b.pins == 0
        dram = self.reserve_dram(b.nbytes)
        if dram is None:
            if not b.on_ssd:
                return False
            self.drop_copy(key, b, Tier.HBM)
            return True
        copy_bytes(self.dram.view(dram, b.nbytes), self.hbm.view(b.offset, b.nbytes))
        self._policies[Tier.HBM].remove(key)
        self.hbm.free(b.offset)
        b.place(Tier.DRAM, dram)
        self._policies[Tier.DRAM].insert(key, b.parent)
        self.counters.bump(self.counters.evictions, Tier.HBM)
        return True

    def reserve_promotion(self, nbytes: int) -> int | None:
        """A DRAM extent for an SSD hit, only below the high watermark."""
        if self.dram.used_bytes + self.dram.chunk_size(nbytes) > self.high:
            return None
        return self.dram.alloc(nbytes)

    def make_ssd_room(self, nbytes: int) -> None:
        """Drop SSD copies until a record of ``nbytes`` fits."""
        ssd = self.ssd
        assert ssd is not None
        blocks, children = self.index.blocks, self.index.children
        need = ssd.record_bytes(nbytes)
        free = ssd.free_bytes
        victims: list[ScopedKey] = []
        while free < need:
            # a block whose only copy is here and whose child is stored stays:
            # dropping it would leave the child unreachable
            key = self._policies[Tier.SSD].victim(
                lambda k: not blocks[k].in_memory and k in children
            )
            if key is None:
                break  # the tier is empty of evictable blocks; the write may still fit
            free += ssd.footprint(key)
            victims.append(key)
            self.drop_copy(key, blocks[key], Tier.SSD)
        ssd.evict(victims)

    # -- dropping ----------------------------------------------------------------

    def drop_copy(self, key: ScopedKey, b: Block, tier: Tier, *, evicted: bool = True) -> None:
        """Drop the block's copy in ``tier`` (an unpinned memory copy, or the
        SSD copy, whose record the caller evicts or found damaged). A block
        left with no copy leaves the store. ``evicted``: counted as an
        eviction (and a drop), not as damage."""
        self._policies[tier].remove(key)
        if tier is Tier.SSD:
            b.on_ssd = False
        else:
            assert b.home is tier and b.pins == 0
            self.memory(tier).free(b.leave_memory()[1])
        if evicted:
            self.counters.bump(self.counters.evictions, tier)
        if not b.in_memory and not b.on_ssd:
            self.remove(key, b)
            if evicted:
                self.counters.dropped += 1

    def remove(self, key: ScopedKey, b: Block) -> None:
        """Take a block out of the store entirely (its memory waits for its
        last reader)."""
        self.index.unlink(key, b)
        self.counters.account(b.ns_tag, -b.nbytes, -1)
        for policy in self._policies.values():
            policy.remove(key)
        if b.on_ssd and self.ssd is not None:
            self.ssd.remove([key])
            b.on_ssd = False
        if b.pins == 0:
            self.free_memory(b)

    def free_memory(self, b: Block) -> None:
        """Give back the block's memory extent, if it has one."""
        if b.in_memory:
            tier, offset = b.leave_memory()
            self.memory(tier).free(offset)

    def unpin(self, b: Block) -> None:
        b.pins -= 1
        if b.pins == 0 and b.dead:
            self.free_memory(b)

    def close(self) -> None:
        if self.ssd is not None:
            self.ssd.close()
        self.dram.close()
        if self.hbm is not None:
            self.hbm.close()
