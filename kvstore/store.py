"""The tiered block store: placement, leases, demotion and promotion.

Blocks are opaque payloads under 16-byte keys, each knowing its parent (the
block before it in its prompt). A write lands in DRAM when DRAM has room (after
dropping clean copies already on SSD), else straight on SSD. A background
thread demotes DRAM's eviction victims to SSD once DRAM passes its high
watermark, down to the low one. A read from SSD lands in the caller's buffer
and, when DRAM has room below the high watermark, is promoted.

Correctness rules, all under one lock for metadata while bytes move outside it:

- a block is published only after its bytes are copied and checksummed, so a
  put is all-or-nothing per block and readers never see a partial one;
- a reader pins the DRAM extent it copies from; pinned extents are never
  freed, evicted or reused (a delete during the read frees it at unpin);
- SSD reads verify the checksum in the reader's buffer; a mismatch is a miss.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvstore.buffers import Payload, as_tensor, contiguous_bytes, copy_bytes, nbytes_of
from kvstore.checksum import checksum
from kvstore.config import StoreConfig
from kvstore.errors import (
    ClosedError,
    InvalidArgumentError,
    PayloadSizeError,
    StorageError,
    StoreFullError,
)
from kvstore.eviction import make_policy
from kvstore.keys import KEY_BYTES, BlockKey
from kvstore.stats import Counters, StoreStats, TierStats
from kvstore.tiers.dram import DramTier
from kvstore.tiers.segment import FLAG_LZ4, MAX_PAYLOAD
from kvstore.tiers.ssd import SsdTier

log = logging.getLogger(__name__)

DEMOTE_BATCH = 64  # blocks chosen per pass, so the lock is retaken often


@dataclass(slots=True, eq=False)
class _Block:
    parent: BlockKey | None
    nbytes: int
    digest: int
    ns_tag: int
    compress: bool
    dram: int | None = None  # pool offset while resident in DRAM
    on_ssd: bool = False
    pins: int = 0  # readers (and the demoter) copying from the DRAM extent
    dead: bool = False  # deleted or dropped; DRAM is freed at the last unpin
    promoting: bool = False


@dataclass(slots=True)
class _Write:
    index: int
    key: BlockKey
    src: torch.Tensor
    dram: int | None  # reserved pool offset, or None: straight to SSD


@dataclass(slots=True)
class _Read:
    index: int
    key: BlockKey
    block: _Block
    dst: torch.Tensor
    promote: int | None = None  # reserved pool offset for an SSD hit
    from_dram: bool = False
    ok: bool = False


class TieredStore:
    """Thread-safe. ``close()`` when no call is in flight."""

    def __init__(self, config: StoreConfig | None = None) -> None:
        self.config = config or StoreConfig()
        self._dram = DramTier(self.config.dram)
        try:
            self._ssd = SsdTier(self.config.ssd) if self.config.ssd.enabled else None
        except BaseException:
            self._dram.close()
            raise
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._blocks: dict[BlockKey, _Block] = {}
        self._pending: set[BlockKey] = set()
        self._dram_policy = make_policy(self.config.eviction)
        self._ssd_policy = make_policy(self.config.eviction)
        self._counters = Counters()
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
        records = {rec.key: rec for rec in ssd.records()}
        for key in records:
            chain: list[BlockKey] = []
            k: BlockKey | None = key
            while k is not None and k in records and k not in self._blocks and k not in chain:
                chain.append(k)
                k = records[k].parent
            for k in reversed(chain):
                rec = records[k]
                self._blocks[k] = _Block(
                    rec.parent,
                    rec.raw_len,
                    rec.checksum,
                    rec.ns_tag,
                    bool(rec.flags & FLAG_LZ4),
                    on_ssd=True,
                )
                self._ssd_policy.insert(k, rec.parent)

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
        """Store blocks; True for each newly stored, False where the key existed.

        Keys name content, so a key already present is left as it is. Stops at
        the first block no tier can take (StoreFullError, with ``stored`` set to
        how many leading blocks went in): later blocks of a chain are useless
        without it.
        """
        self._check_keys(keys)
        if len(payloads) != len(keys) or (parents is not None and len(parents) != len(keys)):
            raise InvalidArgumentError(
                f"{len(keys)} keys but {len(payloads)} payloads"
                + ("" if parents is None else f" and {len(parents)} parents")
            )
        srcs = [as_tensor(p) for p in payloads]
        for t in srcs:
            n = nbytes_of(t)
            if not 0 < n <= MAX_PAYLOAD:
                raise InvalidArgumentError(f"block payload of {n} bytes; must be 1..{MAX_PAYLOAD}")
        if compress is None:
            compress = self.config.ssd.compression == "lz4"
        plan: list[_Write] = []
        results = [False] * len(keys)
        failure: StoreFullError | None = None
        with self._lock:
            self._check_open()
            for i, key in enumerate(keys):
                if key in self._blocks or key in self._pending:
                    self._counters.put_duplicates += 1
                    self._touch(key)
                    continue
                nbytes = nbytes_of(srcs[i])
                offset = self._reserve_dram(nbytes)
                if offset is None and (self._ssd is None or nbytes > self._ssd.capacity):
                    why = "block is larger than the SSD tier"
                    if self._ssd is None:
                        why = "DRAM is full of pinned blocks and there is no SSD tier"
                    failure = StoreFullError(nbytes, why)
                    break
                self._pending.add(key)
                plan.append(_Write(i, key, srcs[i], offset))
        parent_of = (lambda i: parents[i]) if parents is not None else (lambda i: None)
        done: list[tuple[_Write, int]] = []
        try:
            for w in plan:
                done.append((w, self._write_block(w, parent_of(w.index), ns_tag, compress)))
        except StoreFullError as e:
            failure = e
        finally:
            with self._lock:
                for w, digest in done:
                    self._publish(w, parent_of(w.index), digest, ns_tag, compress)
                    results[w.index] = True
                for w in plan[len(done) :]:
                    self._pending.discard(w.key)
                    if w.dram is not None:
                        self._dram.free(w.dram)
                if self._dram.used_bytes > self._high:
                    self._wake.notify_all()
        if failure is not None:
            failure.stored = sum(results)
            raise failure
        return results

    def get_into(
        self, keys: Sequence[BlockKey], dsts: Sequence[Payload], *, prefix: bool = True
    ) -> list[bool]:
        """Copy blocks into ``dsts``; True for each filled.

        With ``prefix`` the read stops at the first miss (a block is useless
        without those before it). A destination not filled has undefined bytes.
        """
        self._check_keys(keys)
        if len(dsts) != len(keys):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(dsts)} destinations")
        outs = [as_tensor(d, writable=True) for d in dsts]
        plan: list[_Read] = []
        with self._lock:
            self._check_open()
            for i, key in enumerate(keys):
                b = self._blocks.get(key)
                if b is None:
                    if prefix:
                        break
                    continue
                if nbytes_of(outs[i]) != b.nbytes:
                    self._unpin_all(plan)
                    raise PayloadSizeError(b.nbytes, nbytes_of(outs[i]), what=f"destination {i}")
                r = _Read(i, key, b, outs[i])
                if b.dram is not None:
                    b.pins += 1
                    r.from_dram = True
                    self._dram_policy.touch(key)
                else:
                    self._ssd_policy.touch(key)
                    if self.config.promote_on_hit and not b.promoting:
                        r.promote = self._reserve_promotion(b.nbytes)
                        b.promoting = r.promote is not None
                plan.append(r)
        try:
            for r in plan:
                r.ok = self._read_block(r)
                if prefix and not r.ok:  # damaged: what follows it is of no use
                    break
        finally:
            with self._lock:
                self._finish_reads(plan, requested=len(keys))
        results = [False] * len(keys)
        for r in plan:
            results[r.index] = r.ok
        return results

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        """How many leading keys are stored (in any tier)."""
        with self._lock:
            self._check_open()
            n = 0
            for key in keys:
                if key not in self._blocks:
                    break
                n += 1
            self._counters.lookups += 1
            self._counters.lookup_hit_blocks += n
            self._counters.lookup_miss_blocks += len(keys) - n
            return n

    def exists(self, keys: Sequence[BlockKey]) -> list[bool]:
        with self._lock:
            self._check_open()
            return [k in self._blocks for k in keys]

    def tier_of(self, key: BlockKey) -> str | None:
        """Fastest tier holding ``key`` (for tests and operators), or None."""
        with self._lock:
            b = self._blocks.get(key)
            if b is None:
                return None
            return "dram" if b.dram is not None else "ssd"

    def delete(self, keys: Sequence[BlockKey]) -> int:
        """Remove blocks from every tier; returns how many existed."""
        self._check_keys(keys)
        n = 0
        with self._lock:
            self._check_open()
            for key in keys:
                b = self._blocks.get(key)
                if b is None:
                    continue
                self._remove(key, b, tombstone=True)
                n += 1
            self._counters.deletes += n
        return n

    def stats(self) -> StoreStats:
        with self._lock:
            c = self._counters
            tiers = [
                TierStats(
                    "dram",
                    self._dram.capacity,
                    self._dram.used_bytes,
                    len(self._dram_policy),
                    c.hits.get("dram", 0),
                    c.evictions.get("dram", 0),
                )
            ]
            ssd = self._ssd
            if ssd is not None:
                tiers.append(
                    TierStats(
                        "ssd",
                        ssd.capacity,
                        ssd.used_bytes,
                        len(ssd),
                        c.hits.get("ssd", 0),
                        c.evictions.get("ssd", 0),
                    )
                )
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
                checksum_failures=sc.checksum_failures if sc else 0,
                ssd_read_errors=sc.read_errors if sc else 0,
                ssd_compactions=sc.compactions if sc else 0,
                ssd_reclaimed_bytes=sc.reclaimed_bytes if sc else 0,
                ssd_garbage_ratio=ssd.garbage_ratio() if ssd is not None else 0.0,
                lz4_ratio=(sc.lz4_raw_bytes / sc.lz4_stored_bytes)
                if sc and sc.lz4_stored_bytes
                else None,
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
            self._ssd.close()
        self._dram.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ----------------------------------------------------------------

    def _write_block(self, w: _Write, parent: BlockKey | None, ns_tag: int, compress: bool) -> int:
        """Copy one block to its tier and return its checksum (no lock held)."""
        if w.dram is not None:
            dst = self._dram.view(w.dram, nbytes_of(w.src))
            copy_bytes(dst, w.src)
            return checksum(dst)
        assert self._ssd is not None
        flat = contiguous_bytes(w.src)
        if flat is None:
            flat = w.src.contiguous().reshape(-1).view(torch.uint8)
        digest = checksum(flat)
        with self._lock:
            self._make_ssd_room(flat.numel())
        try:
            self._ssd.put(w.key, flat, digest, parent=parent, ns_tag=ns_tag, compress=compress)
        except StorageError as e:
            raise StoreFullError(flat.numel(), f"DRAM full and SSD write failed: {e}") from e
        return digest

    def _publish(
        self, w: _Write, parent: BlockKey | None, digest: int, ns_tag: int, compress: bool
    ) -> None:
        nbytes = nbytes_of(w.src)
        b = _Block(parent, nbytes, digest, ns_tag, compress, dram=w.dram, on_ssd=w.dram is None)
        self._pending.discard(w.key)
        self._blocks[w.key] = b
        (self._dram_policy if w.dram is not None else self._ssd_policy).insert(w.key, parent)
        self._counters.puts += 1
        self._counters.put_bytes += nbytes

    def _reserve_dram(self, nbytes: int) -> int | None:
        """A DRAM extent for a new block, dropping clean copies (or, with no SSD
        tier, any unpinned block) to make room. Lock held."""
        if self._dram.chunk_size(nbytes) > self._dram.capacity:
            return None
        offset = self._dram.alloc(nbytes)
        while offset is None:
            key = self._dram_policy.victim(self._not_droppable_from_dram)
            if key is None:
                return None
            self._evict_dram(key, self._blocks[key])
            offset = self._dram.alloc(nbytes)
        return offset

    def _not_droppable_from_dram(self, key: BlockKey) -> bool:
        b = self._blocks[key]
        return b.pins > 0 or (self._ssd is not None and not b.on_ssd)

    def _reserve_promotion(self, nbytes: int) -> int | None:
        if self._dram.used_bytes + self._dram.chunk_size(nbytes) > self._high:
            return None
        return self._dram.alloc(nbytes)

    def _make_ssd_room(self, nbytes: int) -> None:
        """Drop SSD copies until a record of ``nbytes`` fits. Lock held."""
        assert self._ssd is not None
        need = self._ssd.record_bytes(nbytes)
        while self._ssd.free_bytes < need:
            key = self._ssd_policy.victim(lambda k: False)
            if key is None:
                return  # the tier is empty of evictable blocks; the write may still fit
            b = self._blocks[key]
            self._ssd_policy.remove(key)
            self._ssd.remove(key, tombstone=False)
            b.on_ssd = False
            self._counters.bump(self._counters.evictions, "ssd")
            if b.dram is None:
                self._remove(key, b, tombstone=False)
                self._counters.dropped += 1

    # -- reads -----------------------------------------------------------------

    def _read_block(self, r: _Read) -> bool:
        """Fill one destination (no lock held)."""
        if r.from_dram:
            assert r.block.dram is not None
            copy_bytes(r.dst, self._dram.view(r.block.dram, r.block.nbytes))
            return True
        assert self._ssd is not None
        flat = contiguous_bytes(r.dst)
        if r.promote is not None:
            staging = self._dram.view(r.promote, r.block.nbytes)
            if not self._ssd.get_into(r.key, staging):
                return False
            copy_bytes(r.dst, staging)
            return True
        if flat is not None:
            return self._ssd.get_into(r.key, flat)
        staging = torch.empty(r.block.nbytes, dtype=torch.uint8)
        if not self._ssd.get_into(r.key, staging):
            return False
        copy_bytes(r.dst, staging)
        return True

    def _finish_reads(self, plan: list[_Read], *, requested: int) -> None:
        """Unpin, publish promotions, account hits and damage. Lock held."""
        c = self._counters
        for r in plan:
            b = r.block
            if r.from_dram:
                self._unpin(b)
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
                        self._remove(r.key, b, tombstone=False)
            if r.ok:
                c.bump(c.hits, "dram" if r.from_dram else "ssd")
                c.get_bytes += b.nbytes
        c.misses += requested - sum(1 for r in plan if r.ok)
        if self._dram.used_bytes > self._high:
            self._wake.notify_all()

    def _unpin_all(self, plan: list[_Read]) -> None:
        for r in plan:
            if r.from_dram:
                self._unpin(r.block)
            elif r.promote is not None:
                r.block.promoting = False
                self._dram.free(r.promote)

    def _unpin(self, b: _Block) -> None:
        b.pins -= 1
        if b.pins == 0 and b.dead and b.dram is not None:
            self._dram.free(b.dram)
            b.dram = None

    # -- removal -----------------------------------------------------------------

    def _evict_dram(self, key: BlockKey, b: _Block) -> None:
        """Drop the DRAM copy of an unpinned block (clean, or no SSD tier). Lock held."""
        self._dram_policy.remove(key)
        assert b.dram is not None and b.pins == 0
        self._dram.free(b.dram)
        b.dram = None
        self._counters.bump(self._counters.evictions, "dram")
        if not b.on_ssd:
            self._remove(key, b, tombstone=False)
            self._counters.dropped += 1

    def _remove(self, key: BlockKey, b: _Block, *, tombstone: bool) -> None:
        """Take a block out of the store entirely. Lock held."""
        del self._blocks[key]
        b.dead = True
        self._dram_policy.remove(key)
        self._ssd_policy.remove(key)
        if b.on_ssd and self._ssd is not None:
            self._ssd.remove(key, tombstone=tombstone)
            b.on_ssd = False
        if b.dram is not None and b.pins == 0:
            self._dram.free(b.dram)
            b.dram = None

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
                ns_tag=b.ns_tag,
                compress=b.compress,
            )
            written = True
        except StorageError as e:
            log.warning("demotion of a %d-byte block failed: %s", b.nbytes, e)
            written = False
        with self._lock:
            if b.dead:
                if written and key not in self._blocks:
                    self._ssd.remove(key, tombstone=True)
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
            (self._dram_policy if b.dram is not None else self._ssd_policy).touch(key)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("store is closed")

    @staticmethod
    def _check_keys(keys: Sequence[BlockKey]) -> None:
        for k in keys:
            if not isinstance(k, bytes) or len(k) != KEY_BYTES:
                raise InvalidArgumentError(f"block keys are {KEY_BYTES}-byte bytes, got {k!r:.40}")
