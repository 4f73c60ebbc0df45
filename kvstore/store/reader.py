"""The store's read path: pin what is stored, copy it out (or verify it
from SSD, promoting it where DRAM has room), then unpin and count."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from kvstore.buffers import Payload, as_tensor, contiguous_bytes, copy_bytes, nbytes_of
from kvstore.checksum import checksum, checksum_extents
from kvstore.errors import PayloadSizeError
from kvstore.keys import BlockKey, check_per_key
from kvstore.store.index import scoped_keys
from kvstore.store.parts import StoreParts
from kvstore.store.plans import BlockRead, ReadPlan
from kvstore.tier import Tier

log = logging.getLogger(__name__)


class Reader:
    """``TieredStore``'s get_into, begin_read, read_block and end_read (documented there)."""

    def __init__(self, parts: StoreParts) -> None:
        self._p = parts

    def get_into(
        self,
        keys: Sequence[BlockKey],
        dsts: Sequence[Payload],
        *,
        prefix: bool = True,
        ns_tag: int | None = None,
    ) -> list[bool]:
        check_per_key(len(keys), destinations=dsts)
        outs = [as_tensor(d, writable=True) for d in dsts]
        plan = self.begin_read(
            keys, prefix=prefix, ns_tag=ns_tag, sizes=[nbytes_of(t) for t in outs]
        )
        try:
            for r in plan.reads:
                r.ok = self._read_block(r, outs[r.index]) is not None
                if prefix and not r.ok:  # damaged: what follows it is of no use
                    break
        finally:
            self.end_read(plan)
        return plan.results()

    def begin_read(
        self,
        keys: Sequence[BlockKey],
        *,
        prefix: bool = True,
        ns_tag: int | None = None,
        sizes: Sequence[int] | None = None,
    ) -> ReadPlan:
        check_per_key(len(keys), destination_sizes=sizes)
        skeys = scoped_keys(keys, ns_tag)
        plan = ReadPlan(len(skeys))
        space = self._p.space
        blocks, policy, reads = self._p.index.blocks, space.policy, plan.reads
        promote = self._p.config.promote_on_hit
        with self._p.lock:
            self._p.check_open()
            for i, key in enumerate(skeys):
                b = blocks.get(key)
                if b is None:
                    if prefix:
                        break
                    continue
                if sizes is not None and sizes[i] != b.nbytes:
                    self._unpin_all(reads)
                    raise PayloadSizeError(b.nbytes, sizes[i], what=f"destination {i}")
                home = b.home
                r = BlockRead(i, b.nbytes, b.digest, home, False, key, b)
                policy(home).touch(key)
                if r.pinned:
                    b.pins += 1
                elif promote and not b.promoting:
                    r.promote = space.reserve_promotion(b.nbytes)
                    b.promoting = r.promote is not None
                reads.append(r)
        return plan

    def read_block(self, r: BlockRead) -> torch.Tensor | None:
        out = self._read_block(r, None)
        r.ok = out is not None
        return out

    def dram_extent(self, r: BlockRead) -> int | None:
        b = r.block
        if r.tier is not Tier.DRAM or b is None:
            return None
        if self._p.config.verify_dram_reads:
            pool = self._p.space.dram.pool
            if checksum_extents([(pool, b.offset, b.nbytes)])[0] != b.digest:
                return None  # read_block finds it damaged again, and says so
        r.ok = True
        return b.offset

    def end_read(self, plan: ReadPlan) -> None:
        with self._p.lock:
            self._finish_reads(plan.reads, requested=plan.size)

    def _read_block(self, r: BlockRead, dst: torch.Tensor | None) -> torch.Tensor | None:
        """Fill ``dst`` with one block (no lock held), or with ``dst`` None return
        a tensor holding it; None when the SSD copy is damaged."""
        b = r.block
        assert b is not None
        if r.pinned:
            src = self._p.space.view(b)
            if (
                self._p.config.verify_dram_reads
                and r.tier is Tier.DRAM
                and checksum(src) != b.digest
            ):
                log.warning("DRAM copy of a %d-byte block fails its checksum", b.nbytes)
                r.damaged = True
                return None
            if dst is None:  # a pool view; HBM bytes are copied to the host first
                return src if src.device.type == "cpu" else src.cpu()
            copy_bytes(dst, src)
            return dst
        ssd = self._p.space.ssd
        assert ssd is not None
        flat = None if dst is None else contiguous_bytes(dst)
        if r.promote is not None:
            staging = self._p.space.dram.view(r.promote, b.nbytes)
        elif flat is not None:
            return dst if ssd.get_into(r.key, flat) else None
        else:
            staging = torch.empty(b.nbytes, dtype=torch.uint8)
        if not ssd.get_into(r.key, staging):
            return None
        if dst is None:
            return staging
        copy_bytes(dst, staging)
        return dst

    def _finish_reads(self, reads: list[BlockRead], *, requested: int) -> None:
        """Unpin, publish promotions, account hits and damage. Lock held."""
        c, space = self._p.counters, self._p.space
        hits: dict[Tier, int] = {}
        nbytes = 0
        for r in reads:
            b = r.block
            assert b is not None
            if r.pinned:
                space.unpin(b)
                if r.damaged and not b.dead:  # wrong bytes in memory: drop the block
                    c.dram_checksum_failures += 1
                    space.remove(r.key, b)
            else:
                b.promoting = False
                if r.promote is not None:
                    if r.ok and not b.dead and not b.in_memory:
                        b.place(Tier.DRAM, r.promote)
                        space.policy(Tier.DRAM).insert(r.key, b.parent)
                        c.promotions += 1
                    else:
                        space.dram.free(r.promote)
                ssd = space.ssd
                if not r.ok and not b.dead and b.on_ssd and ssd is not None and r.key not in ssd:
                    # the SSD tier found the record damaged and dropped it
                    space.drop_copy(r.key, b, Tier.SSD, evicted=False)
            if r.ok:
                hits[r.tier] = hits.get(r.tier, 0) + 1
                nbytes += b.nbytes
        for tier, n in hits.items():
            c.bump(c.hits, tier, n)
        c.get_bytes += nbytes
        c.misses += requested - sum(hits.values())
        self._p.nudge()

    def _unpin_all(self, reads: list[BlockRead]) -> None:
        for r in reads:
            assert r.block is not None
            if r.pinned:
                self._p.space.unpin(r.block)
            elif r.promote is not None:
                r.block.promoting = False
                self._p.space.dram.free(r.promote)
