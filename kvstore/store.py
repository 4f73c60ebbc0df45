"""The tiered block store: placement, leases, demotion and promotion.

Blocks are opaque payloads under 16-byte keys, each knowing its parent (the
block before it in its prompt). Every index holds keys scoped by their
namespace (``kvstore.keys.scoped``): a key one tenant sends never reaches,
reveals or blocks another tenant's block. Where the node has an HBM tier, an in-process
write lands there first; a full HBM moves its eviction victims down to DRAM
(one device-to-host copy each). Otherwise a write lands in DRAM when DRAM has
room (after dropping clean copies already on SSD), else straight on SSD. A
background thread demotes DRAM's eviction victims to SSD once DRAM passes its
high watermark, down to the low one. A read from SSD lands in the caller's
buffer and, when DRAM has room below the high watermark, is promoted.

Correctness rules, all under one lock for metadata while bytes move outside it:

- a block is published only after its bytes are copied and checksummed, so a
  put is all-or-nothing per block and readers never see a partial one;
- a reader pins the memory (HBM or DRAM) extent it copies from; pinned
  extents are never freed, evicted, moved or reused (a delete during the read
  frees it at unpin);
- SSD reads verify the checksum in the reader's buffer; a mismatch is a miss.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Container, Sequence
from dataclasses import dataclass, field

import torch

from kvstore.buffers import (
    Payload,
    as_tensor,
    contiguous_bytes,
    copy_bytes,
    flat_bytes,
    nbytes_of,
)
from kvstore.checksum import checksum
from kvstore.config import StoreConfig
from kvstore.directory import Entry
from kvstore.errors import (
    ChecksumMismatchError,
    ClosedError,
    InvalidArgumentError,
    PayloadSizeError,
    StorageError,
    StoreFullError,
)
from kvstore.eviction import EvictionPolicy, make_admission, make_policy
from kvstore.keys import KEY_BYTES, BlockKey, Namespace, ScopedKey, check_per_key, scoped
from kvstore.stats import Counters, NamespaceStats, StoreStats, TierStats
from kvstore.tiers.base import MemoryTier
from kvstore.tiers.dram import DramTier
from kvstore.tiers.hbm import HbmTier
from kvstore.tiers.segment import FLAG_LZ4, MAX_PAYLOAD
from kvstore.tiers.ssd import SsdTier
from transfer.memory import alloc_anonymous

log = logging.getLogger(__name__)

DEMOTE_BATCH = 64  # blocks chosen per pass, so the lock is retaken often
DECLINED = -1  # _reserve_dram: admission kept a put's tail out of a full DRAM


@dataclass(slots=True, eq=False)
class _Block:
    parent: BlockKey | None
    nbytes: int
    digest: int
    ns_tag: int
    compress: bool
    dram: int | None = None  # pool offset while resident in DRAM
    hbm: int | None = None  # pool offset while resident in HBM (never with dram)
    on_ssd: bool = False
    pins: int = 0  # readers (and the demoter) copying from the memory extent
    dead: bool = False  # deleted or dropped; memory is freed at the last unpin
    promoting: bool = False


@dataclass(slots=True)
class BlockWrite:
    """One block a put will store: fill ``target`` (a DRAM or, for an
    in-process put, an HBM extent), or, where it is None, hand ``commit_put``
    a buffer of your own (it goes to SSD)."""

    index: int  # position in the batch
    key: BlockKey
    nbytes: int
    dram: int | None  # reserved DRAM pool offset
    target: torch.Tensor | None
    hbm: int | None = None  # reserved HBM pool offset (then dram is None)
    parent: BlockKey | None = None

    @property
    def to_ssd(self) -> bool:
        return self.dram is None and self.hbm is None


@dataclass(slots=True)
class BlockRead:
    """One pinned block of a read; ``ok`` once its bytes were delivered."""

    index: int
    key: BlockKey
    block: _Block
    promote: int | None = None  # reserved pool offset for an SSD hit
    tier: str = "ssd"  # where the bytes come from: "hbm" and "dram" are pinned
    ok: bool = False
    damaged: bool = False  # its DRAM copy failed verify_dram_reads

    @property
    def pinned(self) -> bool:
        return self.tier != "ssd"

    @property
    def nbytes(self) -> int:
        return self.block.nbytes

    @property
    def checksum(self) -> int:
        return self.block.digest


@dataclass
class PutPlan:
    """The reservations of ``begin_put``, to commit or abort exactly once."""

    size: int  # keys in the batch
    parents: list[BlockKey | None] | None
    ns_tag: int
    compress: bool
    writes: list[BlockWrite] = field(default_factory=list)
    failure: StoreFullError | None = None  # where reserving stopped, if it did
    refused: int = 0  # blocks from that point on

    def parent(self, index: int) -> BlockKey | None:
        return None if self.parents is None else self.parents[index]


@dataclass
class ReadPlan:
    """The pinned blocks of ``begin_read``; ``end_read`` releases them."""

    size: int
    reads: list[BlockRead] = field(default_factory=list)

    def results(self) -> list[bool]:
        out = [False] * self.size
        for r in self.reads:
            out[r.index] = r.ok
        return out


class TieredStore:
    """Thread-safe. ``close()`` when no call is in flight."""

    def __init__(self, config: StoreConfig | None = None, *, hbm: HbmTier | None = None) -> None:
        """``hbm``: a tier to use instead of one built from ``config.hbm``."""
        self.config = config or StoreConfig()
        if hbm is None and self.config.hbm.enabled:
            hbm = HbmTier(self.config.hbm)
        self._hbm = hbm
        self._dram = DramTier(self.config.dram)
        try:
            self._ssd = SsdTier(self.config.ssd) if self.config.ssd.enabled else None
        except BaseException:
            self._dram.close()
            raise
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._blocks: dict[BlockKey, _Block] = {}
        # stored or pending blocks naming each key as their parent
        self._children: dict[BlockKey, int] = {}
        self._pending: set[BlockKey] = set()
        self._dram_policy = make_policy(self.config.eviction)
        self._hbm_policy = make_policy(self.config.eviction)
        self._ssd_policy = make_policy(self.config.eviction)
        self._admission = make_admission(self.config.admission)
        self._counters = Counters()
        self._names: dict[int, str] = {}
        self._block_sizes: dict[int, int] = {}  # namespace tag -> tokens per block
        self._detail = self.config.metrics.enabled
        self._removed: list[BlockKey] | None = None  # see track_removals
        self._closed = False
        self._demoting = 0
        self._high = int(self._dram.capacity * self.config.dram.high_watermark)
        self._low = int(self._dram.capacity * self.config.dram.low_watermark)
        self._thread: threading.Thread | None = None
        if self._ssd is not None:
            self._load_ssd_index(self._ssd)
            self._thread = threading.Thread(
                target=self._demoter, name="kvstore-demoter", daemon=True
            )
            self._thread.start()

    def _load_ssd_index(self, ssd: SsdTier) -> None:
        """Adopt the blocks a restarted SSD tier found, parents before children
        (so the policy sees chains), older before newer (so they leave first)."""
        records = {rec.scoped: rec for rec in ssd.records()}
        for key in records:
            chain: list[ScopedKey] = []
            k: ScopedKey | None = key
            while k is not None and k in records and k not in self._blocks and k not in chain:
                chain.append(k)
                k = records[k].scoped_parent
            for k in reversed(chain):
                rec = records[k]
                parent = rec.scoped_parent
                self._blocks[k] = _Block(
                    parent,
                    rec.raw_len,
                    rec.checksum,
                    rec.ns_tag,
                    bool(rec.flags & FLAG_LZ4),
                    on_ssd=True,
                )
                self._link(parent, +1)
                self._ssd_policy.insert(k, parent)
                self._counters.account(rec.ns_tag, rec.raw_len, +1)

    # -- public API ----------------------------------------------------------

    def put(
        self,
        keys: Sequence[BlockKey],
        payloads: Sequence[Payload],
        parents: Sequence[BlockKey | None] | None = None,
        *,
        ns_tag: int = 0,
        compress: bool | None = None,
    ) -> list[bool]:
        """Store blocks; True for each newly stored, False where the key existed
        (or, with no SSD tier, where the admission rule declined the batch's
        last block: see ``kvstore.eviction.admission``).

        Keys name content, so a key already present is left as it is. Stops at
        the first block no tier can take (StoreFullError, with ``stored`` set to
        how many leading blocks went in): later blocks of a chain are useless
        without it.
        """
        check_per_key(len(keys), payloads=payloads)
        srcs = [as_tensor(p) for p in payloads]
        plan = self.begin_put(
            keys, [nbytes_of(t) for t in srcs], parents, ns_tag=ns_tag, compress=compress, hbm=True
        )
        filled: list[torch.Tensor] = []
        try:
            for w in plan.writes:
                src = srcs[w.index]
                if w.target is not None:
                    copy_bytes(w.target, src)
                # bound for SSD: written straight from the caller's buffer; in
                # HBM: checksummed on the host copy (the same bytes)
                filled.append(src if w.target is None or w.hbm is not None else w.target)
        except BaseException:
            self.abort_put(plan)
            raise
        return self.commit_put(plan, filled)

    def begin_put(
        self,
        keys: Sequence[BlockKey],
        sizes: Sequence[int],
        parents: Sequence[BlockKey | None] | None = None,
        *,
        ns_tag: int = 0,
        compress: bool | None = None,
        hbm: bool = False,
    ) -> PutPlan:
        """Reserve room for the blocks not yet stored; the caller fills each
        write's ``target`` (a DRAM extent, or with ``hbm`` possibly an HBM one;
        None: bring your own buffer, it goes to SSD) and then calls
        ``commit_put`` or ``abort_put``.

        Two phases let a server land a remote client's bytes straight in the
        DRAM pool its transfer engine registered; ``put`` is the same two
        phases around one local copy, and only it may fill HBM.
        """
        check_per_key(len(keys), payloads=sizes, parents=parents)
        keys = self._scoped(keys, ns_tag)
        if parents is not None:
            parents = [None if p is None else scoped(ns_tag, p) for p in parents]
        for n in sizes:
            if not 0 < n <= MAX_PAYLOAD:
                raise InvalidArgumentError(f"block payload of {n} bytes; must be 1..{MAX_PAYLOAD}")
        if compress is None:
            compress = self.config.ssd.compression == "lz4"
        plan = PutPlan(len(keys), list(parents) if parents is not None else None, ns_tag, compress)
        # with no SSD to keep a copy, the batch's parents stay while it is placed:
        # dropping one would strand its children
        keep = frozenset(p for p in plan.parents or () if p is not None) if not self._ssd else ()
        with self._lock:
            self._check_open()
            for i, key in enumerate(keys):
                if key in self._blocks or key in self._pending:
                    self._counters.put_duplicates += 1
                    self._touch(key)
                    continue
                nbytes = sizes[i]
                on_hbm = self._reserve_hbm(nbytes) if hbm and self._hbm is not None else None
                offset = None
                if on_hbm is None:
                    tail = key if i == len(keys) - 1 else None
                    offset = self._reserve_dram(nbytes, keep, tail=tail)
                    if offset == DECLINED:
                        if self._ssd is None:
                            break  # the tail is not stored; see kvstore.eviction.admission
                        offset = None
                if (
                    on_hbm is None
                    and offset is None
                    and (self._ssd is None or nbytes > self._ssd.capacity)
                ):
                    why = "block is larger than the SSD tier"
                    if self._ssd is None:
                        why = "DRAM is full of pinned blocks and there is no SSD tier"
                    plan.failure = StoreFullError(nbytes, why)
                    plan.refused = len(keys) - i
                    break
                self._pending.add(key)
                target = None
                if on_hbm is not None:
                    assert self._hbm is not None
                    target = self._hbm.view(on_hbm, nbytes)
                elif offset is not None:
                    target = self._dram.view(offset, nbytes)
                plan.writes.append(
                    BlockWrite(i, key, nbytes, offset, target, on_hbm, plan.parent(i))
                )
                self._link(plan.parent(i), +1)  # from now on, see _make_ssd_room
        return plan

    def commit_put(
        self,
        plan: PutPlan,
        filled: Sequence[torch.Tensor],
        *,
        expect: Sequence[int] | None = None,
    ) -> list[bool]:
        """Checksum and publish the filled writes (``filled[j]`` holds write j's
        bytes: its target, or the caller's buffer where the target is None).

        ``expect`` gives the checksum each write must have (one per key of the
        batch, from a client that hashed before sending); any mismatch stores
        nothing and raises ``ChecksumMismatchError``.
        """
        if len(filled) != len(plan.writes):
            self.abort_put(plan)
            raise InvalidArgumentError(f"{len(plan.writes)} writes but {len(filled)} buffers")
        failure = plan.failure
        done: list[tuple[BlockWrite, int]] = []
        try:
            flats = [flat_bytes(t) for t in filled]
            digests = [checksum(f) for f in flats]
            if expect is not None:
                bad = [
                    w.index
                    for w, d in zip(plan.writes, digests, strict=True)
                    if d != expect[w.index]
                ]
                if bad:
                    raise ChecksumMismatchError(bad)
            for w, flat, digest in zip(plan.writes, flats, digests, strict=True):
                if w.to_ssd:
                    self._write_ssd(w.key, flat, digest, plan.parent(w.index), plan)
                done.append((w, digest))
        except StoreFullError as e:
            failure = e
        finally:
            results = [False] * plan.size
            with self._lock:
                for w, digest in done:
                    self._publish(w, plan.parent(w.index), digest, plan.ns_tag, plan.compress)
                    results[w.index] = True
                self._release(plan.writes[len(done) :])
                if self._dram.used_bytes > self._high:
                    self._wake.notify_all()
        if failure is not None:
            failure.stored = sum(results)
            with self._lock:
                self._counters.put_refused += plan.refused + len(plan.writes) - len(done)
            raise failure
        return results

    def abort_put(self, plan: PutPlan) -> None:
        """Give back every reservation of a plan that will not be committed."""
        with self._lock:
            self._release(plan.writes)

    def _release(self, writes: Sequence[BlockWrite]) -> None:
        for w in writes:
            self._link(w.parent, -1)
            self._pending.discard(w.key)
            if w.dram is not None:
                self._dram.free(w.dram)
                w.dram = None
            if w.hbm is not None:
                assert self._hbm is not None
                self._hbm.free(w.hbm)
                w.hbm = None

    def get_into(
        self,
        keys: Sequence[BlockKey],
        dsts: Sequence[Payload],
        *,
        prefix: bool = True,
        ns_tag: int | None = None,
    ) -> list[bool]:
        """Copy blocks into ``dsts``; True for each filled.

        With ``prefix`` the read stops at the first miss (a block is useless
        without those before it). A destination not filled has undefined bytes.
        Only blocks of namespace ``ns_tag`` (None: the default, 0) are hits.
        """
        check_per_key(len(keys), destinations=dsts)
        outs = [as_tensor(d, writable=True) for d in dsts]
        plan = self.begin_read(
            keys, prefix=prefix, ns_tag=ns_tag, sizes=[nbytes_of(t) for t in outs]
        )
        try:
            for r in plan.reads:
                r.ok = self._read_block(r, outs[r.index]) is not None
                if prefix and not r.ok:  # damaged: what follows it is of no use
                    break
        finally:
            self.end_read(plan)
        return plan.results()

    def begin_read(
        self,
        keys: Sequence[BlockKey],
        *,
        prefix: bool = True,
        ns_tag: int | None = None,
        sizes: Sequence[int] | None = None,
    ) -> ReadPlan:
        """Pin the blocks to read; ``read_block`` each, then always ``end_read``.

        ``sizes`` (the destinations' byte sizes) are checked before anything is
        pinned for long: a mismatch raises ``PayloadSizeError``.
        """
        check_per_key(len(keys), destination_sizes=sizes)
        keys = self._scoped(keys, ns_tag)
        plan = ReadPlan(len(keys))
        with self._lock:
            self._check_open()
            for i, key in enumerate(keys):
                b = self._blocks.get(key)
                if b is None:
                    if prefix:
                        break
                    continue
                if sizes is not None and sizes[i] != b.nbytes:
                    self._unpin_all(plan.reads)
                    raise PayloadSizeError(b.nbytes, sizes[i], what=f"destination {i}")
                r = BlockRead(i, key, b, tier=self._tier(b))
                if r.pinned:
                    b.pins += 1
                    self._policy(r.tier).touch(key)
                else:
                    self._ssd_policy.touch(key)
                    if self.config.promote_on_hit and not b.promoting:
                        r.promote = self._reserve_promotion(b.nbytes)
                        b.promoting = r.promote is not None
                plan.reads.append(r)
        return plan

    def read_block(self, r: BlockRead) -> torch.Tensor | None:
        """The bytes of one pinned block (valid until ``end_read``), or None if
        the SSD copy proved damaged. A DRAM or promoted block is a pool view."""
        out = self._read_block(r, None)
        r.ok = out is not None
        return out

    def end_read(self, plan: ReadPlan) -> None:
        with self._lock:
            self._finish_reads(plan.reads, requested=plan.size)

    def lookup(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> int:
        """How many leading keys are stored (in any tier)."""
        return len(self.locate(keys, ns_tag=ns_tag))

    def locate(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> list[str]:
        """The tier ("dram" or "ssd") of each leading stored key; counts as a lookup."""
        tiers: list[str] = []
        skeys = self._scoped(keys, ns_tag)
        with self._lock:
            self._check_open()
            for key in skeys:
                b = self._blocks.get(key)
                if b is None:
                    break
                tiers.append(self._tier(b))
            c = self._counters
            c.lookups += 1
            c.lookup_hit_blocks += len(tiers)
            c.lookup_miss_blocks += len(keys) - len(tiers)
            if ns_tag is not None and self._detail and ns_tag in self._block_sizes:
                c.lookup_tokens(ns_tag, tiers, len(keys), self._block_sizes[ns_tag])
        return tiers

    def exists(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> list[bool]:
        skeys = self._scoped(keys, ns_tag)
        with self._lock:
            self._check_open()
            return [k in self._blocks for k in skeys]

    def tier_of(self, key: BlockKey, *, ns_tag: int = 0) -> str | None:
        """Fastest tier holding ``key`` (for tests and operators), or None."""
        with self._lock:
            b = self._blocks.get(scoped(ns_tag, key))
            return None if b is None else self._tier(b)

    def entries(self, keys: Sequence[BlockKey] | None = None, *, ns_tag: int = 0) -> list[Entry]:
        """Directory entries of ``keys`` (of namespace ``ns_tag``) that are
        stored (None: of every block, in every namespace), for a cluster node
        to publish."""
        with self._lock:
            if keys is None:
                items = list(self._blocks.items())
            else:
                found = ((k, self._blocks.get(k)) for k in self._scoped(keys, ns_tag))
                items = [(k, b) for k, b in found if b is not None]
            return [Entry(k[4:], self._tier(b), b.nbytes, b.digest) for k, b in items]

    def track_removals(self) -> None:
        """Start recording the keys that leave the store (deleted or dropped
        under pressure), for ``take_removed``."""
        with self._lock:
            if self._removed is None:
                self._removed = []

    def take_removed(self) -> list[BlockKey]:
        """The keys removed since the last call (while tracking)."""
        with self._lock:
            out, self._removed = self._removed or [], [] if self._removed is not None else None
            return out

    def delete(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> int:
        """Remove blocks from every tier; returns how many existed.

        All or nothing: the SSD tombstones of the whole batch are written
        first, so a DiskFullError (even the delete reserve spent) leaves every
        block where it was.
        """
        skeys = self._scoped(keys, ns_tag)
        with self._lock:
            self._check_open()
            found = [(k, b) for k in dict.fromkeys(skeys) if (b := self._blocks.get(k)) is not None]
            if self._ssd is not None:
                self._ssd.remove(k for k, b in found if b.on_ssd)
            for k, b in found:
                b.on_ssd = False
                self._remove(k, b)
            self._counters.deletes += len(found)
        return len(found)

    def open_namespace(self, namespace: Namespace) -> None:
        """Remember a namespace's name for per-namespace stats."""
        with self._lock:
            self._names[namespace.tag] = namespace.name
            self._block_sizes[namespace.tag] = namespace.layout.block_size

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A page-aligned, pre-faulted uint8 buffer: the fastest kind to copy
        blocks into and out of (the same call on a remote store gives memory
        its transfer engine moves without a bounce)."""
        return torch.from_numpy(alloc_anonymous(nbytes))

    @property
    def dram_pool(self) -> torch.Tensor:
        """The whole DRAM pool as one uint8 tensor, for registering with a
        transfer engine so remote bytes land in it directly."""
        return self._dram.pool

    def stats(self) -> StoreStats:
        with self._lock:
            c = self._counters
            present = [
                (t.name, t.capacity, t.used_bytes, len(self._policy(t.name)))
                for t in (self._hbm, self._dram)
                if t is not None
            ]
            ssd = self._ssd
            if ssd is not None:
                present.append(("ssd", ssd.capacity, ssd.used_bytes, len(ssd)))
            tiers = [
                TierStats(name, cap, used, n, c.hits.get(name, 0), c.evictions.get(name, 0))
                for name, cap, used, n in present
            ]
            sc = ssd.counters if ssd is not None else None
            return StoreStats(
                tiers=tuple(tiers),
                blocks=len(self._blocks),
                puts=c.puts,
                put_duplicates=c.put_duplicates,
                put_bytes=c.put_bytes,
                hits=sum(c.hits.values()),
                misses=c.misses,
                get_bytes=c.get_bytes,
                lookups=c.lookups,
                lookup_hit_blocks=c.lookup_hit_blocks,
                lookup_miss_blocks=c.lookup_miss_blocks,
                demotions=c.demotions,
                promotions=c.promotions,
                dropped=c.dropped,
                demotion_failures=c.demotion_failures,
                deletes=c.deletes,
                checksum_failures=c.dram_checksum_failures + (sc.checksum_failures if sc else 0),
                ssd_read_errors=sc.read_errors if sc else 0,
                ssd_compactions=sc.compactions if sc else 0,
                ssd_reclaimed_bytes=sc.reclaimed_bytes if sc else 0,
                ssd_garbage_ratio=ssd.garbage_ratio() if ssd is not None else 0.0,
                lz4_ratio=(sc.lz4_raw_bytes / sc.lz4_stored_bytes)
                if sc and sc.lz4_stored_bytes
                else None,
                namespaces=tuple(
                    NamespaceStats(
                        tag,
                        self._names.get(tag, "?"),
                        c.ns_blocks.get(tag, 0),
                        c.ns_bytes.get(tag, 0),
                        *c.ns_lookups.get(tag, (0, 0, 0)),
                    )
                    for tag in sorted(set(c.ns_blocks) | set(c.ns_lookups))
                ),
                put_refused=c.put_refused,
                put_declined=c.put_declined,
                lookup_hit_tokens=dict(c.lookup_hit_tokens),
                lookup_miss_tokens=c.lookup_miss_tokens,
                shapes={
                    name: dict(zip(("lookups", "hit_tokens", "miss_tokens"), row, strict=True))
                    for name, row in c.shapes.items()
                },
            )

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until DRAM is at or below its high watermark and no demotion runs."""
        with self._wake:
            return self._wake.wait_for(
                lambda: (
                    self._closed
                    or self._ssd is None
                    or (self._demoting == 0 and self._dram.used_bytes <= self._high)
                ),
                timeout,
            )

    def compact(self, *, min_garbage_ratio: float | None = None) -> int:
        """Reclaim SSD space now; returns bytes reclaimed."""
        return self._ssd.compact(min_garbage_ratio=min_garbage_ratio) if self._ssd else 0

    def close(self) -> None:
        with self._wake:
            if self._closed:
                return
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._ssd is not None:
            if self.config.ssd.flush_on_close:
                self._flush_dram(self._ssd)
            self._ssd.close()
        self._dram.close()
        if self._hbm is not None:
            self._hbm.close()

    def _flush_dram(self, ssd: SsdTier) -> None:
        """Write memory-only blocks to SSD so a restart finds them (at close)."""
        with self._lock:
            dirty = [
                (k, b) for k, b in self._blocks.items() if self._tier(b) != "ssd" and not b.on_ssd
            ]
        for n, (key, b) in enumerate(dirty):
            with self._lock:
                self._make_ssd_room(b.nbytes)
            try:
                view = self._memory_view(b).cpu()  # HBM blocks through the host
                ssd.put(key, view, b.digest, parent=b.parent, compress=b.compress)
            except StorageError as e:
                log.warning("flush at close stopped after %d of %d blocks: %s", n, len(dirty), e)
                return
            b.on_ssd = True

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ----------------------------------------------------------------

    def _write_ssd(
        self, key: BlockKey, flat: torch.Tensor, digest: int, parent: BlockKey | None, plan: PutPlan
    ) -> None:
        """Write one block straight to SSD (no lock held)."""
        assert self._ssd is not None
        with self._lock:
            self._make_ssd_room(flat.numel())
        try:
            self._ssd.put(key, flat, digest, parent=parent, compress=plan.compress)
        except StorageError as e:
            raise StoreFullError(flat.numel(), f"DRAM full and SSD write failed: {e}") from e

    def _publish(
        self, w: BlockWrite, parent: BlockKey | None, digest: int, ns_tag: int, compress: bool
    ) -> None:
        nbytes = w.nbytes
        b = _Block(
            parent, nbytes, digest, ns_tag, compress, dram=w.dram, hbm=w.hbm, on_ssd=w.to_ssd
        )
        self._pending.discard(w.key)
        self._blocks[w.key] = b
        self._policy(self._tier(b)).insert(w.key, parent)
        self._counters.puts += 1
        self._counters.account(ns_tag, nbytes, +1)
        self._counters.put_bytes += nbytes

    def _reserve_dram(
        self, nbytes: int, keep: Container[BlockKey] = (), *, tail: BlockKey | None = None
    ) -> int | None:
        """A DRAM extent for a new block, dropping clean copies (or, with no SSD
        tier, any unpinned block not in ``keep``) to make room; DECLINED where
        ``tail`` (a put's last block) would need room and admission says no.
        Lock held."""
        if self._dram.chunk_size(nbytes) > self._dram.capacity:
            return None
        offset = self._dram.alloc(nbytes)
        if offset is None and tail is not None and not self._admission.admit(tail):
            self._counters.put_declined += 1
            return DECLINED
        while offset is None:
            key = self._dram_policy.victim(lambda k: k in keep or self._not_droppable_from_dram(k))
            if key is None:
                return None
            self._evict_dram(key, self._blocks[key])
            offset = self._dram.alloc(nbytes)
        return offset

    def _reserve_hbm(self, nbytes: int) -> int | None:
        """An HBM extent for a new block, moving unpinned victims down to DRAM
        (or dropping them where SSD has a copy) to make room. Lock held."""
        hbm = self._hbm
        assert hbm is not None
        if hbm.chunk_size(nbytes) > hbm.capacity:
            return None
        offset = hbm.alloc(nbytes)
        while offset is None:
            key = self._hbm_policy.victim(lambda k: self._blocks[k].pins > 0)
            if key is None or not self._demote_hbm(key, self._blocks[key]):
                return None
            offset = hbm.alloc(nbytes)
        return offset

    def _demote_hbm(self, key: BlockKey, b: _Block) -> bool:
        """Move an unpinned HBM block to DRAM (one device-to-host copy); False
        when DRAM has no room and no SSD copy makes dropping it safe. Lock held."""
        assert self._hbm is not None and b.hbm is not None and b.pins == 0
        dram = self._reserve_dram(b.nbytes)
        if dram is None and not b.on_ssd:
            return False
        if dram is not None:
            copy_bytes(self._dram.view(dram, b.nbytes), self._hbm.view(b.hbm, b.nbytes))
            b.dram = dram
            self._dram_policy.insert(key, b.parent)
        self._hbm_policy.remove(key)
        self._hbm.free(b.hbm)
        b.hbm = None
        self._counters.bump(self._counters.evictions, "hbm")
        return True

    def _not_droppable_from_dram(self, key: BlockKey) -> bool:
        b = self._blocks[key]
        return b.pins > 0 or (self._ssd is not None and not b.on_ssd)

    def _link(self, parent: BlockKey | None, delta: int) -> None:
        """Count a stored block under its parent (+1), or stop counting it (-1)."""
        if parent is None:
            return
        n = self._children.get(parent, 0) + delta
        if n:
            self._children[parent] = n
        else:
            del self._children[parent]

    def _reserve_promotion(self, nbytes: int) -> int | None:
        if self._dram.used_bytes + self._dram.chunk_size(nbytes) > self._high:
            return None
        return self._dram.alloc(nbytes)

    def _make_ssd_room(self, nbytes: int) -> None:
        """Drop SSD copies until a record of ``nbytes`` fits. Lock held."""
        assert self._ssd is not None
        need = self._ssd.record_bytes(nbytes)
        free = self._ssd.free_bytes
        victims: list[ScopedKey] = []
        while free < need:
            # a block whose only copy is here and whose child is in memory
            # stays: dropping it would leave the child unreachable
            key = self._ssd_policy.victim(
                lambda k: self._blocks[k].dram is None and k in self._children
            )
            if key is None:
                break  # the tier is empty of evictable blocks; the write may still fit
            b = self._blocks[key]
            self._ssd_policy.remove(key)
            free += self._ssd.footprint(key)
            victims.append(key)
            b.on_ssd = False
            self._counters.bump(self._counters.evictions, "ssd")
            if b.dram is None:
                self._remove(key, b)
                self._counters.dropped += 1
        self._ssd.evict(victims)

    # -- reads -----------------------------------------------------------------

    def _read_block(self, r: BlockRead, dst: torch.Tensor | None) -> torch.Tensor | None:
        """Fill ``dst`` with one block (no lock held), or with ``dst`` None return
        a tensor holding it; None when the SSD copy is damaged."""
        b = r.block
        if r.pinned:
            src = self._memory_view(b)
            if self.config.verify_dram_reads and r.tier == "dram" and checksum(src) != b.digest:
                log.warning("DRAM copy of a %d-byte block fails its checksum", b.nbytes)
                r.damaged = True
                return None
            if dst is None:  # a pool view; HBM bytes are copied to the host first
                return src if src.device.type == "cpu" else src.cpu()
            copy_bytes(dst, src)
            return dst
        assert self._ssd is not None
        flat = None if dst is None else contiguous_bytes(dst)
        if r.promote is not None:
            staging = self._dram.view(r.promote, b.nbytes)
        elif flat is not None:
            return dst if self._ssd.get_into(r.key, flat) else None
        else:
            staging = torch.empty(b.nbytes, dtype=torch.uint8)
        if not self._ssd.get_into(r.key, staging):
            return None
        if dst is None:
            return staging
        copy_bytes(dst, staging)
        return dst

    def _finish_reads(self, plan: list[BlockRead], *, requested: int) -> None:
        """Unpin, publish promotions, account hits and damage. Lock held."""
        c = self._counters
        for r in plan:
            b = r.block
            if r.pinned:
                self._unpin(b)
                if r.damaged and not b.dead:  # wrong bytes in memory: drop the block
                    c.dram_checksum_failures += 1
                    self._remove(r.key, b)
            else:
                b.promoting = False
                if r.promote is not None:
                    if r.ok and not b.dead and b.dram is None:
                        b.dram = r.promote
                        self._dram_policy.insert(r.key, b.parent)
                        c.promotions += 1
                    else:
                        self._dram.free(r.promote)
                ssd = self._ssd
                if not r.ok and not b.dead and b.on_ssd and ssd is not None and r.key not in ssd:
                    b.on_ssd = False  # the SSD tier found the record damaged and dropped it
                    self._ssd_policy.remove(r.key)
                    if b.dram is None:
                        self._remove(r.key, b)
            if r.ok:
                c.bump(c.hits, r.tier)
                c.get_bytes += b.nbytes
        c.misses += requested - sum(1 for r in plan if r.ok)
        if self._dram.used_bytes > self._high:
            self._wake.notify_all()

    def _unpin_all(self, plan: list[BlockRead]) -> None:
        for r in plan:
            if r.pinned:
                self._unpin(r.block)
            elif r.promote is not None:
                r.block.promoting = False
                self._dram.free(r.promote)

    def _unpin(self, b: _Block) -> None:
        b.pins -= 1
        if b.pins == 0 and b.dead:
            self._free_memory(b)

    def _free_memory(self, b: _Block) -> None:
        """Give back the block's memory extent, if it has one. Lock held."""
        if b.dram is not None:
            self._dram.free(b.dram)
            b.dram = None
        if b.hbm is not None:
            assert self._hbm is not None
            self._hbm.free(b.hbm)
            b.hbm = None

    # -- removal -----------------------------------------------------------------

    def _evict_dram(self, key: BlockKey, b: _Block) -> None:
        """Drop the DRAM copy of an unpinned block (clean, or no SSD tier). Lock held."""
        self._dram_policy.remove(key)
        assert b.dram is not None and b.pins == 0
        self._dram.free(b.dram)
        b.dram = None
        self._counters.bump(self._counters.evictions, "dram")
        if not b.on_ssd:
            self._remove(key, b)
            self._counters.dropped += 1

    def _remove(self, key: BlockKey, b: _Block) -> None:
        """Take a block out of the store entirely. Lock held."""
        del self._blocks[key]
        self._link(b.parent, -1)
        if self._removed is not None:
            self._removed.append(key[4:])
        self._counters.account(b.ns_tag, b.nbytes, -1)
        b.dead = True
        self._hbm_policy.remove(key)
        self._dram_policy.remove(key)
        self._ssd_policy.remove(key)
        if b.on_ssd and self._ssd is not None:
            self._ssd.remove([key])
            b.on_ssd = False
        if b.pins == 0:
            self._free_memory(b)

    # -- demotion ----------------------------------------------------------------

    def _demoter(self) -> None:
        stalled = False  # last pass freed nothing (every victim pinned): back off
        while True:
            with self._wake:
                if stalled:
                    self._wake.wait(0.05)
                else:
                    self._wake.wait_for(
                        lambda: self._closed or self._dram.used_bytes > self._high, 1.0
                    )
                if self._closed:
                    return
                before = self._dram.used_bytes
                batch = self._pick_demotions() if before > self._high else []
                stalled = before > self._high and not batch and self._dram.used_bytes == before
                self._demoting += 1
            try:
                for key, b in batch:
                    self._demote(key, b)
                ssd = self._ssd
                if (
                    not batch
                    and ssd
                    and ssd.garbage_ratio() >= self.config.ssd.compact_garbage_ratio
                ):
                    ssd.compact()
            except Exception:  # keep the thread alive; the failure is counted and logged
                log.exception("demotion pass failed")
            finally:
                with self._wake:
                    self._demoting -= 1
                    self._wake.notify_all()

    def _pick_demotions(self) -> list[tuple[BlockKey, _Block]]:
        """Choose victims down to the low watermark: clean copies are dropped
        now, dirty ones pinned and returned for writing to SSD. Lock held."""
        batch: list[tuple[BlockKey, _Block]] = []
        to_free = self._dram.used_bytes - self._low
        while to_free > 0 and len(batch) < DEMOTE_BATCH:
            key = self._dram_policy.victim(lambda k: self._blocks[k].pins > 0)
            if key is None:
                break
            b = self._blocks[key]
            assert b.dram is not None
            to_free -= self._dram.chunk_size(b.nbytes)
            if b.on_ssd:
                self._evict_dram(key, b)
            else:
                b.pins += 1
                batch.append((key, b))
        return batch

    def _demote(self, key: BlockKey, b: _Block) -> None:
        assert self._ssd is not None and b.dram is not None
        with self._lock:
            self._make_ssd_room(b.nbytes)
        try:
            self._ssd.put(
                key,
                self._dram.view(b.dram, b.nbytes),
                b.digest,
                parent=b.parent,
                compress=b.compress,
            )
            written = True
        except StorageError as e:
            log.warning("demotion of a %d-byte block failed: %s", b.nbytes, e)
            written = False
        with self._lock:
            if b.dead:
                if written and key not in self._blocks:
                    self._ssd.remove([key])
                self._unpin(b)
                return
            if written:
                b.on_ssd = True
                self._ssd_policy.insert(key, b.parent)
                self._counters.demotions += 1
            else:
                self._counters.demotion_failures += 1
            b.pins -= 1
            if b.pins == 0:  # no reader took it meanwhile: let the DRAM copy go
                self._evict_dram(key, b)

    # -- checks ------------------------------------------------------------------

    def _touch(self, key: BlockKey) -> None:
        b = self._blocks.get(key)
        if b is not None:
            self._policy(self._tier(b)).touch(key)

    @staticmethod
    def _tier(b: _Block) -> str:
        """The fastest tier holding ``b``."""
        return "hbm" if b.hbm is not None else "dram" if b.dram is not None else "ssd"

    def _policy(self, tier: str) -> EvictionPolicy:
        return {"hbm": self._hbm_policy, "dram": self._dram_policy, "ssd": self._ssd_policy}[tier]

    def _memory_view(self, b: _Block) -> torch.Tensor:
        """The block's bytes in its memory tier (HBM or DRAM)."""
        tier: MemoryTier | None = self._hbm if b.hbm is not None else self._dram
        offset = b.hbm if b.hbm is not None else b.dram
        assert tier is not None and offset is not None
        return tier.view(offset, b.nbytes)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("store is closed")

    @staticmethod
    def _scoped(keys: Sequence[BlockKey], ns_tag: int | None) -> list[ScopedKey]:
        """Check ``keys`` and scope them by their namespace (None: the default, 0)."""
        prefix = (ns_tag or 0).to_bytes(4, "little")
        for k in keys:
            if not isinstance(k, bytes) or len(k) != KEY_BYTES:
                raise InvalidArgumentError(f"block keys are {KEY_BYTES}-byte bytes, got {k!r:.40}")
        return [prefix + k for k in keys]
