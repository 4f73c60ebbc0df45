"""Payload checksums: XXH3-64, ~16 GB/s here (zlib's crc32 manages ~3.5 GB/s).

Integrity against bit rot and torn writes, not against an adversary: keys, which
tenants choose through their tokens, use SHA-256 instead (see keys.py).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence

import numpy as np
import torch
import xxhash

from kvstore.buffers import BytesLike


def checksum(data: BytesLike | torch.Tensor) -> int:
    """Checksum of a contiguous buffer (a uint8 view of a tensor is hashed in place)."""
    if isinstance(data, torch.Tensor):
        data = (data if data.dtype == torch.uint8 else data.view(torch.uint8)).numpy().data
    elif isinstance(data, np.ndarray):
        data = data.data
    return int(xxhash.xxh3_64_intdigest(data))


def checksums(data: torch.Tensor, sizes: Sequence[int]) -> list[int]:
    """Checksums of the consecutive spans of ``sizes`` bytes of one flat
    uint8 tensor."""
    spans, at = [], 0
    for n in sizes:
        spans.append((data, at, n))
        at += n
    return checksum_extents(spans)


def checksum_extents(extents: Iterable[tuple[torch.Tensor, int, int]]) -> list[int]:
    """Checksums of ``(flat uint8 CPU tensor, offset, nbytes)`` extents: one
    buffer view per tensor, then a slice per extent (a tensor or an array
    per block costs more than hashing 16 KiB)."""
    views: dict[int, memoryview] = {}
    digest = xxhash.xxh3_64_intdigest
    out = []
    for t, at, n in extents:
        mv = views.get(id(t))
        if mv is None:
            mv = views[id(t)] = t.numpy().data
        out.append(int(digest(mv[at : at + n])))
    return out


class ArrivalDigests:
    """Checksums of blocks taken as their bytes arrive, for
    ``transfer.sockets.recv_into_all``'s ``progress``: each block is hashed
    between two receive calls, on a core that would otherwise wait for the
    sender (over loopback the sender's copy is the slower half)."""

    def __init__(self, blocks: Sequence[np.ndarray], skip: Container[int] = ()) -> None:
        """``blocks``: where each block lands, in arrival order; those in
        ``skip`` are not wanted (their bytes are read past), their digest 0."""
        self._blocks = blocks
        self._skip = skip
        self._ends = np.cumsum([b.nbytes for b in blocks]).tolist()
        self.digests: list[int] = []

    def __call__(self, received: int) -> None:
        digest, out, ends = xxhash.xxh3_64_intdigest, self.digests, self._ends
        i = len(out)
        while i < len(ends) and ends[i] <= received:
            out.append(0 if i in self._skip else int(digest(self._blocks[i].data)))
            i += 1
