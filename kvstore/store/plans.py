"""The two-phase calls' plans: what ``begin_put`` reserved and ``begin_read``
pinned, handed to the caller between the phases."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvstore.errors import StoreFullError
from kvstore.keys import ScopedKey
from kvstore.store.block import Block
from kvstore.tier import Tier

_NO_HOST = torch.empty(0, dtype=torch.uint8)


@dataclass(slots=True)
class BlockWrite:
    """One block a put will store: the caller fills ``buffer``, host memory
    the store chose (a view of its DRAM pool at ``pool_offset``, or a slice
    of the plan's ``scratch`` at ``scratch_offset`` for a block bound for HBM
    or SSD), then ``commit_put`` checksums it and moves it on where needed."""

    index: int  # position in the batch
    nbytes: int
    scratch_offset: int = 0  # where ``buffer`` lies in ``PutPlan.scratch`` (not in the pool)
    # the store's own: the key and parent as indexed, and the reservation
    key: ScopedKey = b""
    parent: ScopedKey | None = None
    home: Tier = Tier.SSD  # where the block will live: DRAM (the pool), HBM or SSD
    offset: int = -1  # its extent in home's pool
    host: torch.Tensor = _NO_HOST  # what ``buffer`` lies in: the DRAM pool or the scratch

    @property
    def pool_offset(self) -> int | None:
        """Where ``buffer`` lies in the DRAM pool, if it does."""
        return self.offset if self.home is Tier.DRAM else None

    @property
    def host_offset(self) -> int:
        """Where ``buffer`` lies in ``host``."""
        return self.offset if self.home is Tier.DRAM else self.scratch_offset

    @property
    def buffer(self) -> torch.Tensor:
        """The bytes to fill (a view made on demand: a batch that is filled
        by the transfer engine at ``pool_offset`` never needs one)."""
        at = self.host_offset
        return self.host[at : at + self.nbytes]


@dataclass(slots=True)
class BlockRead:
    """One pinned block of a read; ``ok`` once its bytes were delivered."""

    index: int
    nbytes: int
    checksum: int
    tier: Tier  # where the bytes come from: HBM and DRAM copies are pinned
    ok: bool = False
    # the store's own
    key: ScopedKey = b""
    block: Block | None = None
    promote: int | None = None  # reserved DRAM pool offset for an SSD hit
    damaged: bool = False  # its DRAM copy failed verify_dram_reads

    @property
    def pinned(self) -> bool:
        return self.tier.in_memory

    @property
    def needs_scratch(self) -> bool:
        """Its bytes land in host memory outside the pool (an SSD hit not promoted)."""
        return not self.pinned and self.promote is None


@dataclass
class PutPlan:
    """The reservations of ``begin_put``, to commit or abort exactly once."""

    size: int  # keys in the batch
    parents: list[ScopedKey | None] | None
    ns_tag: int
    compress: bool
    writes: list[BlockWrite] = field(default_factory=list)
    failure: StoreFullError | None = None  # where reserving stopped, if it did
    refused: int = 0  # blocks from that point on
    scratch: torch.Tensor | None = None  # host buffers of the writes not in the pool

    def parent(self, index: int) -> ScopedKey | None:
        return None if self.parents is None else self.parents[index]


@dataclass
class ReadPlan:
    """The pinned blocks of ``begin_read``; ``end_read`` releases them."""

    size: int
    reads: list[BlockRead] = field(default_factory=list)

    def results(self) -> list[bool]:
        out = [False] * self.size
        for r in self.reads:
            out[r.index] = r.ok
        return out
