"""The SSD tier: an append-only log of checksummed records in segment files.

Writes append to the active segment (one ``pwritev`` of header and payload,
straight from the caller's memory); reads ``preadv`` straight into the caller's
buffer and verify the checksum there. The in-memory index is rebuilt by
scanning the segments when the tier opens. A delete or an eviction appends a
tombstone (many in one write) before the index forgets the key, so a restart
brings back exactly what was there: no deleted key, nothing past capacity.
Deletes draw on a disk reserve (``kvstore.tiers.reserve``) when the disk is
full. A tombstone remembers the segment it was first written to (its origin)
and lives while an older segment, which may hold a dead copy of its key,
does. Compaction copies the live records and needed tombstones of
mostly-dead segments forward and removes those files.

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lz4.block
import torch

from kvstore.checksum import checksum
from kvstore.config import SsdConfig
from kvstore.errors import DiskFullError, InvalidArgumentError, StorageError
from kvstore.keys import SCOPED_KEY_BYTES, unscoped
from kvstore.tier import Tier
from kvstore.tiers.reserve import DiskReserve, reserve_bytes
from kvstore.tiers.segment import (
    FLAG_LZ4,
    FLAG_TOMBSTONE,
    MAX_PAYLOAD,
    SECRET_FILE,
    Record,
    ScanReport,
    load_secret,
    pack_header,
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
    tombstones: dict[bytes, int] = field(default_factory=dict)  # key -> origin segment
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
    scan_skipped_bytes: int = 0


class SsdTier:
    name = Tier.SSD

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
        self._reserve: DiskReserve | None = None
        try:
            self._reserve = DiskReserve(self.path, reserve_bytes(self.capacity))
            self._secret = self._load_secret()
            self._recover()
            self._active = self._new_segment()
            self._trim_to_capacity()
        except BaseException:
            self.close()
            raise

    # -- opening -----------------------------------------------------------

    def _open_dir(self) -> int:
        if self.path.exists() and not self.path.is_dir():
            raise StorageError(
                self.path, "is a file; the SSD tier needs a directory (--ssd-path DIR, or none)"
            )
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
                if rec.tombstone:  # its checksum field holds its origin
                    seg.tombstones[key] = rec.checksum or seg_id
                else:
                    self._index[key] = (seg, rec)
                    seg.keys.add(key)
                    seg.live_bytes += rec.nbytes
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

    def _trim_to_capacity(self) -> None:
        """Over capacity at open (a smaller ``ssd.capacity``, or tombstones a
        full disk could not take): the oldest records go, with tombstones."""
        over = self.used_bytes - self.capacity
        if over <= 0:
            return
        victims: list[bytes] = []
        for rec in self.records():
            if over <= 0:
                break
            victims.append(rec.scoped)
            over -= rec.nbytes
        log.warning(
            "%s: %d records over the %d-byte capacity; dropping the oldest",
            self.path,
            len(victims),
            self.capacity,
        )
        self.evict(victims)

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

    def footprint(self, key: bytes) -> int:
        """Capacity the record of ``key`` takes (0: none)."""
        entry = self._index.get(key)
        return 0 if entry is None else entry[1].nbytes

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
            if len(packed) < raw_len:
                payload, flags = packed, FLAG_LZ4
        with self._lock:  # counters too: puts come from many threads
            if compress and raw_len:
                self.counters.lz4_raw_bytes += raw_len
                self.counters.lz4_stored_bytes += len(payload)
            block_parent = None if parent is None else parent[4:]
            self._append([(key, block_parent, flags, payload, raw_len, digest)])

    def remove(self, keys: Iterable[bytes]) -> int:
        """Delete ``keys`` for good; returns how many were here.

        Their tombstones go to disk in one write, from the delete reserve if
        the disk is full, before the index forgets them: on DiskFullError
        (the reserve spent too) nothing is forgotten.
        """
        with self._lock:
            found = [k for k in dict.fromkeys(keys) if k in self._index]
            if not found:
                return 0
            self._append([_tombstone(k) for k in found], reserve=True)
            os.fdatasync(self._active.fd)  # a delete must outlast a crash of the host
            touched = {self._index[k][0] for k in found}
            for k in found:
                self._forget(k)
            self._drop_dead(touched)  # segments this emptied go now: a full disk needs them
            reserve = self._reserve
            if reserve is not None and reserve.nbytes < reserve.target:
                self._reclaim_dead()
                reserve.refill()
            return len(found)

    def evict(self, keys: Iterable[bytes]) -> None:
        """Forget ``keys`` to make room, with tombstones so a restart does not
        bring them back. Never fails: a tombstone the disk cannot take is
        logged, and the next open trims the tier to capacity instead."""
        with self._lock:
            found = [k for k in dict.fromkeys(keys) if k in self._index]
            if not found:
                return
            try:
                self._append([_tombstone(k) for k in found])
            except StorageError as e:
                log.warning("%d evicted records have no tombstone: %s", len(found), e)
            for k in found:
                self._forget(k)

    def _forget(self, key: bytes) -> bool:
        entry = self._index.pop(key, None)
        if entry is None:
            return False
        seg, rec = entry
        seg.live_bytes -= rec.nbytes
        seg.keys.discard(key)
        return True

    def _append(
        self, items: Sequence[_Item], *, reserve: bool = False, reclaim: bool = True
    ) -> None:
        """Write records at the end of the active segment in one write (lock held).

        On a full disk, dead segments are deleted (with ``reclaim``) and, with
        ``reserve`` (tombstones), the delete reserve gives back slices, until
        the write fits or nothing is left to free: then DiskFullError.
        """
        while True:
            try:
                seg, recs = self._write_records(items)
                break
            except DiskFullError:
                freed = reclaim and self._reclaim_dead()
                if not freed and not (reserve and self._reserve and self._reserve.release()):
                    raise
        for rec in recs:
            key = rec.scoped
            if rec.tombstone:
                seg.tombstones[key] = rec.checksum
                continue
            self._forget(key)
            self._index[key] = (seg, rec)
            seg.keys.add(key)
            seg.live_bytes += rec.nbytes
        if self.config.sync_writes:
            os.fdatasync(seg.fd)

    def _write_records(self, items: Sequence[_Item]) -> tuple[_Segment, list[Record]]:
        seg = self._active
        need = sum(record_end(0, len(item[3])) for item in items)
        if seg.size and seg.size + need > self.config.segment_size:
            self._roll()
            seg = self._active
        parts: list[bytes | memoryview] = []
        recs: list[Record] = []
        pos = seg.size
        for key, parent, flags, payload, raw_len, digest in items:
            if flags & FLAG_TOMBSTONE and not digest:
                digest = seg.id  # a fresh tombstone's origin
            ns_tag, block = unscoped(key)
            stored = len(payload)
            rec = Record(block, parent, flags, stored, raw_len, digest, ns_tag, pos)
            header = pack_header(rec, self._secret)
            if recs:  # pad the previous record out to this header
                parts.append(bytes(pos - recs[-1].payload_offset - recs[-1].stored_len))
            parts += [header + bytes(rec.payload_offset - pos - len(header)), payload]
            recs.append(rec)
            pos = rec.end
        self._write(seg, seg.size, parts)
        seg.size = pos
        return seg, recs

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
            with self._lock:
                self.counters.read_errors += 1
            return False
        if checksum(dst) != rec.checksum:
            log.warning("%s: checksum mismatch in block at %d", seg.path, rec.offset)
            with self._lock:
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
                self._append([(key, rec.parent, rec.flags, payload, rec.raw_len, rec.checksum)])
            self._carry_tombstones(seg)
            freed = self._drop(seg)
            if self._reserve:
                self._reserve.refill()
            return freed

    def _carry_tombstones(self, seg: _Segment) -> None:
        """Rewrite ``seg``'s tombstones that still matter into the active
        segment (lock held): those whose key is not live again and that are
        younger than some other segment, which may hold a dead copy."""
        oldest = min((i for i in self._segments if i != seg.id), default=None)
        carry = [
            _tombstone(key, origin)
            for key, origin in seg.tombstones.items()
            if key not in self._index and oldest is not None and oldest < origin
        ]
        if carry:
            self._append(carry, reserve=True, reclaim=False)

    def _drop(self, seg: _Segment) -> int:
        """Delete a segment whose records are all rewritten or dead (lock held),
        once what was copied from it (records, tombstones) is on disk."""
        os.fdatasync(self._active.fd)
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

    def _drop_dead(self, segs: Iterable[_Segment]) -> int:
        """Delete those of ``segs`` without live records, oldest first,
        carrying forward the tombstones that still matter (lock held)."""
        freed = 0
        for seg in sorted(segs, key=lambda s: s.id):
            if seg.keys or seg.removed or not seg.size:
                continue
            if seg is self._active:
                self._active = self._new_segment()
            try:
                self._carry_tombstones(seg)
            except DiskFullError:
                break
            freed += self._drop(seg)
        return freed

    def _reclaim_dead(self) -> int:
        """Disk full: delete every segment without live records (lock held)."""
        freed = self._drop_dead(list(self._segments.values()))
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
            if self._reserve is not None:
                self._reserve.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


_Item = tuple[bytes, bytes | None, int, memoryview | bytes, int, int]
"""A record to write: scoped key, parent (block key alone), flags, payload,
raw length, checksum (a tombstone's: its origin segment, 0 for a fresh one)."""


def _tombstone(key: bytes, origin: int = 0) -> _Item:
    return (key, None, FLAG_TOMBSTONE, b"", 0, origin)


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
