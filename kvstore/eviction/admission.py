"""Admission: whether a new block may push an older one out of DRAM.

The store asks only under pressure (DRAM cannot take the block without an
eviction) and only for a put's tail: the last block of the batch, which on a
prompt is the part least likely to be shared (the user's own question after a
shared document or system prompt). A declined block goes to SSD where there is
one, and is not stored where there is none (its put reports it not stored).

``tail`` declines such a block the first time its key is seen and admits it
when it comes back, so a tail that does get reused costs one extra miss. On
the Mooncake trace this gains 0.5 to 0.6 points of hit rate at 10 to 25%
capacity; on a multi-turn chat workload, where the last turn's tail is the
next turn's prefix, it loses about 1 point, so the default admits everything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from kvstore.tier import BlockKey

SEEN_KEYS = 1 << 16  # how many declined tails ``tail`` remembers (16 bytes each)


class Admission(Protocol):
    def admit(self, key: BlockKey) -> bool:
        """May the tail block ``key`` evict another to get into DRAM?"""
        ...


class AdmitAll:
    def admit(self, key: BlockKey) -> bool:
        return True


class SecondSightTail:
    """Declines a tail block seen for the first time; admits it when it returns."""

    def __init__(self, remember: int = SEEN_KEYS) -> None:
        self._seen: OrderedDict[BlockKey, None] = OrderedDict()
        self._remember = remember

    def admit(self, key: BlockKey) -> bool:
        if self._seen.pop(key, 0) is None:
            return True
        self._seen[key] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        return False


ADMISSIONS: dict[str, Callable[[], Admission]] = {"all": AdmitAll, "tail": SecondSightTail}
