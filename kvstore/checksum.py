"""Payload checksums: XXH3-64, ~16 GB/s here (zlib's crc32 manages ~3.5 GB/s).

Integrity against bit rot and torn writes, not against an adversary: keys, which
tenants choose through their tokens, use SHA-256 instead (see keys.py).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Container, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

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
    per block costs more than hashing 16 KiB). A batch of ``PARALLEL_MIN``
    bytes or more is hashed on every core (XXH3 lets go of the GIL): the
    hash runs while the peer waits, so a second core halves a wait."""
    views: dict[int, memoryview] = {}
    spans, total = [], 0
    for t, at, n in extents:
        mv = views.get(id(t))
        if mv is None:
            mv = views[id(t)] = t.numpy().data
        spans.append(mv[at : at + n])
        total += n
    if total >= PARALLEL_MIN and len(spans) > 1 and _CORES > 1:
        return _hash_parallel(spans, total)
    return _hash(spans)


PARALLEL_MIN = 8 << 20
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_workers: ThreadPoolExecutor | None = None
_workers_lock = threading.Lock()


def _forget_workers() -> None:
    """A forked child has none of its parent's threads: it starts its own."""
    global _workers, _workers_lock
    _workers, _workers_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def _hash(spans: Sequence[memoryview]) -> list[int]:
    digest = xxhash.xxh3_64_intdigest
    return [int(digest(s)) for s in spans]


def _hash_parallel(spans: list[memoryview], total: int) -> list[int]:
    """``spans`` cut into one run of about equal bytes per core, the first
    hashed here, the others on the shared workers."""
    global _workers
    with _workers_lock:
        if _workers is None:
            _workers = ThreadPoolExecutor(_CORES - 1, thread_name_prefix="kvstore-xxh3")
    share, cuts, used = total / _CORES, [0], 0
    for i, s in enumerate(spans):
        used += len(s)
        if used >= share * len(cuts) and len(cuts) < _CORES and i + 1 < len(spans):
            cuts.append(i + 1)
    cuts.append(len(spans))
    runs = [spans[a:b] for a, b in itertools.pairwise(cuts)]
    others = [_workers.submit(_hash, run) for run in runs[1:]]
    out = _hash(runs[0])
    for f in others:
        out += f.result()
    return out


class ArrivalDigests:
    """Checksums of blocks taken as their bytes arrive, for
    ``transfer.sockets.recv_into_all``'s ``progress``: each block is hashed
    between two receive calls, on a core that would otherwise wait for the
    sender (over loopback the sender's copy is the slower half)."""

    def __init__(
        self,
        buffers: Sequence[np.ndarray],
        sizes: Sequence[int] | None = None,
        skip: Container[int] = (),
    ) -> None:
        """``buffers``: where the blocks land, in arrival order, each holding
        whole blocks of ``sizes`` bytes (by default, one block each: a run
        of adjacent blocks is one buffer, and costs no view per block until
        it is hashed); blocks in ``skip`` are not wanted (their bytes are
        read past), their digest 0."""
        if sizes is None:
            sizes = [b.nbytes for b in buffers]
        self._sizes = sizes
        self._ends = np.cumsum(sizes).tolist()
        self._skip = skip
        self._bufs = [b.data.cast("B") for b in buffers]
        self._buf = 0  # the buffer holding the next block to hash, and where in it
        self._at = 0
        self.digests: list[int] = []

    def __call__(self, received: int) -> None:
        digest, out, ends = xxhash.xxh3_64_intdigest, self.digests, self._ends
        i = len(out)
        while i < len(ends) and ends[i] <= received:
            n, mv = self._sizes[i], self._bufs[self._buf]
            if i not in self._skip:
                out.append(int(digest(mv[self._at : self._at + n])))
            else:
                out.append(0)
            self._at += n
            if self._at == len(mv):
                self._buf, self._at = self._buf + 1, 0
            i += 1
