"""One stored block's record: what it is, and where its copies live."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.keys import ScopedKey
from kvstore.tier import Tier


@dataclass(slots=True, eq=False)
class Block:
    """A block's residency: at most one memory copy (HBM or DRAM, at
    ``offset`` in that tier's pool), maybe an SSD copy, and its readers."""

    parent: ScopedKey | None
    nbytes: int
    digest: int
    ns_tag: int
    compress: bool
    home: Tier = Tier.SSD  # the fastest tier holding it
    offset: int = -1  # its extent in ``home``'s pool while home is in memory
    on_ssd: bool = False  # SSD holds a copy (always, while home is SSD)
    pins: int = 0  # readers (and the demoter) copying from the memory extent
    dead: bool = False  # deleted or dropped; memory is freed at the last unpin
    promoting: bool = False  # an SSD read is bringing it into DRAM

    @property
    def in_memory(self) -> bool:
        return self.home is not Tier.SSD

    def place(self, tier: Tier, offset: int) -> None:
        """Its memory copy is now at ``offset`` in ``tier``."""
        self.home, self.offset = tier, offset

    def leave_memory(self) -> tuple[Tier, int]:
        """Forget the memory copy; returns where it was (to free it)."""
        was = self.home, self.offset
        self.home, self.offset = Tier.SSD, -1
        return was
