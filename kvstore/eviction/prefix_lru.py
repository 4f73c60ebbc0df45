"""Prefix-aware LRU: least recently used first, but only leaves of the prefix tree.

See ``LeafForest`` for why a block with a resident child is never a victim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvstore.eviction.forest import LeafForest
from kvstore.tier import BlockKey


class PrefixAwareLRU:
    def __init__(self) -> None:
        self._forest = LeafForest()

    def __contains__(self, key: object) -> bool:
        return key in self._forest

    def __len__(self) -> int:
        return len(self._forest)

    def insert(self, key: BlockKey, parent: BlockKey | None) -> None:
        if key in self._forest:
            self._forest.touch(key)
        else:
            self._forest.add(key, parent)

    def insert_many(self, items: Sequence[tuple[BlockKey, BlockKey | None]]) -> None:
        forest = self._forest
        fresh: list[tuple[BlockKey, BlockKey | None]] = []
        for key, parent in items:
            if key in forest:
                forest.add_many(fresh)
                fresh = []
                forest.touch(key)
            else:
                fresh.append((key, parent))
        forest.add_many(fresh)

    def touch(self, key: BlockKey) -> None:
        self._forest.touch(key)

    def remove(self, key: BlockKey) -> None:
        self._forest.drop(key)

    def victim(self, skip: Callable[[BlockKey], bool]) -> BlockKey | None:
        return self._forest.oldest_leaf(0, skip)
