"""The tiers a block can live in, fastest first (one name for the store, the
directory, the wire and the stats), and a stored block's directory entry."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

BlockKey = bytes  # as kvstore.keys has it; this module stays a leaf


class Tier(str, Enum):
    """A ``str`` enum: members compare, hash, print and serialise as their
    names ("hbm", "dram", "ssd"), so stats and JSON need no conversion."""

    HBM = "hbm"
    DRAM = "dram"
    SSD = "ssd"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def in_memory(self) -> bool:
        return self is not Tier.SSD


@dataclass(frozen=True)
class Entry:
    """A block a node stores, as it publishes it to the directory."""

    key: BlockKey
    tier: Tier
    nbytes: int
    checksum: int
