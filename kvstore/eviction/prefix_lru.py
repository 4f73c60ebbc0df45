"""Prefix-aware LRU: least recently used first, but only leaves of the prefix tree.

A block whose child is resident in the same tier is never a victim: evicting it
would strand the child, which no lookup can reach without it. So a chain is
eaten from its tail, and its parent becomes a candidate (at its own recency)
once its last resident child has gone.

Leaves sit in a heap ordered by last access; touches push a fresh entry and
stale entries are dropped when they surface (rebuilt when they pile up).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from kvstore.keys import BlockKey


class PrefixAwareLRU:
    def __init__(self) -> None:
        self._parent: dict[BlockKey, BlockKey | None] = {}
        self._children: dict[BlockKey, int] = {}  # resident children per block
        self._stamp: dict[BlockKey, int] = {}  # last access tick
        self._heap: list[tuple[int, BlockKey]] = []
        self._tick = 0

    def __contains__(self, key: object) -> bool:
        return key in self._stamp

    def __len__(self) -> int:
        return len(self._stamp)

    def is_leaf(self, key: BlockKey) -> bool:
        return key in self._stamp and self._children[key] == 0

    def insert(self, key: BlockKey, parent: BlockKey | None) -> None:
        if key in self._stamp:
            self.touch(key)
            return
        self._parent[key] = parent
        self._children[key] = 0
        self._stamp[key] = self._next()
        if parent is not None and parent in self._stamp:
            self._children[parent] += 1
        self._push(key)

    def touch(self, key: BlockKey) -> None:
        if key in self._stamp:
            self._stamp[key] = self._next()
            if self._children[key] == 0:
                self._push(key)

    def remove(self, key: BlockKey) -> None:
        if key not in self._stamp:
            return
        del self._stamp[key]
        del self._children[key]
        parent = self._parent.pop(key)
        if parent is not None and parent in self._stamp:
            self._children[parent] -= 1
            if self._children[parent] == 0:
                self._push(parent)

    def victim(self, skip: Callable[[BlockKey], bool]) -> BlockKey | None:
        held: list[tuple[int, BlockKey]] = []
        found = None
        while self._heap:
            stamp, key = self._heap[0]
            if self._stamp.get(key) != stamp or self._children[key] != 0:
                heapq.heappop(self._heap)  # stale: touched since, removed, or no longer a leaf
                continue
            if skip(key):
                held.append(heapq.heappop(self._heap))
                continue
            found = key
            break
        for entry in held:
            heapq.heappush(self._heap, entry)
        return found

    def _next(self) -> int:
        self._tick += 1
        return self._tick

    def _push(self, key: BlockKey) -> None:
        heapq.heappush(self._heap, (self._stamp[key], key))
        if len(self._heap) > 2 * len(self._stamp) + 64:
            self._heap = [(s, k) for k, s in self._stamp.items() if self._children[k] == 0]
            heapq.heapify(self._heap)
