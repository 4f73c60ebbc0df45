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

``TieredStore`` is the façade over parts that share its one lock
(``StoreParts``): the ``BlockIndex`` (what is stored), the ``TierSpace``
(where its bytes live and every move between tiers), the ``Writer`` (the put
path), the ``Reader`` (the read path), the ``Demoter`` and the stats built in
``kvstore.stats``.

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
from collections.abc import Sequence

import torch

from kvstore.buffers import Payload
from kvstore.config import StoreConfig
from kvstore.errors import StorageError
from kvstore.keys import BlockKey, Namespace, ScopedKey, scoped
from kvstore.stats import StoreStats, build_stats
from kvstore.store.demoter import Demoter
from kvstore.store.index import scoped_keys
from kvstore.store.parts import StoreParts
from kvstore.store.plans import BlockRead, PutPlan, ReadPlan
from kvstore.store.reader import Reader
from kvstore.store.writer import Writer
from kvstore.tier import Entry, Tier
from kvstore.tiers.hbm import HbmTier
from kvstore.tiers.ssd import SsdTier
from transfer.memory import Progress, alloc_anonymous

log = logging.getLogger(__name__)


class TieredStore:
    """Thread-safe. ``close()`` when no call is in flight."""

    def __init__(
        self,
        config: StoreConfig | None = None,
        *,
        hbm: HbmTier | None = None,
        progress: Progress | None = None,
    ) -> None:
        """``hbm``: a tier to use instead of one built from ``config.hbm``;
        ``progress``: called as the DRAM pool is faulted in."""
        self.config = config or StoreConfig()
        if hbm is None and self.config.hbm.enabled:
            hbm = HbmTier(self.config.hbm)
        self._p = StoreParts(self.config, hbm, progress)
        self._writer = Writer(self._p)
        self._reader = Reader(self._p)
        self._names: dict[int, str] = {}
        self._block_sizes: dict[int, int] = {}  # namespace tag -> tokens per block
        self._detail = self.config.metrics.enabled
        self._demoter: Demoter | None = None
        if self._p.space.ssd is not None:
            self._p.space.adopt_ssd()
            self._demoter = Demoter(self._p)

    # -- puts (kvstore.store.writer) -------------------------------------------

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
        return self._writer.put(keys, payloads, parents, ns_tag=ns_tag, compress=compress)

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
        write's ``buffer`` and then calls ``commit_put`` or ``abort_put``.

        Two phases let a server land a remote client's bytes straight in the
        DRAM pool its transfer engine registered; ``put`` is the same two
        phases around one local copy. ``hbm``: blocks may go to the HBM tier
        (their buffers are host scratch, copied to the device at commit).
        """
        return self._writer.begin_put(
            keys, sizes, parents, ns_tag=ns_tag, compress=compress, hbm=hbm
        )

    def commit_put(
        self,
        plan: PutPlan,
        *,
        expect: Sequence[int] | None = None,
        digests: Sequence[int] | None = None,
    ) -> list[bool]:
        """Checksum the filled writes, move those bound for SSD or HBM there,
        and publish them. ``expect``: the checksum each write must have (one
        per key of the batch); any mismatch stores nothing and raises
        ``ChecksumMismatchError``. ``digests``: each write's checksum (in
        ``plan.writes`` order) as the caller took it over the filled buffer
        while the bytes arrived; the store then hashes nothing itself."""
        return self._writer.commit_put(plan, expect=expect, digests=digests)

    def abort_put(self, plan: PutPlan) -> None:
        """Give back every reservation of a plan that will not be committed."""
        self._writer.abort_put(plan)

    # -- reads (kvstore.store.reader) ------------------------------------------

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
        return self._reader.get_into(keys, dsts, prefix=prefix, ns_tag=ns_tag)

    def begin_read(
        self,
        keys: Sequence[BlockKey],
        *,
        prefix: bool = True,
        ns_tag: int | None = None,
        sizes: Sequence[int] | None = None,
    ) -> ReadPlan:
        """Pin the blocks to read; ``read_block`` each, then always ``end_read``.
        ``sizes`` (the destinations' byte sizes) are checked before anything
        is pinned for long: a mismatch raises ``PayloadSizeError``."""
        return self._reader.begin_read(keys, prefix=prefix, ns_tag=ns_tag, sizes=sizes)

    def read_block(self, r: BlockRead) -> torch.Tensor | None:
        """The bytes of one pinned block (valid until ``end_read``), or None if
        the SSD copy proved damaged. A DRAM or promoted block is a pool view."""
        return self._reader.read_block(r)

    def dram_extent(self, r: BlockRead) -> int | None:
        """Where a pinned DRAM block's bytes lie in the DRAM pool (it is then
        read: ``r.ok``), for a caller that moves them itself; None where the
        block is elsewhere, or fails ``verify_dram_reads``: use ``read_block``."""
        return self._reader.dram_extent(r)

    def end_read(self, plan: ReadPlan) -> None:
        self._reader.end_read(plan)

    # -- metadata ----------------------------------------------------------------

    def lookup(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> int:
        """How many leading keys are stored (in any tier)."""
        return len(self.locate(keys, ns_tag=ns_tag))

    def locate(
        self, keys: Sequence[BlockKey], *, ns_tag: int | None = None, count: bool = True
    ) -> list[Tier]:
        """The fastest tier of each leading stored key; counts as a lookup
        unless ``count`` is False (a router asking where a prompt lives)."""
        return self.locate_scoped(scoped_keys(keys, ns_tag), ns_tag=ns_tag, count=count)

    def locate_scoped(
        self, skeys: Sequence[ScopedKey], *, ns_tag: int | None = None, count: bool = True
    ) -> list[Tier]:
        """``locate`` of keys already in the index's form, namespace ``ns_tag``
        (``block_keys(..., scoped=True)``: a prompt keyed and scoped in one pass)."""
        tiers: list[Tier] = []
        with self._p.lock:
            self._p.check_open()
            blocks = self._p.index.blocks
            for key in skeys:
                b = blocks.get(key)
                if b is None:
                    break
                tiers.append(b.home)
            if not count:
                return tiers
            c = self._p.counters
            c.lookups += 1
            c.lookup_hit_blocks += len(tiers)
            c.lookup_miss_blocks += len(skeys) - len(tiers)
            if ns_tag is not None and self._detail and ns_tag in self._block_sizes:
                c.lookup_tokens(ns_tag, tiers, len(skeys), self._block_sizes[ns_tag])
        return tiers

    def exists(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> list[bool]:
        skeys = scoped_keys(keys, ns_tag)
        with self._p.lock:
            self._p.check_open()
            blocks = self._p.index.blocks
            return [k in blocks for k in skeys]

    def tier_of(self, key: BlockKey, *, ns_tag: int = 0) -> Tier | None:
        """Fastest tier holding ``key`` (for tests and operators), or None."""
        with self._p.lock:
            b = self._p.index.get(scoped(ns_tag, key))
            return None if b is None else b.home

    def entries(self, keys: Sequence[BlockKey] | None = None, *, ns_tag: int = 0) -> list[Entry]:
        """Directory entries of ``keys`` (of namespace ``ns_tag``) that are
        stored (None: of every block, in every namespace), for a cluster node
        to publish."""
        with self._p.lock:
            blocks = self._p.index.blocks
            if keys is None:
                items = list(blocks.items())
            else:
                found = ((k, blocks.get(k)) for k in scoped_keys(keys, ns_tag))
                items = [(k, b) for k, b in found if b is not None]
            return [Entry(k[4:], b.home, b.nbytes, b.digest) for k, b in items]

    def track_removals(self) -> None:
        """Start recording the keys that leave the store (deleted or dropped
        under pressure), for ``take_removed``."""
        with self._p.lock:
            if self._p.index.removed is None:
                self._p.index.removed = []

    def take_removed(self) -> list[BlockKey]:
        """The keys removed since the last call (while tracking)."""
        with self._p.lock:
            index = self._p.index
            out, index.removed = index.removed or [], [] if index.removed is not None else None
            return out

    def delete(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> int:
        """Remove blocks from every tier; returns how many existed.

        All or nothing: the SSD tombstones of the whole batch are written
        first, so a DiskFullError (even the delete reserve spent) leaves every
        block where it was.
        """
        skeys = scoped_keys(keys, ns_tag)
        space = self._p.space
        with self._p.lock:
            self._p.check_open()
            found = [
                (k, b) for k in dict.fromkeys(skeys) if (b := self._p.index.get(k)) is not None
            ]
            if space.ssd is not None:
                space.ssd.remove(k for k, b in found if b.on_ssd)
            for k, b in found:
                b.on_ssd = False
                space.remove(k, b)
            self._p.counters.deletes += len(found)
        return len(found)

    def open_namespace(self, namespace: Namespace) -> None:
        """Remember a namespace's name for per-namespace stats."""
        with self._p.lock:
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
        return self._p.space.dram.pool

    def stats(self) -> StoreStats:
        space = self._p.space
        with self._p.lock:
            present = [
                (t.name, t.capacity, t.used_bytes, len(space.policy(Tier(t.name))))
                for t in (space.hbm, space.dram)
                if t is not None
            ]
            ssd = space.ssd
            if ssd is not None:
                present.append((Tier.SSD, ssd.capacity, ssd.used_bytes, len(ssd)))
            return build_stats(self._p.counters, present, len(self._p.index), self._names, ssd)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until DRAM is at or below its high watermark and no demotion runs."""
        return True if self._demoter is None else self._demoter.wait_idle(timeout)

    def compact(self, *, min_garbage_ratio: float | None = None) -> int:
        """Reclaim SSD space now; returns bytes reclaimed."""
        ssd = self._p.space.ssd
        return ssd.compact(min_garbage_ratio=min_garbage_ratio) if ssd else 0

    def close(self) -> None:
        with self._p.lock:
            if self._p.closed:
                return
            self._p.closed = True
        if self._demoter is not None:
            self._demoter.stop()
        if self._p.space.ssd is not None and self.config.ssd.flush_on_close:
            self._flush_memory(self._p.space.ssd)
        self._p.space.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _flush_memory(self, ssd: SsdTier) -> None:
        """Write memory-only blocks (HBM and DRAM) to SSD so a restart finds
        them (at close)."""
        with self._p.lock:
            dirty = [
                (k, b) for k, b in self._p.index.blocks.items() if b.in_memory and not b.on_ssd
            ]
        for n, (key, b) in enumerate(dirty):
            try:
                view = self._p.space.view(b).cpu()  # HBM blocks through the host
                self._p.write_ssd(key, view, b.digest, b.parent, b.compress)
            except StorageError as e:
                log.warning("flush at close stopped after %d of %d blocks: %s", n, len(dirty), e)
                return
            b.on_ssd = True
