"""Disk space held back so a delete still lasts on a full disk.

A delete is only durable once its tombstone is on disk, and a full disk is
exactly when operators delete. The SSD tier keeps a preallocated file
(``RESERVE``) in its data dir and gives its blocks back to the file system,
a slice at a time, when a tombstone write finds no room; it grows the file
again whenever space comes back (a segment is deleted).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from kvstore.errors import StorageError

RESERVE_FILE = "RESERVE"
_SLICE = 64 << 10


def reserve_bytes(capacity: int) -> int:
    """1/256 of the tier's capacity, between 64 KiB and 1 MiB (8,192 tombstones
    of 128 bytes, and dead segments are deleted as the tombstones go in)."""
    return min(1 << 20, max(_SLICE, capacity // 256 // _SLICE * _SLICE))


class DiskReserve:
    def __init__(self, data_dir: Path, nbytes: int) -> None:
        path = data_dir / RESERVE_FILE
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise StorageError(path, f"cannot open the delete reserve: {e.strerror}") from None
        self.target = nbytes
        self.refill()

    @property
    def nbytes(self) -> int:
        """Bytes the file holds now (its length; allocated by ``refill``)."""
        return os.fstat(self._fd).st_size if self._fd >= 0 else 0

    def refill(self) -> None:
        """Grow back towards the target, as far as the disk allows."""
        have = self.nbytes
        while have < self.target:
            step = min(_SLICE, self.target - have)
            try:
                os.posix_fallocate(self._fd, have, step)
            except OSError:
                with contextlib.suppress(OSError):  # keep the length what is allocated
                    os.ftruncate(self._fd, have)
                return
            have += step

    def release(self) -> bool:
        """Give one slice back to the file system; False when nothing is left."""
        have = self.nbytes
        if have == 0:
            return False
        os.ftruncate(self._fd, max(0, have - _SLICE))
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
