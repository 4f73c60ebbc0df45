"""The interface between a tier and the rule that picks what leaves it.

A policy sees one tier's resident blocks and their prefix-chain parents (a
block is useless without the blocks before it), hears every insert, access and
removal, and names victims. It owns no bytes; the store pins, copies and frees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from kvstore.tier import BlockKey


class EvictionPolicy(Protocol):
    def insert(self, key: BlockKey, parent: BlockKey | None) -> None:
        """``key`` became resident in the tier (``parent``: the block before it)."""
        ...

    def insert_many(self, items: Sequence[tuple[BlockKey, BlockKey | None]]) -> None:
        """``insert`` of each (key, parent) in order, the keys distinct: a
        put's batch in one call."""
        ...

    def touch(self, key: BlockKey) -> None:
        """``key`` was read."""
        ...

    def remove(self, key: BlockKey) -> None:
        """``key`` left the tier (evicted, demoted, deleted); unknown keys are ignored."""
        ...

    def victim(self, skip: Callable[[BlockKey], bool]) -> BlockKey | None:
        """The block to evict next, passing over those ``skip`` rejects (pinned
        ones); None when nothing is evictable. Does not remove it."""
        ...

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int: ...
