"""The serving side's registry of memory: regions, the grants that expose
parts of them, and the one check every request passes before a byte moves.

Registering memory exposes nothing. A peer can touch only a *grant*: a byte
range of one region, for one direction (peers read it, or write it), under a
random 128-bit key, until it is revoked or expires (think RDMA memory keys,
but per call and per range). A request must present the grant's id and key
and stay inside its range; anything else is refused exactly as a grant that
never existed (no oracle for ids, keys or other callers' memory).

A request is leased, not just checked: the regions it names cannot be
unregistered until the lease ends, so a peer can never write into memory the
owner has already handed back.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.errors import RegionError
from transfer.protocol import Op, Status

ID_SPACE = 1 << 32  # grant ids are u32 on the wire; they wrap, keys never repeat


@dataclass(eq=False)
class _Entry:
    view: np.ndarray
    owner: Any  # keeps the caller's buffer (or our allocation) alive
    shared: bool  # the shm backend's peers may map it
    leases: int = 0
    grants: int = 0  # live grants over it


@dataclass(eq=False, slots=True)
class _Grant:
    rid: int
    entry: _Entry
    start: int  # first byte in the region
    nbytes: int
    ops: int  # bit 1 << Op: what peers may run on it
    key: tuple[int, int]
    expires: float  # monotonic; inf: until revoked


@dataclass(frozen=True)
class Grant:
    """What the owner hands a peer (inside a ``RegionDesc``): id and key."""

    id: int
    key: bytes  # 16 bytes


class RegionTable:
    def __init__(self) -> None:
        self._regions: dict[int, _Entry] = {}
        self._grants: dict[int, _Grant] = {}
        self._ids = itertools.count(1)
        self._grant_ids = itertools.count(1)
        self._cond = threading.Condition()

    def add(self, view: np.ndarray, owner: Any, *, shared: bool = False) -> int:
        with self._cond:
            rid = next(self._ids)
            if rid >= ID_SPACE:
                raise RegionError("region ids exhausted (2^32 registrations)")
            self._regions[rid] = _Entry(view, owner, shared)
            return rid

    def get(self, rid: int) -> np.ndarray | None:
        with self._cond:
            entry = self._regions.get(rid)
            return None if entry is None else entry.view

    def remove(self, rid: int, timeout: float) -> None:
        """Forget ``rid`` (and revoke its grants) once no transfer is using it;
        raise if none ends in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            entry = self._regions.get(rid)
            if entry is None:
                raise RegionError(f"region {rid} is not registered")
            if entry.grants:
                for gid in [g for g, grant in self._grants.items() if grant.entry is entry]:
                    del self._grants[gid]
                entry.grants = 0
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

    # -- grants ------------------------------------------------------------------

    def grant(
        self, rid: int, start: int, nbytes: int, ops: frozenset[Op], ttl: float | None
    ) -> Grant:
        """Let peers run ``ops`` on bytes [start, start + nbytes) of region ``rid``."""
        if not ops:
            raise RegionError("a grant must allow peers to read or to write")
        key = os.urandom(16)
        with self._cond:
            entry = self._regions.get(rid)
            if entry is None:
                raise RegionError(f"region {rid} is not registered")
            if start < 0 or nbytes < 0 or start + nbytes > entry.view.nbytes:
                raise RegionError(
                    f"grant of bytes [{start}, {start + nbytes}) outside region {rid} "
                    f"of {entry.view.nbytes} bytes"
                )
            if Op.WRITE in ops and not entry.view.flags.writeable:
                raise RegionError(f"region {rid} is read-only: peers cannot write it")
            if len(self._grants) >= ID_SPACE // 2:
                raise RegionError("too many live grants; revoke some first")
            now = time.monotonic()
            gid = 0
            while gid == 0 or gid in self._grants:
                gid = next(self._grant_ids) % ID_SPACE
            if gid % 1024 == 0:  # grants nobody revoked go once they expire
                self._expire(now)
            expires = float("inf") if ttl is None else now + ttl
            k = (int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little"))
            mask = sum(1 << op for op in ops)
            self._grants[gid] = _Grant(rid, entry, start, nbytes, mask, k, expires)
            entry.grants += 1
        return Grant(gid, key)

    def revoke(self, gid: int) -> None:
        """End a grant now (requests already leased finish; no new one starts)."""
        with self._cond:
            g = self._grants.pop(gid, None)
            if g is not None:
                g.entry.grants -= 1

    def live_grants(self) -> int:
        with self._cond:
            self._expire(time.monotonic())
            return len(self._grants)

    def _expire(self, now: float) -> None:
        for gid in [g for g, grant in self._grants.items() if grant.expires <= now]:
            self._grants[gid].entry.grants -= 1
            del self._grants[gid]

    def _check(
        self, op: int, gid: int, key: tuple[int, int], offset: int, length: int, need_shared: bool
    ) -> tuple[Status, _Grant | None]:
        g = self._grants.get(gid)
        if g is None or g.key != key or g.expires <= time.monotonic():
            return Status.UNKNOWN_REGION, None
        if op not in (Op.READ, Op.WRITE):
            return Status.BAD_REQUEST, None
        if not g.ops >> op & 1:
            return Status.FORBIDDEN, None
        if offset < 0 or length < 0 or offset + length > g.nbytes:
            return Status.OUT_OF_BOUNDS, None
        if need_shared and not g.entry.shared:
            return Status.NOT_SHARED, None
        return Status.OK, g

    @contextlib.contextmanager
    def lease(
        self, entries: np.ndarray, *, need_shared: bool = False
    ) -> Iterator[list[np.ndarray | None]]:
        """Check each wire entry (see ``protocol.ENTRY``) against its grant and
        pin the good ones.

        Writes each entry's status in place and yields, per entry, the region
        bytes it may touch (None where refused).
        """
        views: list[np.ndarray | None] = []
        held: list[_Entry] = []
        statuses = []
        columns = (
            entries[k].tolist() for k in ("op", "region", "offset", "length", "key0", "key1")
        )
        with self._cond:
            for op, gid, off, n, k0, k1 in zip(*columns, strict=True):
                status, g = self._check(op, gid, (k0, k1), off, n, need_shared)
                statuses.append(status)
                if g is None:
                    views.append(None)
                    continue
                g.entry.leases += 1
                held.append(g.entry)
                at = g.start + off
                views.append(g.entry.view[at : at + n])
        entries["status"] = statuses
        try:
            yield views
        finally:
            with self._cond:
                for entry in held:
                    entry.leases -= 1
                self._cond.notify_all()
