"""A tier's resident blocks as a prefix forest whose leaves leave oldest first.

A block whose child is resident in the same tier is never handed out as a
victim: evicting it would strand the child, which no lookup can reach without
it. So a chain is eaten from its tail, and a parent becomes a candidate (at its
own recency) once its last resident child has gone.

Blocks sit in one of a few numbered lists (a policy's segments, such as ARC's
recent and frequent lists). Each list keeps its leaves in a heap ordered by
last access; touches push a fresh entry and stale entries are dropped when they
surface (the heap is rebuilt when they pile up).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

from kvstore.tier import BlockKey


class LeafForest:
    def __init__(self, lists: int = 1) -> None:
        self._parent: dict[BlockKey, BlockKey | None] = {}
        # resident children per key, whether that key is resident or not: a
        # parent may arrive after its children (demotion moves tails down first)
        self._children: dict[BlockKey, int] = {}
        self._stamp: dict[BlockKey, int] = {}  # last access tick
        self._list: dict[BlockKey, int] = {}
        self._heaps: list[list[tuple[int, BlockKey]]] = [[] for _ in range(lists)]
        self._sizes = [0] * lists
        self._tick = 0

    def __contains__(self, key: object) -> bool:
        return key in self._stamp

    def __len__(self) -> int:
        return len(self._stamp)

    def size(self, lst: int) -> int:
        return self._sizes[lst]

    def add(self, key: BlockKey, parent: BlockKey | None, lst: int = 0) -> None:
        """A new resident block (the caller checks it is not one already)."""
        self._parent[key] = parent
        self._tick += 1
        self._stamp[key] = self._tick
        self._list[key] = lst
        self._sizes[lst] += 1
        if parent is not None:
            self._children[parent] = self._children.get(parent, 0) + 1
        if key not in self._children:
            self._push(key)

    def add_many(self, items: Sequence[tuple[BlockKey, BlockKey | None]], lst: int = 0) -> None:
        """``add`` of each (key, parent) in order, none resident yet: the
        links first, then the heap gets the batch's leaves alone (a chain's
        inner blocks stopped being leaves within the batch)."""
        if not items:
            return
        parent_of, children, stamp, list_of = self._parent, self._children, self._stamp, self._list
        tick = self._tick
        for key, parent in items:
            parent_of[key] = parent
            tick += 1
            stamp[key] = tick
            list_of[key] = lst
            if parent is not None:
                children[parent] = children.get(parent, 0) + 1
        self._tick = tick
        self._sizes[lst] += len(items)
        heap, push = self._heaps[lst], heapq.heappush
        for key, _ in items:
            if key not in children:
                push(heap, (stamp[key], key))
        self._trim(lst)

    def touch(self, key: BlockKey, lst: int | None = None) -> None:
        """Mark ``key`` most recent (moving it to list ``lst`` if given)."""
        if key not in self._stamp:
            return
        if lst is not None and lst != self._list[key]:
            self._sizes[self._list[key]] -= 1
            self._sizes[lst] += 1
            self._list[key] = lst
        self._tick += 1
        self._stamp[key] = self._tick
        if key not in self._children:
            self._push(key)

    def drop(self, key: BlockKey) -> int | None:
        """Forget ``key``; the list it was in (None if it was not resident)."""
        if key not in self._stamp:
            return None
        del self._stamp[key]
        lst = self._list.pop(key)
        self._sizes[lst] -= 1
        parent = self._parent.pop(key)
        if parent is not None:
            left = self._children[parent] - 1
            if left:
                self._children[parent] = left
            else:
                del self._children[parent]
                if parent in self._stamp:
                    self._push(parent)
        return lst

    def oldest_leaf(self, lst: int, skip: Callable[[BlockKey], bool]) -> BlockKey | None:
        """The least recently used leaf of list ``lst`` that ``skip`` accepts."""
        heap = self._heaps[lst]
        held: list[tuple[int, BlockKey]] = []
        found = None
        while heap:
            stamp, key = heap[0]
            if self._stamp.get(key) != stamp or key in self._children or self._list[key] != lst:
                heapq.heappop(heap)  # stale: touched since, removed, moved, or not a leaf
                continue
            if skip(key):
                held.append(heapq.heappop(heap))
                continue
            found = key
            break
        for entry in held:
            heapq.heappush(heap, entry)
        return found

    def _push(self, key: BlockKey) -> None:
        lst = self._list[key]
        heap = self._heaps[lst]
        heapq.heappush(heap, (self._stamp[key], key))
        self._trim(lst)

    def _trim(self, lst: int) -> None:
        """Rebuild list ``lst``'s heap once stale entries outnumber live ones."""
        heap = self._heaps[lst]
        if len(heap) > 2 * self._sizes[lst] + 64:
            heap[:] = [
                (s, k)
                for k, s in self._stamp.items()
                if self._list[k] == lst and k not in self._children
            ]
            heapq.heapify(heap)
