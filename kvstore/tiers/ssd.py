"""The SSD tier: an append-only log of checksummed records in segment files.

Writes append to the active segment (one ``pwritev`` of header and payload,
straight from the caller's memory); reads ``preadv`` straight into the caller's
buffer and verify the checksum there. The in-memory index is rebuilt by
scanning the segments when the tier opens. Deletes append a tombstone so a
restart does not bring the block back; eviction just forgets the record (a
record that survives to a restart comes back as a valid, checksummed block).
Compaction copies the live records of mostly-dead segments forward and removes
those files.

Keys are scoped (``kvstore.keys.scoped``: namespace tag + block key); a
record keeps the two apart in its header. Thread-safe: one lock serialises
writes, compaction and index changes; reads hold it only to find the record
and pin its segment, and copy outside it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lz4.block
import torch

from kvstore.checksum import checksum
from kvstore.config import SsdConfig
from kvstore.errors import DiskFullError, InvalidArgumentError, StorageError
from kvstore.keys import SCOPED_KEY_BYTES, unscoped
from kvstore.tiers.segment import (
    FLAG_LZ4,
    FLAG_TOMBSTONE,
    MAX_PAYLOAD,
    SECRET_FILE,
    Record,
    ScanReport,
    load_secret,
    pack_header,
    payload_offset,
    record_end,
    scan,
)

log = logging.getLogger(__name__)

_SEGMENT_GLOB = "seg-*.log"


@dataclass(eq=False)
class _Segment:
    id: int
    path: Path
    fd: int
    size: int  # append position (end of the last record)
    live_bytes: int = 0
    keys: set[bytes] = field(default_factory=set)
    tombstones: set[bytes] = field(default_factory=set)
    readers: int = 0
    removed: bool = False

    @property
    def garbage(self) -> int:
        return self.size - self.live_bytes


@dataclass
class SsdCounters:
    checksum_failures: int = 0
    read_errors: int = 0
    compactions: int = 0
    reclaimed_bytes: int = 0
    lz4_raw_bytes: int = 0
    lz4_stored_bytes: int = 0
    scan_records: int = 0
    scan_skipped_bytes: int = 0


class SsdTier:
    name = "ssd"

    def __init__(self, config: SsdConfig) -> None:
        if config.path is None:
            raise InvalidArgumentError("the SSD tier needs ssd.path")
        self.config = config
        self.path = config.path
        self.capacity = config.capacity
        self.counters = SsdCounters()
        self._lock = threading.Lock()
        self._index: dict[bytes, tuple[_Segment, Record]] = {}
        self._segments: dict[int, _Segment] = {}
        self._lock_fd = self._open_dir()
        try:
            self._secret = self._load_secret()
            self._recover()
            self._active = self._new_segment()
        except BaseException:
            self.close()
            raise

    # -- opening -----------------------------------------------------------

    def _open_dir(self) -> int:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise StorageError(self.path, f"cannot use as data dir: {e.strerror}") from None
        if not os.access(self.path, os.W_OK):
            os.close(fd)
            raise StorageError(self.path, "data dir is not writable")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StorageError(self.path, "data dir is in use by another kvstore process") from None
        return fd

    def _load_secret(self) -> bytes:
        """The header key; a fresh one where there is none (warning when old
        segments are there: without their key they cannot be trusted)."""
        if not (self.path / SECRET_FILE).exists() and any(self.path.glob(_SEGMENT_GLOB)):
            log.warning(
                "%s: segments without the store's header key (an older format, or SECRET was "
                "removed); their records cannot be verified and are ignored",
                self.path,
            )
        return load_secret(self.path, create=True)

    def _recover(self) -> None:
        for path in sorted(self.path.glob(_SEGMENT_GLOB)):
            try:
                seg_id = int(path.stem.split("-", 1)[1])
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)  # a link is never followed
            except (ValueError, OSError) as e:
                log.warning("skipping %s: %s", path, e)
                continue
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                log.warning("skipping %s: not a regular file", path)
                continue
            size = os.fstat(fd).st_size
            if size == 0:  # an active segment that never got a record
                os.close(fd)
                path.unlink(missing_ok=True)
                continue
            seg = _Segment(seg_id, path, fd, size)
            self._segments[seg_id] = seg
            report = ScanReport()
            for rec in scan(fd, size, report, self._secret):
                key = rec.scoped
                self._forget(key)
                if rec.tombstone:
                    seg.tombstones.add(key)
                else:
                    self._index[key] = (seg, rec)
                    seg.keys.add(key)
                    seg.live_bytes += rec.nbytes
            self.counters.scan_records += report.records
            self.counters.scan_skipped_bytes += report.skipped_bytes
            if report.skipped_bytes:
                log.warning(
                    "%s: skipped %d damaged or torn bytes while scanning",
                    path,
                    report.skipped_bytes,
                )

    def _new_segment(self) -> _Segment:
        seg_id = max(self._segments, default=0) + 1
        path = self.path / f"seg-{seg_id:08d}.log"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise StorageError(path, f"cannot create segment: {e.strerror}") from None
        seg = _Segment(seg_id, path, fd, 0)
        self._segments[seg_id] = seg
        return seg

    # -- queries -----------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Bytes of live records (what capacity limits; garbage awaits compaction)."""
        return sum(s.live_bytes for s in self._segments.values())

    @property
    def disk_bytes(self) -> int:
        return sum(s.size for s in self._segments.values())

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity - self.used_bytes)

    def record_bytes(self, nbytes: int) -> int:
        """Disk bytes a block of ``nbytes`` takes (uncompressed; an upper bound)."""
        return record_end(0, nbytes)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def records(self) -> Iterator[Record]:
        """Live records, oldest first (segment order, then file order)."""
        with self._lock:
            entries = sorted(self._index.values(), key=lambda e: (e[0].id, e[1].offset))
        for _, rec in entries:
            yield rec

    # -- writes ------------------------------------------------------------

    def put(
        self,
        key: bytes,
        src: torch.Tensor,
        digest: int,
        *,
        parent: bytes | None = None,
        compress: bool = False,
    ) -> None:
        """Append ``src`` (contiguous uint8) as ``key`` (scoped, as is ``parent``:
        the same namespace); replaces an older record."""
        if len(key) != SCOPED_KEY_BYTES:
            raise InvalidArgumentError(f"SSD keys are scoped ({SCOPED_KEY_BYTES} bytes)")
        raw_len = src.numel()
        if raw_len > MAX_PAYLOAD:
            raise InvalidArgumentError(f"block of {raw_len} bytes exceeds the SSD record limit")
        payload: memoryview | bytes = src.numpy().data
        flags = 0
        if compress and raw_len:
            packed = lz4.block.compress(payload, store_size=False)
            self.counters.lz4_raw_bytes += raw_len
            if len(packed) < raw_len:
                payload, flags = packed, FLAG_LZ4
            self.counters.lz4_stored_bytes += len(payload)
        with self._lock:
            self._append(
                key, None if parent is None else parent[4:], flags, payload, raw_len, digest
            )

    def remove(self, key: bytes, *, tombstone: bool) -> bool:
        """Forget ``key``; with ``tombstone`` a restart will not bring it back."""
        with self._lock:
            found = self._forget(key)
            if found and tombstone:
                self._append(key, None, FLAG_TOMBSTONE, b"", 0, 0)
            return found

    def _forget(self, key: bytes) -> bool:
        entry = self._index.pop(key, None)
        if entry is None:
            return False
        seg, rec = entry
        seg.live_bytes -= rec.nbytes
        seg.keys.discard(key)
        return True

    def _append(
        self,
        key: bytes,
        parent: bytes | None,
        flags: int,
        payload: memoryview | bytes,
        raw_len: int,
        digest: int,
    ) -> None:
        """Write one record of scoped ``key`` (``parent``: its block key alone)
        at the end of the active segment (lock held).

        On a full disk, dead segments are deleted (``_reclaim_dead``) and the
        write is tried once more before ``DiskFullError`` goes up.
        """
        stored = len(payload)
        ns_tag, block = unscoped(key)
        header = pack_header(block, parent, flags, stored, raw_len, digest, ns_tag, self._secret)
        for attempt in range(2):
            seg = self._active
            if seg.size and seg.size + record_end(0, stored) > self.config.segment_size:
                self._roll()
                seg = self._active
            start = seg.size
            pad = payload_offset(start, stored) - start - len(header)
            try:
                self._write(seg, start, [header + bytes(pad), payload])
                break
            except DiskFullError:
                if attempt or not self._reclaim_dead():
                    raise
        rec = Record(block, parent, flags, stored, raw_len, digest, ns_tag, start)
        seg.size = rec.end
        if flags & FLAG_TOMBSTONE:
            seg.tombstones.add(key)
            return
        self._forget(key)
        self._index[key] = (seg, rec)
        seg.keys.add(key)
        seg.live_bytes += rec.nbytes
        if self.config.sync_writes:
            os.fdatasync(seg.fd)

    def _write(self, seg: _Segment, offset: int, parts: list[bytes | memoryview]) -> None:
        total = sum(len(p) for p in parts)
        done = 0
        try:
            while done < total:
                n = os.pwritev(seg.fd, _skip(parts, done), offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                done += n
        except OSError as e:
            with contextlib.suppress(OSError):  # leave no partial record behind
                os.ftruncate(seg.fd, seg.size)
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise DiskFullError(seg.path, total) from None
            raise StorageError(seg.path, f"write failed: {e.strerror}") from None

    def _roll(self) -> None:
        os.fdatasync(self._active.fd)
        self._active = self._new_segment()

    # -- reads -------------------------------------------------------------

    def get_into(self, key: bytes, dst: torch.Tensor) -> bool:
        """Read ``key`` into ``dst`` (contiguous uint8 of the block's size).

        False on a miss or on damage (checksum mismatch, short read): a damaged
        record is dropped from the index and counted, and ``dst``'s bytes are
        then undefined.
        """
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                return False
            seg, rec = entry
            if dst.numel() != rec.raw_len:
                raise InvalidArgumentError(
                    f"destination is {dst.numel()} bytes, block is {rec.raw_len}"
                )
            seg.readers += 1
        try:
            ok = self._read_verified(seg, rec, dst)
        finally:
            with self._lock:
                seg.readers -= 1
                if seg.removed and seg.readers == 0:
                    os.close(seg.fd)
        if not ok:
            with self._lock:
                if self._index.get(key) == (seg, rec):
                    self._forget(key)
        return ok

    def _read_verified(self, seg: _Segment, rec: Record, dst: torch.Tensor) -> bool:
        try:
            if rec.flags & FLAG_LZ4:
                packed = os.pread(seg.fd, rec.stored_len, rec.payload_offset)
                raw = lz4.block.decompress(packed, uncompressed_size=rec.raw_len)
                if len(raw) != rec.raw_len:
                    raise ValueError("decompressed size differs")
                dst.numpy()[:] = memoryview(raw)
            elif rec.raw_len:
                n = os.preadv(seg.fd, [dst.numpy().data], rec.payload_offset)
                if n != rec.raw_len:
                    raise OSError(errno.EIO, f"short read: {n} of {rec.raw_len} bytes")
        except (OSError, ValueError, lz4.block.LZ4BlockError) as e:
            log.warning("%s: cannot read block at %d: %s", seg.path, rec.offset, e)
            self.counters.read_errors += 1
            return False
        if checksum(dst) != rec.checksum:
            log.warning("%s: checksum mismatch in block at %d", seg.path, rec.offset)
            self.counters.checksum_failures += 1
            return False
        return True

    # -- compaction --------------------------------------------------------

    def garbage_ratio(self) -> float:
        disk = self.disk_bytes
        return (disk - self.used_bytes) / disk if disk else 0.0

    def compact(self, *, min_garbage_ratio: float | None = None) -> int:
        """Rewrite the live records of sealed segments with at least this much
        garbage (default: the configured ratio) and delete the old files.

        Returns the disk bytes reclaimed.
        """
        ratio = (
            self.config.compact_garbage_ratio if min_garbage_ratio is None else min_garbage_ratio
        )
        with self._lock:
            sealed = sorted(
                (s for s in self._segments.values() if s is not self._active),
                key=lambda s: s.id,
            )
        reclaimed = 0
        for seg in sealed:
            if seg.size == 0 or seg.garbage == 0 or seg.garbage / seg.size < ratio:
                continue
            reclaimed += self._compact_segment(seg)
        return reclaimed

    def _compact_segment(self, seg: _Segment) -> int:
        with self._lock:
            for key in list(seg.keys):
                _, rec = self._index[key]
                payload = os.pread(seg.fd, rec.stored_len, rec.payload_offset)
                if len(payload) != rec.stored_len:
                    self._forget(key)
                    continue
                self._append(key, rec.parent, rec.flags, payload, rec.raw_len, rec.checksum)
            # A tombstone matters only while an older segment may hold the key.
            if any(other < seg.id for other in self._segments):
                for key in seg.tombstones:
                    if key not in self._index:
                        self._append(key, None, FLAG_TOMBSTONE, b"", 0, 0)
            os.fdatasync(self._active.fd)
            return self._drop(seg)

    def _drop(self, seg: _Segment) -> int:
        """Delete a segment whose records are all rewritten or dead (lock held)."""
        del self._segments[seg.id]
        seg.removed = True
        try:
            seg.path.unlink()
        except OSError as e:
            log.warning("cannot remove compacted segment %s: %s", seg.path, e)
        if seg.readers == 0:
            os.close(seg.fd)
        self.counters.compactions += 1
        self.counters.reclaimed_bytes += seg.size
        return seg.size

    def _reclaim_dead(self) -> int:
        """Disk full: delete segments without live records, oldest first (lock
        held). Only the oldest can go: a newer segment's tombstones may be what
        keeps an older one's deleted keys from coming back at restart."""
        freed = 0
        for seg in sorted(self._segments.values(), key=lambda s: s.id):
            if seg.keys or not seg.size:
                break
            if seg is self._active:
                self._active = self._new_segment()
            freed += self._drop(seg)
        if freed:
            log.warning("disk full: deleted dead segments, %d bytes back", freed)
        return freed

    # -- closing -----------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            for seg in self._segments.values():
                if seg.fd >= 0:
                    with contextlib.suppress(OSError):
                        os.fdatasync(seg.fd)
                    os.close(seg.fd)
                    seg.fd = -1
            self._segments.clear()
            self._index.clear()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


def _skip(parts: list[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """``parts`` with the first ``n`` bytes dropped (to resume a short write)."""
    out: list[bytes | memoryview] = []
    for p in parts:
        if n >= len(p):
            n -= len(p)
            continue
        out.append(memoryview(p)[n:] if n else p)
        n = 0
    return out
