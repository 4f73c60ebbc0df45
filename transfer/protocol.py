"""The wire format every remote backend speaks (tcp data, shm control, ucx control).

A request is a header and an array of fixed 40-byte entries; the reply is a
header and the same array with each entry's status filled in. Entries are a
numpy structured array, so a batch of thousands encodes and decodes without
a Python object per transfer.

    header  = magic "KVTE" | version u16 | kind u16 | count u32 | tag u32
    entry   = op u8 | status u8 | pad u16 | grant u32 | offset u64 | length u64 | key 2 x u64

An entry names a *grant* (see ``transfer.regions``), not a region: the owner
serves only byte ranges it granted, to whoever presents the grant's 128-bit
key, and ``offset`` counts from the grant's first byte.
"""

from __future__ import annotations

import enum
import struct

import numpy as np

MAGIC = b"KVTE"
VERSION = 2
HEADER = struct.Struct("<4sHHII")
ENTRY = np.dtype(
    [
        ("op", "u1"),
        ("status", "u1"),
        ("pad", "<u2"),
        ("region", "<u4"),
        ("offset", "<u8"),
        ("length", "<u8"),
        ("key0", "<u8"),
        ("key1", "<u8"),
    ]
)
assert ENTRY.itemsize == 40
MAX_ENTRIES = 1 << 16  # per request; engines cut larger batches into several
MAX_DISCARD = 256 << 20  # refused write payloads up to this are drained, larger ones drop the link


class Op(enum.IntEnum):
    READ = 1  # remote region -> local region
    WRITE = 2  # local region -> remote region


class Kind(enum.IntEnum):
    REQUEST = 1  # entries, then write payloads; reply: statuses, then read payloads
    LEASE = 2  # shm: check and pin entries; reply: statuses
    RELEASE = 3  # shm: the copies are done; reply: empty
    REPLY = 4
    HELLO = 5  # ucx: count is the length of the initiator's worker address, which follows


class Status(enum.IntEnum):
    OK = 0
    UNKNOWN_REGION = 1  # no live grant by that id and key (never, revoked, expired, wrong key)
    OUT_OF_BOUNDS = 2
    READ_ONLY = 3  # a write into a read-only buffer (bytes)
    NOT_SHARED = 4  # shm: the region is not in shared memory
    BAD_REQUEST = 5
    PEER_FAILED = 6  # the link broke before the peer confirmed
    TIMED_OUT = 7
    NOT_RUN = 8  # the batch was abandoned before this transfer started
    FORBIDDEN = 9  # the grant does not allow this direction (a write into a read grant)


class ProtocolError(Exception):
    """Bytes on the wire that are not this protocol; the link is dropped."""


def pack_header(kind: Kind, count: int, tag: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, count, tag)


def unpack_header(
    raw: bytes | bytearray | memoryview, expect: Kind | None = None
) -> tuple[Kind, int, int]:
    magic, version, kind, count, tag = HEADER.unpack(raw)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"bad frame header (magic {bytes(magic)!r}, version {version})")
    if kind not in Kind.__members__.values() or (expect is not None and kind != expect):
        raise ProtocolError(f"unexpected frame kind {kind}")
    if count > MAX_ENTRIES:
        raise ProtocolError(f"{count} entries in one frame; the limit is {MAX_ENTRIES}")
    return Kind(kind), count, tag


def new_entries(count: int) -> np.ndarray:
    return np.zeros(count, dtype=ENTRY)
