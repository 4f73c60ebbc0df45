"""The transfer engine interface: register memory, describe it, move batches.

A process registers the buffers a peer may read or write and ships their
``RegionDesc`` (plain data) to the peer by any means (gRPC, a file, a pipe).
Registering exposes nothing: the owner ``grant``s a peer one byte range of a
region, for reading or for writing, and ships the grant's ``RegionDesc``
(plain data, with the grant's secret key) to that peer by any means (gRPC, a
file, a pipe); ``revoke`` ends it. The peer builds ``Transfer``s from its own
registered regions and those descriptors, submits them as one batch and
waits; each transfer gets its own status. Backends differ only in how bytes
cross (``_execute``); validation, grouping by peer, failure reporting and
the worker pool live here once.
"""

from __future__ import annotations

import functools
import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kvstore.errors import (
    ClosedError,
    PeerError,
    RegionError,
    TransferError,
    TransferTimeoutError,
)
from transfer.config import TransferConfig
from transfer.memory import ShmLocation, alloc_anonymous, byte_view
from transfer.protocol import MAX_ENTRIES, Op, Status
from transfer.regions import RegionTable


@dataclass(frozen=True)
class RegionDesc:
    """What a peer needs to address one grant: where, which, how big, and
    the key that proves it was given the grant. Plain, serialisable data;
    the key is a secret (send it only to the peer the grant is for)."""

    endpoint: str  # "<backend>://...": where the owner's engine listens
    region_id: int  # the grant's id on the owner
    nbytes: int
    key: str = ""  # 32 hex digits
    shm_name: str = ""  # shm backend: the /dev/shm file holding the bytes
    shm_offset: int = 0  # of the grant's first byte in that file

    def to_dict(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "region_id": self.region_id,
            "nbytes": self.nbytes,
            "key": self.key,
            "shm_name": self.shm_name,
            "shm_offset": self.shm_offset,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RegionDesc:
        try:
            desc = cls(
                endpoint=str(d["endpoint"]),
                region_id=int(d["region_id"]),
                nbytes=int(d["nbytes"]),
                key=str(d.get("key", "")),
                shm_name=str(d.get("shm_name", "")),
                shm_offset=int(d.get("shm_offset", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RegionError(f"malformed region descriptor {d!r}: {e}") from None
        if "://" not in desc.endpoint or min(desc.region_id, desc.nbytes, desc.shm_offset) < 0:
            raise RegionError(f"malformed region descriptor {d!r}")
        if desc.region_id >= 1 << 32:
            raise RegionError(f"grant id {desc.region_id} does not fit the wire's u32")
        try:
            key_ok = len(bytes.fromhex(desc.key)) == 16
        except ValueError:
            key_ok = False
        if not key_ok:
            raise RegionError("a region descriptor needs its grant's 128-bit key (32 hex digits)")
        if "/" in desc.shm_name or desc.shm_name in (".", ".."):
            raise RegionError(f"shm name {desc.shm_name!r} must be a bare file name")
        return desc

    @functools.cached_property
    def key_words(self) -> tuple[int, int]:
        """The key as the wire's two little-endian u64s."""
        raw = bytes.fromhex(self.key) if self.key else bytes(16)
        return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")

    @property
    def backend(self) -> str:
        return self.endpoint.split("://", 1)[0]


@dataclass(frozen=True, eq=False)
class Region:
    """A buffer registered with a local engine: usable as the local side of
    a transfer; peers reach it only through ``TransferEngine.grant``."""

    id: int
    view: np.ndarray  # flat uint8 view of the caller's memory
    shm: ShmLocation | None = None  # where same-host peers can map it (shm backend)

    @property
    def nbytes(self) -> int:
        return int(self.view.nbytes)


@dataclass(frozen=True, slots=True)
class Transfer:
    """Move ``length`` bytes between ``local`` and a peer's region.

    READ copies remote -> local, WRITE copies local -> remote.
    """

    op: Op
    local: Region
    remote: RegionDesc
    length: int
    local_offset: int = 0
    remote_offset: int = 0


@dataclass(frozen=True)
class BatchResult:
    """Per-transfer outcome of a batch, in submission order."""

    statuses: tuple[Status, ...]
    errors: dict[int, TransferError] = field(default_factory=dict)  # index -> why it failed
    nbytes: int = 0  # bytes of the transfers that succeeded

    @property
    def ok(self) -> bool:
        return not self.errors

    def failed(self) -> list[int]:
        return sorted(self.errors)

    def raise_for_status(self) -> BatchResult:
        """Raise the typed error of the first failed transfer; return self if none."""
        for i in self.failed():
            err = self.errors[i]
            err.add_note(f"first failure: transfer {i} of {len(self.statuses)}")
            raise err
        return self


_STATUS = list(Status)  # code -> member, without the enum lookup per transfer


class Batch:
    """A submitted batch: poll ``done`` or block in ``wait``."""

    def __init__(self, n: int, groups: list[tuple[list[int], Future[GroupResult]]]) -> None:
        self._n = n
        self._groups = groups

    def done(self) -> bool:
        return all(f.done() for _, f in self._groups)

    def wait(self, timeout: float | None = None) -> BatchResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        statuses = [Status.NOT_RUN] * self._n
        errors: dict[int, TransferError] = {}
        nbytes = 0
        for idxs, fut in self._groups:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                codes, error, moved = fut.result(left)
            except FutureTimeout:
                raise TransferTimeoutError("batch", f"not done after {timeout} s") from None
            nbytes += moved
            for i, code in zip(idxs, codes.tolist(), strict=True):
                statuses[i] = _STATUS[code]
                if code:
                    errors[i] = error or TransferError(statuses[i].name)
        return BatchResult(tuple(statuses), errors, nbytes)


def coalesce(items: Sequence[Transfer]) -> tuple[list[Transfer], list[int]]:
    """Runs of transfers that continue each other (same op, same local region
    and remote grant, both offsets adjacent) as one transfer each, and how
    many each stands for: a batch of small blocks laid out back to back on
    both sides (a staging buffer read into a fresh pool page) costs one wire
    entry, one descriptor and one copy, not one per block. A merged transfer
    fails or succeeds whole."""
    out: list[Transfer] = []
    counts: list[int] = []
    if not items:
        return out, counts
    head, length, k = items[0], items[0].length, 1
    for t in items[1:]:
        if (
            t.op is head.op
            and t.local is head.local
            and t.remote is head.remote
            and t.local_offset == head.local_offset + length
            and t.remote_offset == head.remote_offset + length
        ):
            length += t.length
            k += 1
            continue
        out.append(head if k == 1 else _longer(head, length))
        counts.append(k)
        head, length, k = t, t.length, 1
    out.append(head if k == 1 else _longer(head, length))
    counts.append(k)
    return out, counts


def _longer(t: Transfer, length: int) -> Transfer:
    return Transfer(t.op, t.local, t.remote, length, t.local_offset, t.remote_offset)


GroupResult = tuple[np.ndarray, TransferError | None, int]  # statuses, failure, bytes moved
# peer endpoint, batch indices, their transfers coalesced, how many each stands for
Group = tuple[str, list[int], Sequence[Transfer], list[int]]


class TransferEngine(ABC):
    """Register memory, serve it to peers, and run batches against theirs."""

    backend: ClassVar[str]
    endpoint: str  # what descriptors of this engine's regions name

    def __init__(self, config: TransferConfig) -> None:
        self.config = config
        self.regions = RegionTable()
        self._closed = False
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix=f"xfer-{self.backend}")

    # -- memory ---------------------------------------------------------------
    def register(self, buf: Any) -> Region:
        """Expose a contiguous CPU tensor, array or buffer (no copy) to peers."""
        self._check_open()
        view = byte_view(buf)
        loc = self._locate(view)
        rid = self.regions.add(view, buf, shared=loc is not None)
        return Region(rid, view, loc)

    def grant(
        self,
        region: Region,
        offset: int = 0,
        length: int | None = None,
        *,
        read: bool = False,
        write: bool = False,
        ttl: float | None = None,
    ) -> RegionDesc:
        """Let a peer read (``read``) or write (``write``) ``length`` bytes of
        ``region`` from ``offset``, until ``revoke`` or ``ttl`` seconds. The
        descriptor is the capability: whoever holds it may do just that."""
        self._check_open()
        if self.regions.get(region.id) is not region.view:
            raise RegionError(f"region {region.id} is not registered here")
        n = region.nbytes - offset if length is None else length
        ops = frozenset(op for op, on in ((Op.READ, read), (Op.WRITE, write)) if on)
        g = self.regions.grant(region.id, offset, n, ops, ttl)
        self._on_grant()
        name, at = (region.shm.name, region.shm.offset + offset) if region.shm else ("", 0)
        return RegionDesc(self.endpoint, g.id, n, g.key.hex(), name, at)

    def revoke(self, desc: RegionDesc) -> None:
        """End a grant this engine made (no-op if it already ended)."""
        if desc.endpoint == self.endpoint:
            self.regions.revoke(desc.region_id)

    def alloc(self, nbytes: int) -> Region:
        """Allocate page-aligned, pre-faulted memory the backend serves best, registered."""
        return self.register(alloc_anonymous(nbytes))

    def unregister(self, region: Region, timeout: float | None = None) -> None:
        """Withdraw a region; waits for transfers using it (up to the engine's timeout)."""
        self.regions.remove(region.id, self.config.timeout if timeout is None else timeout)

    # -- batches --------------------------------------------------------------
    def submit(self, transfers: Iterable[Transfer]) -> Batch:
        """Start a batch. Local mistakes raise here, before any byte moves."""
        items, groups = self._plan(transfers)
        return self._dispatch(len(items), groups)

    def transfer(self, transfers: Iterable[Transfer], timeout: float | None = None) -> BatchResult:
        """Submit, wait, and raise the first failure (as a typed error).

        A batch for a single peer runs in the calling thread (no pool hop:
        small reads are latency-bound); ``timeout`` then is the engine's.
        """
        items, groups = self._plan(transfers)
        if len(groups) == 1 and timeout is None:
            ep, idxs, sub, counts = groups[0]
            done: Future[GroupResult] = Future()
            done.set_result(self._run_group(ep, sub, counts))
            return Batch(len(items), [(idxs, done)]).wait().raise_for_status()
        return self._dispatch(len(items), groups).wait(timeout).raise_for_status()

    def _dispatch(self, n: int, groups: list[Group]) -> Batch:
        futures = [
            (idxs, self._pool.submit(self._run_group, ep, sub, counts))
            for ep, idxs, sub, counts in groups
        ]
        return Batch(n, futures)

    def _plan(self, transfers: Iterable[Transfer]) -> tuple[list[Transfer], list[Group]]:
        """Check every transfer locally, then group them by peer (in wire-sized parts)."""
        self._check_open()
        items = list(transfers)
        by_peer: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(items):
            by_peer[t.remote.endpoint].append(i)
        groups: list[Group] = []
        for endpoint, idxs in by_peer.items():
            merged, counts = coalesce([items[i] for i in idxs])
            at = 0
            for t, k in zip(merged, counts, strict=True):
                self._check_local(idxs[at], t)
                at += k
            at = 0
            for start in range(0, len(merged), MAX_ENTRIES):
                part_counts = counts[start : start + MAX_ENTRIES]
                n = sum(part_counts)
                groups.append(
                    (endpoint, idxs[at : at + n], merged[start : start + MAX_ENTRIES], part_counts)
                )
                at += n
        return items, groups

    def _check_local(self, i: int, t: Transfer) -> None:
        where = f"transfer {i}"
        if self.regions.get(t.local.id) is not t.local.view:
            raise RegionError(f"{where}: local region {t.local.id} is not registered here")
        if t.remote.backend != self.backend:
            raise RegionError(
                f"{where}: descriptor {t.remote.endpoint} belongs to the "
                f"{t.remote.backend} backend, this engine is {self.backend}"
            )
        if min(t.length, t.local_offset, t.remote_offset) < 0:
            raise RegionError(f"{where}: negative length or offset")
        if t.local_offset + t.length > t.local.nbytes:
            raise RegionError(
                f"{where}: local bytes [{t.local_offset}, {t.local_offset + t.length}) "
                f"outside region {t.local.id} of {t.local.nbytes} bytes"
            )
        if t.remote_offset + t.length > t.remote.nbytes:
            raise RegionError(
                f"{where}: remote bytes [{t.remote_offset}, {t.remote_offset + t.length}) "
                f"outside region {t.remote.region_id} of {t.remote.nbytes} bytes"
            )
        if t.op == Op.READ and not t.local.view.flags.writeable:
            raise RegionError(f"{where}: cannot read into read-only local region {t.local.id}")

    def _run_group(
        self, endpoint: str, items: Sequence[Transfer], counts: list[int]
    ) -> GroupResult:
        """Run one group (``counts[j]``: how many of the batch's transfers
        ``items[j]`` stands for); statuses come back one per batch transfer."""
        try:
            codes = self._execute(endpoint, items)
            if len(counts) < sum(counts):
                codes = np.repeat(codes, counts)
        except TransferTimeoutError as e:
            return np.full(sum(counts), Status.TIMED_OUT, np.uint8), e, 0
        except PeerError as e:
            return np.full(sum(counts), Status.PEER_FAILED, np.uint8), e, 0
        except OSError as e:
            err = PeerError(endpoint, f"{type(e).__name__}: {e}")
            return np.full(sum(counts), Status.PEER_FAILED, np.uint8), err, 0
        if not codes.any():
            return codes, None, sum(t.length for t in items)
        firsts = np.cumsum([0, *counts[:-1]])
        moved = sum(t.length for t, c in zip(items, codes[firsts].tolist(), strict=True) if c == 0)
        bad = ", ".join(sorted({Status(c).name.lower() for c in codes.tolist() if c}))
        return codes, RegionError(str(PeerError(endpoint, f"refused transfers: {bad}"))), moved

    # -- backend hooks ----------------------------------------------------------
    def _on_grant(self) -> None:
        """A grant was made: a peer may soon come for it (ucx wakes its accept loop)."""
        return

    def _locate(self, view: np.ndarray) -> ShmLocation | None:
        """Where peers on this host can map ``view`` (the shm backend overrides)."""
        return None

    @abstractmethod
    def _execute(self, endpoint: str, items: Sequence[Transfer]) -> np.ndarray:
        """Run transfers that all go to one peer; return one ``Status`` code each.

        Raise ``PeerError`` (or ``TransferTimeoutError``) when the peer cannot
        confirm the group; the base marks every transfer in it failed.
        """

    # -- lifetime ---------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self.backend} transfer engine is closed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._shutdown()

    @abstractmethod
    def _shutdown(self) -> None:
        """Stop listeners and drop connections."""

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
