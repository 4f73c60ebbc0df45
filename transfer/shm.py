"""The ``shm`` backend: same host, other processes, bytes copied through ``/dev/shm``.

Regions a peer may touch live in shared-memory files (``alloc`` makes them;
any buffer the caller mapped from ``/dev/shm`` works too). The initiator maps
the peer's files once and copies with one memcpy per transfer: no byte goes
through a socket. A socket still carries the control, two small round trips
per batch:

    LEASE    the peer checks every entry and pins the regions named
    RELEASE  the copies are done; the peer unpins and confirms

so the peer refuses what it never registered, cannot unregister memory while
it is being copied, and a peer that died shows up as a failed batch.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import stat
import threading
from collections.abc import Sequence

import numpy as np

from kvstore.errors import PeerError
from transfer.base import Region, Transfer
from transfer.config import TransferConfig
from transfer.memory import SHM_DIR, ShmBuffer, ShmLocation, shm_location, sweep_stale_shm
from transfer.plan import encode, one_lane
from transfer.protocol import (
    Kind,
    Op,
    Status,
    new_entries,
    pack_header,
    unpack_header,
)
from transfer.sockets import SocketEngine, recv_header, recv_request, recv_statuses, send_all

MAX_MAPS = 256  # peer files kept mapped; the oldest is dropped beyond this


class ShmEngine(SocketEngine):
    backend = "shm"

    def __init__(self, config: TransferConfig) -> None:
        sweep_stale_shm()
        self._own_files: set[tuple[int, int]] = set()  # (st_dev, st_ino) of our regions' files
        super().__init__(config)
        self._owned: dict[int, ShmBuffer] = {}
        self._maps: dict[str, np.ndarray] = {}
        self._maps_lock = threading.Lock()

    def alloc(self, nbytes: int) -> Region:
        buf = ShmBuffer(nbytes)
        try:
            region = self.register(buf.array)
        except BaseException:
            buf.close()
            raise
        self._owned[region.id] = buf
        return region

    def unregister(self, region: Region, timeout: float | None = None) -> None:
        super().unregister(region, timeout)
        owned = self._owned.pop(region.id, None)
        if owned is not None:
            owned.close()

    def _locate(self, view: np.ndarray) -> ShmLocation | None:
        loc = shm_location(view)
        if loc is not None:
            with contextlib.suppress(OSError):
                st = os.stat(SHM_DIR / loc.name)
                self._own_files.add((st.st_dev, st.st_ino))
        return loc

    # -- initiator --------------------------------------------------------------
    def _execute(self, endpoint: str, items: Sequence[Transfer]) -> np.ndarray:
        pieces = one_lane(items)
        entries = encode(pieces)
        with self._conns.connection(endpoint) as sock:
            statuses = self._call(sock, endpoint, Kind.LEASE, entries)
            for p, t in zip(pieces, items, strict=True):
                if statuses[p.item] != Status.OK:
                    continue
                remote = self._remote_bytes(endpoint, t)
                if remote is None:
                    statuses[p.item] = Status.OUT_OF_BOUNDS
                    continue
                src, dst = (remote, p.local) if p.op == Op.READ else (p.local, remote)
                np.copyto(dst, src)
            self._call(sock, endpoint, Kind.RELEASE, new_entries(0))
        return statuses

    def _call(
        self, sock: socket.socket, endpoint: str, kind: Kind, entries: np.ndarray
    ) -> np.ndarray:
        send_all(sock, [pack_header(kind, len(entries)), entries])
        return recv_statuses(sock, endpoint, len(entries))

    def _remote_bytes(self, endpoint: str, t: Transfer) -> np.ndarray | None:
        """The peer's bytes for ``t`` in our mapping of its file (None if the file is short)."""
        if not t.remote.shm_name:
            return None
        mapped = self._map(endpoint, t.remote.shm_name)
        start = t.remote.shm_offset + t.remote_offset
        if start + t.length > mapped.nbytes:
            return None
        return mapped[start : start + t.length]

    def _map(self, endpoint: str, name: str) -> np.ndarray:
        with self._maps_lock:
            mapped = self._maps.get(name)
            if mapped is not None:
                return mapped
            try:
                fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW)
            except OSError as e:
                raise PeerError(endpoint, f"cannot open its shared memory {name}: {e}") from None
            try:
                st = os.fstat(fd)
                # a peer names a file to map, and could name ours: never
                # copy into or out of our own memory on a peer's say-so
                if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in self._own_files:
                    raise PeerError(endpoint, f"{name} is not that peer's memory to offer")
                size = st.st_size
                mapped = np.frombuffer(mmap.mmap(fd, size, flags=mmap.MAP_SHARED), np.uint8)
            finally:
                os.close(fd)
            if len(self._maps) >= MAX_MAPS:
                self._maps.pop(next(iter(self._maps)))
            self._maps[name] = mapped
            return mapped

    # -- peer -------------------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        # The socket timeout set by recv_request also bounds how long a lease is held.
        while (
            request := recv_request(sock, Kind.LEASE, self.config.timeout, self.config.idle_timeout)
        ) is not None:
            entries, tag = request
            with self.regions.lease(entries, need_shared=True):
                reply = pack_header(Kind.REPLY, len(entries), tag)
                send_all(sock, [reply, entries["status"].copy()])
                raw = recv_header(sock)
                if raw is None:
                    return
                unpack_header(raw, Kind.RELEASE)
            send_all(sock, [pack_header(Kind.REPLY, 0, tag)])

    def _shutdown(self) -> None:
        super()._shutdown()
        for buf in self._owned.values():
            buf.close()
        self._owned.clear()
        with self._maps_lock:
            self._maps.clear()
        with contextlib.suppress(Exception):
            sweep_stale_shm()
