"""The store's put path: reserve room, let the caller fill it, checksum,
move blocks bound for HBM or SSD there, publish."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.buffers import Payload, as_tensor, copy_bytes, nbytes_of
from kvstore.checksum import checksum_extents
from kvstore.errors import (
    ChecksumMismatchError,
    InvalidArgumentError,
    StorageError,
    StoreFullError,
)
from kvstore.keys import BlockKey, ScopedKey, check_per_key, scoped
from kvstore.store.block import Block
from kvstore.store.index import scoped_keys
from kvstore.store.parts import StoreParts
from kvstore.store.plans import BlockWrite, PutPlan
from kvstore.store.space import DECLINED
from kvstore.tier import Tier
from kvstore.tiers.segment import MAX_PAYLOAD

_HBM, _DRAM, _SSD = Tier.HBM, Tier.DRAM, Tier.SSD


class Writer:
    """``TieredStore``'s put, begin_put, commit_put and abort_put (documented there)."""

    def __init__(self, parts: StoreParts) -> None:
        self._p = parts

    def put(
        self,
        keys: Sequence[BlockKey],
        payloads: Sequence[Payload],
        parents: Sequence[BlockKey | None] | None = None,
        *,
        ns_tag: int = 0,
        compress: bool | None = None,
    ) -> list[bool]:
        check_per_key(len(keys), payloads=payloads)
        srcs = [as_tensor(p) for p in payloads]
        plan = self.begin_put(
            keys, [nbytes_of(t) for t in srcs], parents, ns_tag=ns_tag, compress=compress, hbm=True
        )
        try:
            for w in plan.writes:
                copy_bytes(w.buffer, srcs[w.index])
        except BaseException:
            self.abort_put(plan)
            raise
        return self.commit_put(plan)

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
        check_per_key(len(keys), payloads=sizes, parents=parents)
        skeys = scoped_keys(keys, ns_tag)
        sparents = (
            None if parents is None else [None if p is None else scoped(ns_tag, p) for p in parents]
        )
        for n in sizes:
            if not 0 < n <= MAX_PAYLOAD:
                raise InvalidArgumentError(f"block payload of {n} bytes; must be 1..{MAX_PAYLOAD}")
        if compress is None:
            compress = self._p.config.ssd.compression == "lz4"
        plan = PutPlan(len(skeys), sparents, ns_tag, compress)
        space, index = self._p.space, self._p.index
        blocks, pending = index.blocks, index.pending
        alloc = space.dram.allocator.alloc
        pool = space.dram.pool
        use_hbm = hbm and space.hbm is not None
        last = len(skeys) - 1
        # with no SSD to keep a copy, the batch's parents stay while it is placed:
        # dropping one would strand its children
        keep = frozenset(p for p in plan.parents or () if p is not None) if not space.ssd else ()
        with self._p.lock:
            self._p.check_open()
            for i, key in enumerate(skeys):
                if key in blocks or key in pending:
                    self._p.counters.put_duplicates += 1
                    space.touch(key)
                    continue
                nbytes = sizes[i]
                parent = plan.parent(i)
                on_hbm = space.reserve_hbm(nbytes) if use_hbm else None
                offset = None
                if on_hbm is None:
                    # the common case first: the pool has room, nothing to evict
                    offset = alloc(nbytes)
                    if offset is None:
                        offset = space.reserve_dram(nbytes, keep, tail=key if i == last else None)
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
                pending.add(key)
                if on_hbm is not None:
                    w = BlockWrite(i, nbytes, 0, key, parent, _HBM, on_hbm)
                elif offset is not None:
                    w = BlockWrite(i, nbytes, 0, key, parent, _DRAM, offset, pool)
                else:
                    w = BlockWrite(i, nbytes, 0, key, parent)
                plan.writes.append(w)
                index.link(parent, +1)  # from now on, see TierSpace.make_ssd_room
        _give_scratch(plan)
        return plan

    def commit_put(
        self,
        plan: PutPlan,
        *,
        expect: Sequence[int] | None = None,
        digests: Sequence[int] | None = None,
    ) -> list[bool]:
        failure = plan.failure
        done = 0  # writes ready to publish: plan.writes[:done]
        try:
            if digests is None:
                digests = checksum_extents((w.host, w.host_offset, w.nbytes) for w in plan.writes)
            elif len(digests) != len(plan.writes):
                raise InvalidArgumentError(
                    f"{len(digests)} checksums for the plan's {len(plan.writes)} writes"
                )
            if expect is not None:
                bad = [
                    w.index
                    for w, d in zip(plan.writes, digests, strict=True)
                    if d != expect[w.index]
                ]
                if bad:
                    raise ChecksumMismatchError(bad)
            for w, digest in zip(plan.writes, digests, strict=True):
                if w.home is _SSD:
                    try:
                        self._p.write_ssd(w.key, w.buffer, digest, w.parent, plan.compress)
                    except StorageError as e:
                        why = f"DRAM full and SSD write failed: {e}"
                        raise StoreFullError(w.nbytes, why) from e
                elif w.home is _HBM:  # the one host-to-device copy of a put
                    copy_bytes(self._p.space.memory(_HBM).view(w.offset, w.nbytes), w.buffer)
                done += 1
        except StoreFullError as e:
            failure = e
        finally:
            results = [False] * plan.size
            with self._p.lock:
                ready = plan.writes[:done]
                self._publish(ready, (digests or [])[:done], plan.ns_tag, plan.compress)
                self._release(plan.writes[done:])
                self._p.nudge()
            for w in ready:
                results[w.index] = True
        if failure is not None:
            failure.stored = done
            with self._p.lock:
                self._p.counters.put_refused += plan.refused + len(plan.writes) - done
            raise failure
        return results

    def abort_put(self, plan: PutPlan) -> None:
        with self._p.lock:
            self._release(plan.writes)

    def _publish(
        self, writes: Sequence[BlockWrite], digests: Sequence[int], ns_tag: int, compress: bool
    ) -> None:
        """Filled writes become stored blocks (one pass, counted once). Lock held."""
        blocks, pending = self._p.index.blocks, self._p.index.pending
        resident: dict[Tier, list[tuple[ScopedKey, ScopedKey | None]]] = {}
        nbytes = 0
        for w, digest in zip(writes, digests, strict=True):
            home = w.home
            if home is _SSD:
                b = Block(w.parent, w.nbytes, digest, ns_tag, compress, _SSD, -1, True)
            else:
                b = Block(w.parent, w.nbytes, digest, ns_tag, compress, home, w.offset)
            pending.discard(w.key)
            blocks[w.key] = b
            resident.setdefault(home, []).append((w.key, w.parent))
            nbytes += w.nbytes
        for home, items in resident.items():
            self._p.space.policy(home).insert_many(items)
        c = self._p.counters
        c.puts += len(writes)
        c.put_bytes += nbytes
        c.account(ns_tag, nbytes, len(writes))

    def _release(self, writes: Sequence[BlockWrite]) -> None:
        """Give back unpublished writes' reservations. Lock held."""
        for w in writes:
            self._p.index.link(w.parent, -1)
            self._p.index.pending.discard(w.key)
            if w.home.in_memory:
                self._p.space.memory(w.home).free(w.offset)
                w.home, w.offset = Tier.SSD, -1


def _give_scratch(plan: PutPlan) -> None:
    """One host buffer for every write not landing in the DRAM pool, so a
    node registers it with its transfer engine once."""
    spill = [w for w in plan.writes if w.pool_offset is None]
    if not spill:
        return
    plan.scratch = torch.empty(sum(w.nbytes for w in spill), dtype=torch.uint8)
    at = 0
    for w in spill:
        w.host, w.scratch_offset = plan.scratch, at
        at += w.nbytes
