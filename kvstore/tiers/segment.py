"""The SSD tier's on-disk record format, and the scan that rebuilds the index.

A segment file is a sequence of records. Each record is a 128-byte header,
zero padding up to its payload, the payload, and zero padding to the next
64-byte boundary. Payloads of 64 KiB and more start on a 4 KiB boundary so
reads into page-aligned pool memory copy at full speed. Header (little-endian)::

    u32 magic 'KVB2' | u8 version | u8 flags | u16 reserved
    u32 stored_len | u32 raw_len | 16s key | 16s parent (zeros: none)
    u64 checksum (XXH3-64 of the raw payload) | u32 namespace tag
    52 zero bytes | 16-byte MAC of the 112 bytes before it

The MAC is keyed BLAKE2b under a secret of the store's own (``SECRET`` in the
data dir, made at first start, mode 0600, never sent anywhere). Payloads are
bytes a client chose, and a payload can hold something shaped like a header:
after a torn write or a damaged header the scan searches forward for the next
header, and without the key a forged one inside a payload is just bytes. So
a header must carry the magic and a MAC made with this store's secret, and
its payload must lie inside the file. After a bad header the scan
resynchronises at the next 64-byte boundary that holds a valid header, so one
damaged record costs only itself. Payload checksums are checked on every
read, not during the scan.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvstore.errors import StorageError
from kvstore.keys import ScopedKey, scoped

MAGIC = 0x3242564B  # b"KVB2" little-endian
VERSION = 2
FLAG_LZ4 = 1
FLAG_TOMBSTONE = 2
FLAG_PARENT = 4

HEADER = struct.Struct("<IBBHII16s16sQI")
HEADER_BYTES = 128
MAC_BYTES = 16
_MACED = HEADER_BYTES - MAC_BYTES  # the fields, then zeros
SECRET_FILE = "SECRET"
SECRET_BYTES = 32
_PERSON = b"kvstore-seg-v2"
RECORD_ALIGN = 64
PAYLOAD_PAGE_ALIGN_FROM = 64 * 1024
MAX_PAYLOAD = (1 << 32) - 1
_NO_PARENT = bytes(16)
_SCAN_CHUNK = 1 << 20

assert HEADER.size <= _MACED


def _mac(body: bytes, secret: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=MAC_BYTES, key=secret, person=_PERSON).digest()


def load_secret(data_dir: Path, *, create: bool = False) -> bytes:
    """The store's header key from ``data_dir/SECRET`` (made, 0600, with ``create``)."""
    path = data_dir / SECRET_FILE
    flags = os.O_RDONLY | os.O_NOFOLLOW
    try:
        if create:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                pass
            else:
                try:
                    os.write(fd, os.urandom(SECRET_BYTES))
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fd = os.open(path, flags)
    except OSError as e:
        why = "is a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise StorageError(path, f"cannot read the store's header key: {why}") from None
    try:
        secret = os.read(fd, SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(secret) != SECRET_BYTES:
        raise StorageError(
            path,
            f"holds {len(secret)} bytes, not a {SECRET_BYTES}-byte key: the file is damaged "
            "(move the data dir aside to start empty)",
        )
    return secret


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def payload_offset(header_offset: int, stored_len: int) -> int:
    align = 4096 if stored_len >= PAYLOAD_PAGE_ALIGN_FROM else RECORD_ALIGN
    return _align(header_offset + HEADER_BYTES, align)


def record_end(header_offset: int, stored_len: int) -> int:
    """Where the next record's header goes."""
    return _align(payload_offset(header_offset, stored_len) + stored_len, RECORD_ALIGN)


@dataclass(frozen=True, slots=True)
class Record:
    key: bytes
    parent: bytes | None
    flags: int
    stored_len: int
    raw_len: int
    checksum: int
    ns_tag: int
    offset: int  # of the header

    @property
    def scoped(self) -> ScopedKey:
        """The key inside its namespace, as the tiers index it."""
        return scoped(self.ns_tag, self.key)

    @property
    def scoped_parent(self) -> ScopedKey | None:
        return None if self.parent is None else scoped(self.ns_tag, self.parent)

    @property
    def payload_offset(self) -> int:
        return payload_offset(self.offset, self.stored_len)

    @property
    def end(self) -> int:
        return record_end(self.offset, self.stored_len)

    @property
    def nbytes(self) -> int:
        """Bytes the record occupies on disk, padding included."""
        return self.end - self.offset

    @property
    def tombstone(self) -> bool:
        return bool(self.flags & FLAG_TOMBSTONE)


def pack_header(rec: Record, secret: bytes) -> bytes:
    """``rec``'s header, MAC included (its offset is not part of it)."""
    flags = rec.flags | (FLAG_PARENT if rec.parent is not None else 0)
    body = HEADER.pack(
        MAGIC,
        VERSION,
        flags,
        0,
        rec.stored_len,
        rec.raw_len,
        rec.key,
        rec.parent if rec.parent is not None else _NO_PARENT,
        rec.checksum,
        rec.ns_tag,
    ).ljust(_MACED, b"\0")
    return body + _mac(body, secret)


def unpack_header(buf: bytes | memoryview, offset: int, secret: bytes) -> Record | None:
    """The record whose header is ``buf[:HEADER_BYTES]``, or None if it is not
    a header this store wrote."""
    if len(buf) < HEADER_BYTES:
        return None
    body = bytes(buf[:_MACED])
    if not hmac.compare_digest(_mac(body, secret), bytes(buf[_MACED:HEADER_BYTES])):
        return None
    magic, version, flags, _, stored_len, raw_len, key, parent, checksum, ns_tag = (
        HEADER.unpack_from(body)
    )
    if magic != MAGIC or version != VERSION:
        return None
    return Record(
        key=key,
        parent=parent if flags & FLAG_PARENT else None,
        flags=flags,
        stored_len=stored_len,
        raw_len=raw_len,
        checksum=checksum,
        ns_tag=ns_tag,
        offset=offset,
    )


@dataclass
class ScanReport:
    records: int = 0
    skipped_bytes: int = 0  # bytes of damaged or torn records passed over
    end: int = 0  # end of the last valid record


def scan(fd: int, size: int, report: ScanReport, secret: bytes) -> Iterator[Record]:
    """Yield every valid record of a segment file in order, skipping damage."""
    pos = 0
    while pos + HEADER_BYTES <= size:
        rec = unpack_header(os.pread(fd, HEADER_BYTES, pos), pos, secret)
        if rec is not None and rec.payload_offset + rec.stored_len <= size:
            report.records += 1
            report.end = rec.end
            yield rec
            pos = rec.end
            continue
        nxt = _resync(fd, pos + RECORD_ALIGN, size, secret)
        report.skipped_bytes += nxt - pos
        pos = nxt
    if pos < size:
        report.skipped_bytes += size - pos


def _resync(fd: int, pos: int, size: int, secret: bytes) -> int:
    """The next 64-byte-aligned offset at or after ``pos`` holding a valid header."""
    magic = struct.pack("<I", MAGIC)
    while pos + HEADER_BYTES <= size:
        chunk = os.pread(fd, min(_SCAN_CHUNK, size - pos), pos)
        i = chunk.find(magic)
        while i >= 0:
            if i % RECORD_ALIGN == 0:
                cand = pos + i
                rec = unpack_header(os.pread(fd, HEADER_BYTES, cand), cand, secret)
                if rec is not None and rec.payload_offset + rec.stored_len <= size:
                    return cand
            i = chunk.find(magic, i + 1)
        pos += max(RECORD_ALIGN, len(chunk) - len(chunk) % RECORD_ALIGN)
    return size
