"""Plain LRU: the baseline every other policy is measured against.

It ignores the prefix tree, so it may evict a block whose children stay
resident (stranding them): exactly the waste the prefix-aware policy avoids.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvstore.tier import BlockKey


class LRU:
    def __init__(self) -> None:
        self._order: OrderedDict[BlockKey, None] = OrderedDict()  # oldest first

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def insert(self, key: BlockKey, parent: BlockKey | None) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def insert_many(self, items: Sequence[tuple[BlockKey, BlockKey | None]]) -> None:
        order = self._order
        for key, _ in items:
            order[key] = None
            order.move_to_end(key)

    def touch(self, key: BlockKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: BlockKey) -> None:
        self._order.pop(key, None)

    def victim(self, skip: Callable[[BlockKey], bool]) -> BlockKey | None:
        for key in self._order:
            if not skip(key):
                return key
        return None
