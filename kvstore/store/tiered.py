"""The tiered block store: placement, leases, demotion and promotion.

Blocks are opaque payloads under 16-byte keys, each knowing its parent (the
block before it in its prompt). Every index holds keys scoped by their
namespace (``kvstore.keys.scoped``): a key one tenant sends never reaches,
reveals or blocks another tenant's block. Where the node has an HBM tier, an
in-process write lands there first; a full HBM moves its eviction victims down
to DRAM (one device-to-host copy each). Otherwise a write lands in DRAM when
DRAM has room (after dropping clean copies already on SSD), else straight on
SSD. A background thread (``Demoter``) demotes DRAM's eviction victims to SSD
once DRAM passes its high watermark, down to the low one. A read from SSD
lands in the caller's buffer and, when DRAM has room below the high
watermark, is promoted.

``TieredStore`` is the façade over four parts that share its one lock: the
``BlockIndex`` (what is stored), the ``TierSpace`` (where its bytes live and
every move between tiers), the ``Demoter`` and the stats in ``kvstore.stats``.

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
from collections.abc import Sequence

import torch

from kvstore.buffers import Payload, as_tensor, contiguous_bytes, copy_bytes, flat_bytes, nbytes_of
from kvstore.checksum import checksum
from kvstore.config import StoreConfig
from kvstore.errors import (
    ChecksumMismatchError,
    ClosedError,
    InvalidArgumentError,
    PayloadSizeError,
    StorageError,
    StoreFullError,
)
from kvstore.keys import BlockKey, Namespace, ScopedKey, check_per_key, scoped
from kvstore.stats import Counters, StoreStats, build_stats
from kvstore.store.block import Block
from kvstore.store.demoter import Demoter
from kvstore.store.index import BlockIndex, scoped_keys
from kvstore.store.plans import BlockRead, BlockWrite, PutPlan, ReadPlan
from kvstore.store.space import DECLINED, TierSpace
from kvstore.tier import Entry, Tier
from kvstore.tiers.hbm import HbmTier
from kvstore.tiers.segment import MAX_PAYLOAD
from kvstore.tiers.ssd import SsdTier
from transfer.memory import alloc_anonymous

log = logging.getLogger(__name__)


class TieredStore:
    """Thread-safe. ``close()`` when no call is in flight."""

    def __init__(self, config: StoreConfig | None = None, *, hbm: HbmTier | None = None) -> None:
        """``hbm``: a tier to use instead of one built from ``config.hbm``."""
        self.config = config or StoreConfig()
        if hbm is None and self.config.hbm.enabled:
            hbm = HbmTier(self.config.hbm)
        self._lock = threading.Lock()
        self._index = BlockIndex()
        self._counters = Counters()
        self._space = TierSpace(self.config, hbm, self._index, self._counters)
        self._names: dict[int, str] = {}
        self._block_sizes: dict[int, int] = {}  # namespace tag -> tokens per block
        self._detail = self.config.metrics.enabled
        self._closed = False
        self._demoter: Demoter | None = None
        if self._space.ssd is not None:
            self._space.adopt_ssd()
            self._demoter = Demoter(self._space, self._lock)

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
        phases around one local copy. ``hbm``: the caller can fill an HBM
        extent (``put``, and a node whose store has an HBM tier).
        """
        check_per_key(len(keys), payloads=sizes, parents=parents)
        skeys = scoped_keys(keys, ns_tag)
        sparents = (
            None if parents is None else [None if p is None else scoped(ns_tag, p) for p in parents]
        )
        for n in sizes:
            if not 0 < n <= MAX_PAYLOAD:
                raise InvalidArgumentError(f"block payload of {n} bytes; must be 1..{MAX_PAYLOAD}")
        if compress is None:
            compress = self.config.ssd.compression == "lz4"
        plan = PutPlan(len(skeys), sparents, ns_tag, compress)
        space, index = self._space, self._index
        # with no SSD to keep a copy, the batch's parents stay while it is placed:
        # dropping one would strand its children
        keep = frozenset(p for p in plan.parents or () if p is not None) if not space.ssd else ()
        with self._lock:
            self._check_open()
            for i, key in enumerate(skeys):
                if index.taken(key):
                    self._counters.put_duplicates += 1
                    space.touch(key)
                    continue
                nbytes = sizes[i]
                on_hbm = space.reserve_hbm(nbytes) if hbm and space.hbm is not None else None
                offset = None
                if on_hbm is None:
                    tail = key if i == len(skeys) - 1 else None
                    offset = space.reserve_dram(nbytes, keep, tail=tail)
                    if offset == DECLINED:
                        if space.ssd is None:
                            break  # the tail is not stored; see kvstore.eviction.admission
                        offset = None
                if (
                    on_hbm is None
                    and offset is None
                    and (space.ssd is None or nbytes > space.ssd.capacity)
                ):
                    why = "block is larger than the SSD tier"
                    if space.ssd is None:
                        why = "DRAM is full of pinned blocks and there is no SSD tier"
                    plan.failure = StoreFullError(nbytes, why)
                    plan.refused = len(skeys) - i
                    break
                index.pending.add(key)
                target = None
                if on_hbm is not None:
                    target = space.memory(Tier.HBM).view(on_hbm, nbytes)
                elif offset is not None:
                    target = space.dram.view(offset, nbytes)
                plan.writes.append(
                    BlockWrite(i, key, nbytes, offset, target, on_hbm, plan.parent(i))
                )
                index.link(plan.parent(i), +1)  # from now on, see TierSpace.make_ssd_room
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
                    self._write_ssd(w.key, flat, digest, w.parent, plan.compress)
                done.append((w, digest))
        except StoreFullError as e:
            failure = e
        finally:
            results = [False] * plan.size
            with self._lock:
                for w, digest in done:
                    self._publish(w, digest, plan.ns_tag, plan.compress)
                    results[w.index] = True
                self._release(plan.writes[len(done) :])
                self._nudge()
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
        skeys = scoped_keys(keys, ns_tag)
        plan = ReadPlan(len(skeys))
        space = self._space
        with self._lock:
            self._check_open()
            for i, key in enumerate(skeys):
                b = self._index.get(key)
                if b is None:
                    if prefix:
                        break
                    continue
                if sizes is not None and sizes[i] != b.nbytes:
                    self._unpin_all(plan.reads)
                    raise PayloadSizeError(b.nbytes, sizes[i], what=f"destination {i}")
                r = BlockRead(i, key, b, tier=b.home)
                space.policy(b.home).touch(key)
                if r.pinned:
                    b.pins += 1
                elif self.config.promote_on_hit and not b.promoting:
                    r.promote = space.reserve_promotion(b.nbytes)
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

    def locate(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> list[Tier]:
        """The fastest tier of each leading stored key; counts as a lookup."""
        tiers: list[Tier] = []
        skeys = scoped_keys(keys, ns_tag)
        with self._lock:
            self._check_open()
            blocks = self._index.blocks
            for key in skeys:
                b = blocks.get(key)
                if b is None:
                    break
                tiers.append(b.home)
            c = self._counters
            c.lookups += 1
            c.lookup_hit_blocks += len(tiers)
            c.lookup_miss_blocks += len(keys) - len(tiers)
            if ns_tag is not None and self._detail and ns_tag in self._block_sizes:
                c.lookup_tokens(ns_tag, tiers, len(keys), self._block_sizes[ns_tag])
        return tiers

    def exists(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> list[bool]:
        skeys = scoped_keys(keys, ns_tag)
        with self._lock:
            self._check_open()
            blocks = self._index.blocks
            return [k in blocks for k in skeys]

    def tier_of(self, key: BlockKey, *, ns_tag: int = 0) -> Tier | None:
        """Fastest tier holding ``key`` (for tests and operators), or None."""
        with self._lock:
            b = self._index.get(scoped(ns_tag, key))
            return None if b is None else b.home

    def entries(self, keys: Sequence[BlockKey] | None = None, *, ns_tag: int = 0) -> list[Entry]:
        """Directory entries of ``keys`` (of namespace ``ns_tag``) that are
        stored (None: of every block, in every namespace), for a cluster node
        to publish."""
        with self._lock:
            blocks = self._index.blocks
            if keys is None:
                items = list(blocks.items())
            else:
                found = ((k, blocks.get(k)) for k in scoped_keys(keys, ns_tag))
                items = [(k, b) for k, b in found if b is not None]
            return [Entry(k[4:], b.home, b.nbytes, b.digest) for k, b in items]

    def track_removals(self) -> None:
        """Start recording the keys that leave the store (deleted or dropped
        under pressure), for ``take_removed``."""
        with self._lock:
            if self._index.removed is None:
                self._index.removed = []

    def take_removed(self) -> list[BlockKey]:
        """The keys removed since the last call (while tracking)."""
        with self._lock:
            index = self._index
            out, index.removed = index.removed or [], [] if index.removed is not None else None
            return out

    def delete(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> int:
        """Remove blocks from every tier; returns how many existed.

        All or nothing: the SSD tombstones of the whole batch are written
        first, so a DiskFullError (even the delete reserve spent) leaves every
        block where it was.
        """
        skeys = scoped_keys(keys, ns_tag)
        space = self._space
        with self._lock:
            self._check_open()
            found = [(k, b) for k in dict.fromkeys(skeys) if (b := self._index.get(k)) is not None]
            if space.ssd is not None:
                space.ssd.remove(k for k, b in found if b.on_ssd)
            for k, b in found:
                b.on_ssd = False
                space.remove(k, b)
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
        return self._space.dram.pool

    def stats(self) -> StoreStats:
        space = self._space
        with self._lock:
            present = [
                (t.name, t.capacity, t.used_bytes, len(space.policy(Tier(t.name))))
                for t in (space.hbm, space.dram)
                if t is not None
            ]
            ssd = space.ssd
            if ssd is not None:
                present.append((Tier.SSD, ssd.capacity, ssd.used_bytes, len(ssd)))
            return build_stats(self._counters, present, len(self._index), self._names, ssd)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until DRAM is at or below its high watermark and no demotion runs."""
        return True if self._demoter is None else self._demoter.wait_idle(timeout)

    def compact(self, *, min_garbage_ratio: float | None = None) -> int:
        """Reclaim SSD space now; returns bytes reclaimed."""
        ssd = self._space.ssd
        return ssd.compact(min_garbage_ratio=min_garbage_ratio) if ssd else 0

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._demoter is not None:
            self._demoter.stop()
        if self._space.ssd is not None and self.config.ssd.flush_on_close:
            self._flush_memory(self._space.ssd)
        self._space.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ----------------------------------------------------------------

    def _flush_memory(self, ssd: SsdTier) -> None:
        """Write memory-only blocks (HBM and DRAM) to SSD so a restart finds
        them (at close)."""
        with self._lock:
            dirty = [(k, b) for k, b in self._index.blocks.items() if b.in_memory and not b.on_ssd]
        for n, (key, b) in enumerate(dirty):
            with self._lock:
                self._space.make_ssd_room(b.nbytes)
            try:
                view = self._space.view(b).cpu()  # HBM blocks through the host
                ssd.put(key, view, b.digest, parent=b.parent, compress=b.compress)
            except StorageError as e:
                log.warning("flush at close stopped after %d of %d blocks: %s", n, len(dirty), e)
                return
            b.on_ssd = True

    def _write_ssd(
        self,
        key: ScopedKey,
        flat: torch.Tensor,
        digest: int,
        parent: ScopedKey | None,
        compress: bool,
    ) -> None:
        """Write one block straight to SSD (no lock held)."""
        ssd = self._space.ssd
        assert ssd is not None
        with self._lock:
            self._space.make_ssd_room(flat.numel())
        try:
            ssd.put(key, flat, digest, parent=parent, compress=compress)
        except StorageError as e:
            raise StoreFullError(flat.numel(), f"DRAM full and SSD write failed: {e}") from e

    def _publish(self, w: BlockWrite, digest: int, ns_tag: int, compress: bool) -> None:
        """A filled write becomes a stored block. Lock held."""
        b = Block(w.parent, w.nbytes, digest, ns_tag, compress, on_ssd=w.to_ssd)
        if w.hbm is not None:
            b.place(Tier.HBM, w.hbm)
        elif w.dram is not None:
            b.place(Tier.DRAM, w.dram)
        self._index.publish(w.key, b)
        self._space.policy(b.home).insert(w.key, b.parent)
        c = self._counters
        c.puts += 1
        c.account(ns_tag, w.nbytes, +1)
        c.put_bytes += w.nbytes

    def _release(self, writes: Sequence[BlockWrite]) -> None:
        """Give back unpublished writes' reservations. Lock held."""
        for w in writes:
            self._index.link(w.parent, -1)
            self._index.pending.discard(w.key)
            if w.dram is not None:
                self._space.dram.free(w.dram)
                w.dram = None
            if w.hbm is not None:
                self._space.memory(Tier.HBM).free(w.hbm)
                w.hbm = None

    def _nudge(self) -> None:
        if self._demoter is not None:
            self._demoter.nudge()

    # -- reads -----------------------------------------------------------------

    def _read_block(self, r: BlockRead, dst: torch.Tensor | None) -> torch.Tensor | None:
        """Fill ``dst`` with one block (no lock held), or with ``dst`` None return
        a tensor holding it; None when the SSD copy is damaged."""
        b = r.block
        if r.pinned:
            src = self._space.view(b)
            if self.config.verify_dram_reads and r.tier is Tier.DRAM and checksum(src) != b.digest:
                log.warning("DRAM copy of a %d-byte block fails its checksum", b.nbytes)
                r.damaged = True
                return None
            if dst is None:  # a pool view; HBM bytes are copied to the host first
                return src if src.device.type == "cpu" else src.cpu()
            copy_bytes(dst, src)
            return dst
        ssd = self._space.ssd
        assert ssd is not None
        flat = None if dst is None else contiguous_bytes(dst)
        if r.promote is not None:
            staging = self._space.dram.view(r.promote, b.nbytes)
        elif flat is not None:
            return dst if ssd.get_into(r.key, flat) else None
        else:
            staging = torch.empty(b.nbytes, dtype=torch.uint8)
        if not ssd.get_into(r.key, staging):
            return None
        if dst is None:
            return staging
        copy_bytes(dst, staging)
        return dst

    def _finish_reads(self, reads: list[BlockRead], *, requested: int) -> None:
        """Unpin, publish promotions, account hits and damage. Lock held."""
        c, space = self._counters, self._space
        for r in reads:
            b = r.block
            if r.pinned:
                space.unpin(b)
                if r.damaged and not b.dead:  # wrong bytes in memory: drop the block
                    c.dram_checksum_failures += 1
                    space.remove(r.key, b)
            else:
                b.promoting = False
                if r.promote is not None:
                    if r.ok and not b.dead and not b.in_memory:
                        b.place(Tier.DRAM, r.promote)
                        space.policy(Tier.DRAM).insert(r.key, b.parent)
                        c.promotions += 1
                    else:
                        space.dram.free(r.promote)
                ssd = space.ssd
                if not r.ok and not b.dead and b.on_ssd and ssd is not None and r.key not in ssd:
                    # the SSD tier found the record damaged and dropped it
                    space.drop_copy(r.key, b, Tier.SSD, evicted=False)
            if r.ok:
                c.bump(c.hits, r.tier)
                c.get_bytes += b.nbytes
        c.misses += requested - sum(1 for r in reads if r.ok)
        self._nudge()

    def _unpin_all(self, reads: list[BlockRead]) -> None:
        for r in reads:
            if r.pinned:
                self._space.unpin(r.block)
            elif r.promote is not None:
                r.block.promoting = False
                self._space.dram.free(r.promote)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("store is closed")
