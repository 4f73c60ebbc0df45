"""The two-phase calls' plans: what ``begin_put`` reserved and ``begin_read``
pinned, handed to the caller between the phases."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvstore.errors import StoreFullError
from kvstore.keys import ScopedKey
from kvstore.store.block import Block
from kvstore.tier import Tier


@dataclass(slots=True)
class BlockWrite:
    """One block a put will store: fill ``target`` (a DRAM or, for an
    in-process put, an HBM extent), or, where it is None, hand ``commit_put``
    a buffer of your own (it goes to SSD)."""

    index: int  # position in the batch
    key: ScopedKey
    nbytes: int
    dram: int | None  # reserved DRAM pool offset
    target: torch.Tensor | None
    hbm: int | None = None  # reserved HBM pool offset (then dram is None)
    parent: ScopedKey | None = None

    @property
    def to_ssd(self) -> bool:
        return self.dram is None and self.hbm is None


@dataclass(slots=True)
class BlockRead:
    """One pinned block of a read; ``ok`` once its bytes were delivered."""

    index: int
    key: ScopedKey
    block: Block
    promote: int | None = None  # reserved pool offset for an SSD hit
    tier: Tier = Tier.SSD  # where the bytes come from: HBM and DRAM are pinned
    ok: bool = False
    damaged: bool = False  # its DRAM copy failed verify_dram_reads

    @property
    def pinned(self) -> bool:
        return self.tier.in_memory

    @property
    def nbytes(self) -> int:
        return self.block.nbytes

    @property
    def checksum(self) -> int:
        return self.block.digest


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
