"""The serving side's registry of memory regions, and the one check every
request passes before a byte of a region is touched.

A request is leased, not just checked: the regions it names cannot be
unregistered until the lease ends, so a peer can never write into memory the
owner has already handed back.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.errors import RegionError
from transfer.protocol import Op, Status


@dataclass(eq=False)
class _Entry:
    view: np.ndarray
    owner: Any  # keeps the caller's buffer (or our allocation) alive
    shared: bool  # the shm backend's peers may map it
    leases: int = 0


class RegionTable:
    def __init__(self) -> None:
        self._regions: dict[int, _Entry] = {}
        self._ids = itertools.count(1)
        self._cond = threading.Condition()

    def add(self, view: np.ndarray, owner: Any, *, shared: bool = False) -> int:
        with self._cond:
            rid = next(self._ids)
            if rid >= 1 << 32:
                raise RegionError("region ids exhausted (2^32 registrations)")
            self._regions[rid] = _Entry(view, owner, shared)
            return rid

    def get(self, rid: int) -> np.ndarray | None:
        with self._cond:
            entry = self._regions.get(rid)
            return None if entry is None else entry.view

    def remove(self, rid: int, timeout: float) -> None:
        """Forget ``rid`` once no transfer is using it; raise if none ends in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            entry = self._regions.get(rid)
            if entry is None:
                raise RegionError(f"region {rid} is not registered")
            while entry.leases:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RegionError(
                        f"region {rid} is still in use by {entry.leases} transfer(s) "
                        f"after {timeout:.1f} s; not unregistered"
                    )
                self._cond.wait(left)
            del self._regions[rid]

    def __len__(self) -> int:
        return len(self._regions)

    def check(self, op: int, rid: int, offset: int, length: int, *, need_shared: bool) -> Status:
        entry = self._regions.get(rid)
        if entry is None:
            return Status.UNKNOWN_REGION
        if op not in (Op.READ, Op.WRITE):
            return Status.BAD_REQUEST
        if offset < 0 or length < 0 or offset + length > entry.view.nbytes:
            return Status.OUT_OF_BOUNDS
        if op == Op.WRITE and not entry.view.flags.writeable:
            return Status.READ_ONLY
        if need_shared and not entry.shared:
            return Status.NOT_SHARED
        return Status.OK

    @contextlib.contextmanager
    def lease(
        self, entries: np.ndarray, *, need_shared: bool = False
    ) -> Iterator[list[np.ndarray | None]]:
        """Check each wire entry (see ``protocol.ENTRY``) and pin the good ones.

        Writes each entry's status in place and yields, per entry, the region
        bytes it may touch (None where refused).
        """
        views: list[np.ndarray | None] = []
        held: list[_Entry] = []
        statuses = []
        columns = (entries[k].tolist() for k in ("op", "region", "offset", "length"))
        with self._cond:
            for op, rid, off, n in zip(*columns, strict=True):
                status = self.check(op, rid, off, n, need_shared=need_shared)
                statuses.append(status)
                if status:
                    views.append(None)
                    continue
                entry = self._regions[rid]
                entry.leases += 1
                held.append(entry)
                views.append(entry.view[off : off + n])
        entries["status"] = statuses
        try:
            yield views
        finally:
            with self._cond:
                for entry in held:
                    entry.leases -= 1
                self._cond.notify_all()
