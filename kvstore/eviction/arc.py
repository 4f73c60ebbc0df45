"""Prefix-aware ARC: recency and frequency balanced by what was evicted too soon.

ARC (Megiddo and Modha, FAST 2003) keeps blocks read once (T1, "recent") apart
from blocks read again since they came in (T2, "frequent"), and remembers the
keys each list recently evicted (ghosts B1 and B2, keys only). A block put
again while in B1 shows T1 is too small, so T1's target share grows; one in B2
shows the opposite. A scan of one-shot blocks thus churns T1 and leaves the
reused blocks in T2 alone, while a workload that reuses everything soon keeps
T1 large. Victims are the least recently used leaf (see ``LeafForest``) of the
list over its target, so chains are still eaten from the tail.

Two departures from the paper, both measured with ``kvstore replay``:

- the target starts at half the tier, not zero. From zero it grows one block
  per ghost hit, and on a multi-turn chat workload at 10% capacity it took
  most of the trace to get there, losing about 1 point of hit rate to LRU on
  the way;
- the tier's size in blocks is not given (tiers are sized in bytes), so it is
  the most blocks ever resident at once. Each ghost list holds at most that
  many keys, and never more than ``GHOST_KEYS`` (about 36 MB of keys and
  links), so a tier of millions of small blocks does not double its metadata.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvstore.eviction.forest import LeafForest
from kvstore.tier import BlockKey

RECENT, FREQUENT = 0, 1
Item = tuple[BlockKey, BlockKey | None]
GHOST_KEYS = 1 << 18


class PrefixAwareARC:
    def __init__(self, start: float = 0.5) -> None:
        self._forest = LeafForest(lists=2)
        self._ghosts: tuple[OrderedDict[BlockKey, None], OrderedDict[BlockKey, None]] = (
            OrderedDict(),
            OrderedDict(),
        )
        self._target = start  # T1's share of the tier
        self._blocks = 0  # the tier's size in blocks, as observed

    def __contains__(self, key: object) -> bool:
        return key in self._forest

    def __len__(self) -> int:
        return len(self._forest)

    @property
    def recent_target(self) -> float:
        """T1's target share of the tier (0..1), as adapted so far."""
        return self._target

    def insert(self, key: BlockKey, parent: BlockKey | None) -> None:
        if key in self._forest:
            self.touch(key)
            return
        forest = self._forest
        forest.add(key, parent, self._list_for(key))
        if len(forest) > self._blocks:
            self._blocks = len(forest)

    def _list_for(self, key: BlockKey) -> int:
        """The list a key new to the tier joins: FREQUENT if a ghost list
        remembers it (which moves the target its way), else RECENT."""
        recent, frequent = self._ghosts
        if key in recent:  # evicted from T1 too soon: give T1 more room
            step = max(len(frequent) / len(recent), 1) / max(self._blocks, 1)
            self._target = min(1.0, self._target + step)
            del recent[key]
        elif key in frequent:  # evicted from T2 too soon: give T2 more room
            step = max(len(recent) / len(frequent), 1) / max(self._blocks, 1)
            self._target = max(0.0, self._target - step)
            del frequent[key]
        else:
            return RECENT
        return FREQUENT

    def insert_many(self, items: Sequence[tuple[BlockKey, BlockKey | None]]) -> None:
        """``insert`` of each key, the forest fed a run per list: the
        target moves key by key as ``insert`` would move it (stamps are
        compared within a list only, so two runs order as one loop would)."""
        forest = self._forest
        runs: tuple[list[Item], list[Item]] = ([], [])
        size = len(forest)
        for key, parent in items:
            if key in forest:  # resident already: a touch, in order
                self._add_runs(runs)
                self.insert(key, parent)
                size = len(forest)
                continue
            runs[self._list_for(key)].append((key, parent))
            size += 1
            if size > self._blocks:
                self._blocks = size
        self._add_runs(runs)

    def _add_runs(self, runs: tuple[list[Item], list[Item]]) -> None:
        for lst, run in enumerate(runs):
            self._forest.add_many(run, lst)
            run.clear()

    def touch(self, key: BlockKey) -> None:
        self._forest.touch(key, FREQUENT)

    def remove(self, key: BlockKey) -> None:
        lst = self._forest.drop(key)
        if lst is None:
            return
        ghost = self._ghosts[lst]
        ghost[key] = None
        if len(ghost) > min(self._blocks, GHOST_KEYS):
            ghost.popitem(last=False)

    def victim(self, skip: Callable[[BlockKey], bool]) -> BlockKey | None:
        over = self._forest.size(RECENT) > self._target * self._blocks
        first = RECENT if over else FREQUENT
        found = self._forest.oldest_leaf(first, skip)
        return found if found is not None else self._forest.oldest_leaf(1 - first, skip)
