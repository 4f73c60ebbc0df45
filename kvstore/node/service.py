"""The KVStore gRPC service: each call checked, authorised, then run on the store.

Large payloads never ride in messages: the client names regions of its own
transfer engine (``BlockRefs``), and the node moves the bytes with one batch
of its engine, straight between those regions and its DRAM pool (the pool is
registered whole). A put reserves pool extents first (``begin_put``), reads
into them, then checksums and publishes; a get pins blocks (``begin_read``)
and writes them out before unpinning. So each hop copies a payload once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from kvstore.buffers import byte_ranges
from kvstore.checksum import checksum_extents
from kvstore.cluster.directory import Holder
from kvstore.cluster.membership import Membership
from kvstore.config import StoreConfig
from kvstore.errors import (
    InvalidArgumentError,
    NodeBusyError,
    PayloadSizeError,
    PermissionDeniedError,
    RegionError,
    ReplyTooLargeError,
)
from kvstore.keys import (
    KEY_BYTES,
    BlockKey,
    Namespace,
    ScopedKey,
    block_keys,
    check_per_key,
    salted_root,
)
from kvstore.node.auth import Authorizer, Tenants
from kvstore.node.calls import CallCounts
from kvstore.node.namespaces import NamespaceRegistry
from kvstore.proto import kvstore_pb2 as pb
from kvstore.store import BlockRead, BlockWrite, PutPlan, ReadPlan, TieredStore
from kvstore.store.index import scoped_keys
from kvstore.version import VERSION
from kvstore.wire import (
    COMPRESS_OF,
    MESSAGE_SLACK,
    TIER_CODES,
    locate_reply,
    namespace_from_spec,
    pack_flags,
    region_from_pb,
    unpack_keys,
    unpack_parents,
)
from transfer import Batch, Op, Region, RegionDesc, Transfer, TransferEngine

log = logging.getLogger(__name__)

# fills a put plan's buffers with the payload; returns each write's checksum
# where it took them as the bytes arrived (else None: the store takes them)
Fill = Callable[[PutPlan], list[int] | None]
Source = Callable[[list[int]], Fill]  # a put's checked sizes -> its Fill (checks first)
Send = Callable[[Any, list[np.ndarray]], None]  # a GetReply and its blocks' bytes, sent


class ScratchBudget:
    """Bytes of host memory calls may allocate beside the pool, all calls
    together: reserved before a call reads a byte, returned when it ends."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.used = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, n: int, what: str) -> Iterator[None]:
        if n > self.nbytes:
            raise InvalidArgumentError(
                f"{what} needs {n} bytes of scratch memory; the node allows {self.nbytes} "
                "per call (server.scratch_memory): split the batch"
            )
        with self._lock:
            if self.used + n > self.nbytes:
                raise NodeBusyError(
                    f"{what} needs {n} bytes of scratch memory and {self.nbytes - self.used} "
                    "are free; try again shortly"
                )
            self.used += n
        try:
            yield
        finally:
            with self._lock:
                self.used -= n


class KVStoreService:
    """One handler per RPC, each ``(request, tenants) -> reply``; the server
    wraps them with authentication, error mapping and counting."""

    def __init__(
        self,
        store: TieredStore,
        engine: TransferEngine | None,
        config: StoreConfig,
        registry: NamespaceRegistry,
        node: str,
    ) -> None:
        self.store = store
        self.engine = engine
        self.config = config
        self.registry = registry
        self.node = node
        self.auth = Authorizer(config.server)
        self.started = time.monotonic()
        self.draining = False
        self.counts = CallCounts(detail=config.metrics.enabled)
        self.membership: Membership | None = None  # set by a node in a cluster
        self.data_port = 0  # set by a node that serves one (kvstore.dataport)
        self.scratch = ScratchBudget(config.server.scratch_memory)
        self._pool: Region | None = None
        self._pool_bytes = store.dram_pool.numpy()  # what the data port sends from
        if engine is not None:
            self._pool = engine.register(store.dram_pool)
            self._pool_base = store.dram_pool.data_ptr()
        for ns in registry.all():
            store.open_namespace(ns)

    # -- namespaces --------------------------------------------------------------

    def OpenNamespace(self, req: pb.OpenNamespaceRequest, tenants: Tenants) -> Any:
        ns = namespace_from_spec(req.spec)
        self.auth.check(tenants, ns)
        if self.registry.open(ns):
            log.info("namespace %s opened (%s)", ns.name, ns.root.hex())
        self.store.open_namespace(ns)
        return pb.OpenNamespaceReply(
            namespace_id=ns.root, block_nbytes=ns.layout.block_nbytes, name=ns.name
        )

    def _namespace(self, namespace_id: bytes, tenants: Tenants) -> Namespace:
        ns = self.registry.get(namespace_id)
        self.auth.check(tenants, ns)
        return ns

    # -- put ---------------------------------------------------------------------

    def Put(self, req: pb.PutRequest, tenants: Tenants) -> Any:
        if req.WhichOneof("payload") == "refs":
            return self.put(req, tenants, *self.pulled(req))

        def inline(sizes: list[int]) -> Fill:
            if len(req.inline) != sum(sizes):
                raise PayloadSizeError(sum(sizes), len(req.inline), what="inline payload")
            offsets = _offsets(sizes)
            return lambda plan: _fill_inline(plan.writes, req.inline, offsets)

        return self.put(req, tenants, inline, "grpc")

    def pulled(self, req: pb.PutRequest) -> tuple[Source, str]:
        """The source of a put whose request names the client's regions (the
        engine pulls from them), and how its bytes move."""

        def source(sizes: list[int]) -> Fill:
            refs = self._refs(req.refs, sizes)
            return lambda plan: self._pull(plan, refs)

        return source, self._via(req.refs)

    def put(self, req: pb.PutRequest, tenants: Tenants, source: Source, via: str) -> Any:
        """A put whose bytes come from ``source``: given the checked sizes, it
        checks what it can before anything is reserved, and returns what
        fills the plan's buffers (from a client's regions, the message, or
        the data port's socket)."""
        ns = self._namespace(req.namespace_id, tenants)
        keys = unpack_keys(req.keys)
        n = len(keys)
        parents = unpack_parents(req.parents, n)
        sizes = list(req.sizes)
        _check_sizes(ns, sizes, n)
        expect = list(req.checksums) or None
        check_per_key(n, checksums=expect)
        fill = source(sizes)
        plan = self.store.begin_put(
            keys,
            sizes,
            parents,
            ns_tag=ns.tag,
            compress=COMPRESS_OF.get(req.compression),
            hbm=True,
        )
        try:
            spill = 0 if plan.scratch is None else plan.scratch.numel()
            with self.scratch.hold(spill, "this put"):
                digests = fill(plan)
        except BaseException:
            self.store.abort_put(plan)
            raise
        self.counts.moved("in", via, sum(w.nbytes for w in plan.writes))
        try:
            stored = self.store.commit_put(plan, expect=expect, digests=digests)
        finally:
            if self.membership is not None:  # what went in, even when the put stopped early
                self.membership.stored(keys, ns.tag)
        return pb.PutReply(stored=pack_flags(stored))

    def _pull(self, plan: PutPlan, refs: list[tuple[RegionDesc, int]]) -> list[int]:
        """Read each write's bytes from the client's regions into its buffer
        (the DRAM pool, or the plan's scratch, registered for this call),
        checksumming each part (``server.pull_part``) while the next crosses."""
        assert self.engine is not None and self._pool is not None
        scratch = self.engine.register(plan.scratch) if plan.scratch is not None else None
        try:
            transfers: list[Transfer] = []
            for w in plan.writes:
                desc, offset = refs[w.index]
                if w.pool_offset is not None:
                    local, local_offset = self._pool, w.pool_offset
                else:
                    assert scratch is not None
                    local, local_offset = scratch, w.scratch_offset
                transfers.append(Transfer(Op.READ, local, desc, w.nbytes, local_offset, offset))
            extents = [(w.host, w.host_offset, w.nbytes) for w in plan.writes]
            return _moved_and_hashed(self.engine, transfers, extents, self.config.server.pull_part)
        finally:
            if scratch is not None:
                self.engine.unregister(scratch)

    # -- get ---------------------------------------------------------------------

    def Get(self, req: pb.GetRequest, tenants: Tenants) -> Any:
        ns, keys, sizes = self._get_args(req, tenants)
        refs = None
        if req.HasField("dest"):
            if sizes is None:
                raise InvalidArgumentError("a get into regions needs the destination sizes")
            refs = self._refs(req.dest, sizes)
        plan = self.store.begin_read(keys, prefix=req.prefix, ns_tag=ns.tag, sizes=sizes)
        try:
            if refs is None:  # checked before a byte is read
                total = sum(r.nbytes for r in plan.reads)
                limit = self.config.server.max_message - MESSAGE_SLACK
                if total > limit:
                    raise ReplyTooLargeError(
                        f"an answer of {total} bytes exceeds the {limit}-byte message limit: "
                        "use BatchGet"
                    )
            with self.scratch.hold(_scratch_of(plan), "this get"):
                if refs is not None:
                    self._push(plan, refs, req.prefix)
                    self.counts.moved("out", self._via(refs), _served(plan))
                    return _reply(plan, 0, len(keys))
                srcs = [src for _, src in _read_all(self.store, plan, req.prefix)]
                self.counts.moved("out", "grpc", sum(s.numel() for s in srcs))
                return _reply(plan, 0, len(keys), srcs)
        finally:
            self.store.end_read(plan)

    def get_sent(self, req: pb.GetRequest, tenants: Tenants, send: Send, via: str) -> None:
        """A get whose found blocks ``send`` writes out after the reply, as
        views of the pool (or of an SSD read's buffer), while they are pinned."""
        ns, keys, sizes = self._get_args(req, tenants)
        if req.HasField("dest"):
            raise InvalidArgumentError("a get on the data port answers inline, not into regions")
        plan = self.store.begin_read(keys, prefix=req.prefix, ns_tag=ns.tag, sizes=sizes)
        try:
            with self.scratch.hold(_scratch_of(plan), "this get"):
                views: list[np.ndarray] = []
                pool = self._pool_bytes
                start = end = -1  # the run of adjacent pool extents so far
                for r, src in self._sources(plan, req.prefix):
                    if isinstance(src, int) and src == end:
                        end += r.nbytes
                        continue
                    if end >= 0:
                        views.append(pool[start:end])
                    if isinstance(src, int):
                        start, end = src, src + r.nbytes
                    else:
                        start = end = -1
                        views.append(src.numpy())
                if end >= 0:
                    views.append(pool[start:end])
                send(_reply(plan, 0, len(keys)), views)
            self.counts.moved("out", via, _served(plan))
        except BaseException:
            for r in plan.reads:
                r.ok = False
            raise
        finally:
            self.store.end_read(plan)

    def _get_args(
        self, req: pb.GetRequest, tenants: Tenants
    ) -> tuple[Namespace, list[BlockKey], list[int] | None]:
        ns = self._namespace(req.namespace_id, tenants)
        keys = unpack_keys(req.keys)
        return ns, keys, _destination_sizes(ns, req, len(keys))

    def _sources(
        self, plan: ReadPlan, prefix: bool
    ) -> Iterator[tuple[BlockRead, int | torch.Tensor]]:
        """Each readable block of ``plan`` and where its bytes are: a DRAM
        pool offset (no tensor made), else a tensor (with ``prefix``, up to
        the first block found damaged)."""
        for r in plan.reads:
            at = self.store.dram_extent(r)
            if at is not None:
                yield r, at
                continue
            src = self.store.read_block(r)
            if src is None:
                if prefix:
                    return
                continue
            yield r, src

    def _push(self, plan: ReadPlan, refs: list[tuple[RegionDesc, int]], prefix: bool) -> None:
        """Write every readable block of ``plan`` into the client's regions."""
        assert self.engine is not None and self._pool is not None
        transfers: list[Transfer] = []
        scratch: list[Region] = []
        pool, write = self._pool, Op.WRITE
        try:
            for r, src in self._sources(plan, prefix):
                desc, offset = refs[r.index]
                if isinstance(src, int):  # the common case, without a tensor per block
                    transfers.append(Transfer(write, pool, desc, r.nbytes, src, offset))
                    continue
                local, local_offset = self._local(src, scratch)
                transfers.append(Transfer(write, local, desc, r.nbytes, local_offset, offset))
            if transfers:
                self.engine.transfer(transfers)
        except BaseException:
            for r in plan.reads:
                r.ok = False
            raise
        finally:
            for region in scratch:
                self.engine.unregister(region)

    def _local(self, src: torch.Tensor, scratch: list[Region]) -> tuple[Region, int]:
        """``src`` as (registered region, offset): a pool view, or a one-off
        registration of an SSD read's staging buffer."""
        assert self.engine is not None and self._pool is not None
        offset = src.data_ptr() - self._pool_base
        if offset >= 0 and offset + src.numel() <= self._pool.nbytes:
            return self._pool, offset
        region = self.engine.register(src)
        scratch.append(region)
        return region, 0

    def BatchGet(self, req: pb.GetRequest, tenants: Tenants) -> Iterator[Any]:
        ns, keys, sizes = self._get_args(req, tenants)
        if req.HasField("dest"):
            raise InvalidArgumentError("BatchGet answers inline; use Get to fill regions")
        per_message = (self.config.server.max_message - MESSAGE_SLACK) // ns.layout.block_nbytes
        step = max(1, per_message)
        for first in range(0, len(keys), step):
            part = keys[first : first + step]
            plan = self.store.begin_read(
                part,
                prefix=req.prefix,
                ns_tag=ns.tag,
                sizes=None if sizes is None else sizes[first : first + step],
            )
            try:
                with self.scratch.hold(_scratch_of(plan), "this get"):
                    srcs = [src for _, src in _read_all(self.store, plan, req.prefix)]
                    reply = _reply(plan, first, len(part), srcs)
                self.counts.moved("out", "grpc", sum(s.numel() for s in srcs))
            finally:
                self.store.end_read(plan)
            yield reply
            if req.prefix and not all(plan.results()):
                return

    # -- metadata ----------------------------------------------------------------

    def Lookup(self, req: pb.LookupRequest, tenants: Tenants) -> Any:
        ns = self._namespace(req.namespace_id, tenants)
        tiers = self.store.locate_scoped(_query_keys(req, ns), ns_tag=ns.tag)
        return pb.LookupReply(
            hit_blocks=len(tiers),
            hit_tokens=len(tiers) * ns.layout.block_size,
            tiers=bytes(map(TIER_CODES.__getitem__, tiers)),
            node=self.node,
        )

    def Locate(self, req: pb.LocateRequest, tenants: Tenants) -> Any:
        ns = self._namespace(req.namespace_id, tenants)
        keys = block_keys(ns, _tokens(req.tokens), start=salted_root(ns, req.salt))
        bs = ns.layout.block_size
        if self.membership is not None:
            found = self.membership.locate(keys, bs)
        else:  # alone: this node's own leading run (not counted as a lookup)
            tiers = self.store.locate(keys, ns_tag=ns.tag, count=False)
            found = [Holder(self.node, "", "", tuple(tiers), bs)] if tiers else []
        return locate_reply(found, bs)

    def Exists(self, req: pb.KeysRequest, tenants: Tenants) -> Any:
        ns = self._namespace(req.namespace_id, tenants)
        found = self.store.exists(unpack_keys(req.keys), ns_tag=ns.tag)
        return pb.ExistsReply(found=pack_flags(found))

    def Delete(self, req: pb.KeysRequest, tenants: Tenants) -> Any:
        ns = self._namespace(req.namespace_id, tenants)
        deleted = self.store.delete(unpack_keys(req.keys), ns_tag=ns.tag)
        if self.membership is not None:
            self.membership.removed()
        return pb.DeleteReply(deleted=deleted)

    def Stats(self, req: pb.StatsRequest, tenants: Tenants) -> Any:
        return pb.StatsReply(json=json.dumps(self.snapshot(tenants)))

    def snapshot(self, tenants: Tenants = None) -> dict[str, Any]:
        """Everything the node counts, as ``Stats`` returns it (and ``/metrics``
        exports it); ``tenants`` limits the namespaces shown."""
        stats = self.store.stats().as_dict()
        names = {f"{ns.tag:08x}": ns for ns in self.registry.all()}
        visible = {}
        for tag, entry in stats["namespaces"].items():
            ns = names.get(tag)
            if tenants is not None and (ns is None or ns.tenant not in tenants):
                continue  # a tenant sees only its own namespaces
            entry["id"] = ns.root.hex() if ns is not None else ""
            visible[tag] = entry
        stats["namespaces"] = visible
        service = {
            "node": self.node,
            "version": VERSION,
            "uptime_s": time.monotonic() - self.started,
            "transfer_backend": self.engine.backend if self.engine else "",
            "data_port": self.data_port,
            **self.counts.snapshot(),
        }
        m = self.membership
        if m is not None:
            service["cluster"] = {
                "directory": m.directory.url,
                "reachable": m.reachable,
                "failures": m.failures,
                "republished": m.republished,
            }
        return {"store": stats, "service": service}

    def Health(self, req: pb.HealthRequest, tenants: Tenants) -> Any:
        status = pb.HealthReply.DRAINING if self.draining else pb.HealthReply.SERVING
        return pb.HealthReply(
            status=status,
            node=self.node,
            version=VERSION,
            transfer_backend=self.engine.backend if self.engine else "",
            max_message=self.config.server.max_message,
            inline_max=self.config.server.inline_max,
            uptime_s=time.monotonic() - self.started,
            data_port=self.data_port,
            stream_max=self.config.server.stream_max,
        )

    # -- checks --------------------------------------------------------------------

    def _refs(self, refs: pb.BlockRefs, sizes: Sequence[int]) -> list[tuple[RegionDesc, int]]:
        """(region, offset) per block, checked against the regions' bounds."""
        if self.engine is None:
            raise InvalidArgumentError("this node moves payloads only inline")
        descs = [region_from_pb(r) for r in refs.regions]
        for d in descs:
            if d.backend != self.engine.backend:
                raise InvalidArgumentError(
                    f"region {d.endpoint} is {d.backend}; this node's transfer engine is "
                    f"{self.engine.backend}"
                )
            if d.endpoint == self.engine.endpoint:
                # the node grants nothing, so its engine would refuse anyway
                raise PermissionDeniedError("a region must be the caller's, not this node's")
        n = len(sizes)
        if len(refs.region_index) != n or len(refs.offsets) != n:
            raise InvalidArgumentError(
                f"{n} blocks but {len(refs.region_index)} region indices and "
                f"{len(refs.offsets)} offsets"
            )
        out = []
        for i, (ri, off, size) in enumerate(
            zip(refs.region_index, refs.offsets, sizes, strict=True)
        ):
            if ri >= len(descs):
                raise RegionError(f"block {i} names region {ri} of {len(descs)}")
            if off + size > descs[ri].nbytes:
                raise RegionError(
                    f"block {i}: bytes [{off}, {off + size}) outside its region of "
                    f"{descs[ri].nbytes} bytes"
                )
            out.append((descs[ri], off))
        return out

    def _via(self, refs: object) -> str:
        return "grpc" if refs is None or self.engine is None else self.engine.backend

    def close(self) -> None:
        if self.engine is not None:
            if self._pool is not None:
                self.engine.unregister(self._pool)
            self.engine.close()


def _moved_and_hashed(
    engine: TransferEngine,
    transfers: list[Transfer],
    extents: list[tuple[torch.Tensor, int, int]],
    part: int,
) -> list[int]:
    """Run ``transfers`` and return the checksum of each one's landed bytes
    (``extents``): cut into parts of ``part`` bytes (0: one part), two in
    flight, so a part is hashed while the next crosses. Every part has
    finished when this returns, failed or not: the caller frees the memory
    they land in."""
    parts = list(byte_ranges([t.length for t in transfers], part or 1 << 62))
    if len(parts) == 1:
        if transfers:
            engine.transfer(transfers)
        return checksum_extents(extents)
    pending = iter(parts)
    flying: deque[tuple[tuple[int, int], Batch]] = deque()

    def launch() -> None:
        part = next(pending, None)
        if part is not None:
            flying.append((part, engine.submit(transfers[part[0] : part[1]])))

    digests: list[int] = []
    try:
        launch()
        launch()
        while flying:
            (a, b), batch = flying[0]
            batch.wait().raise_for_status()
            flying.popleft()
            launch()
            digests += checksum_extents(extents[a:b])
    finally:
        for _, batch in flying:
            with contextlib.suppress(Exception):
                batch.wait()
    return digests


def _scratch_of(plan: ReadPlan) -> int:
    """Host bytes a read allocates: SSD hits that do not land in the pool."""
    return sum(r.nbytes for r in plan.reads if r.needs_scratch)


def _served(plan: ReadPlan) -> int:
    return sum(r.nbytes for r in plan.reads if r.ok)


def _check_sizes(ns: Namespace, sizes: Sequence[int], n: int) -> None:
    check_per_key(n, sizes=sizes)
    want = ns.layout.block_nbytes
    for i, s in enumerate(sizes):
        if s != want:
            raise PayloadSizeError(want, s, what=f"block {i} of namespace {ns.name}")


def _destination_sizes(ns: Namespace, req: pb.GetRequest, n: int) -> list[int] | None:
    """A get's destination sizes, checked, or None where the caller sent none."""
    sizes = list(req.sizes) or None
    if sizes is not None:
        _check_sizes(ns, sizes, n)
    return sizes


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, at = [], 0
    for s in sizes:
        out.append(at)
        at += s
    return out


def _fill_inline(writes: Sequence[BlockWrite], inline: bytes, offsets: list[int]) -> None:
    """Copy each write's bytes out of the message into its buffer."""
    data = np.frombuffer(inline, dtype=np.uint8)
    for w in writes:
        w.buffer.numpy()[:] = data[offsets[w.index] : offsets[w.index] + w.nbytes]


def _read_all(
    store: TieredStore, plan: ReadPlan, prefix: bool
) -> list[tuple[BlockRead, torch.Tensor]]:
    """Each readable block of ``plan`` with its bytes (with ``prefix``, up to
    the first damaged one)."""
    out = []
    for r in plan.reads:
        src = store.read_block(r)
        if src is None:
            if prefix:
                break
            continue
        out.append((r, src))
    return out


def _reply(plan: ReadPlan, first: int, n: int, srcs: Sequence[torch.Tensor] | None = None) -> Any:
    ok: list[BlockRead | None] = [None] * n
    for r in plan.reads:
        if r.ok:
            ok[r.index] = r
    inline = b""
    if srcs:
        buf = np.empty(sum(s.numel() for s in srcs), dtype=np.uint8)
        at = 0
        for s in srcs:
            buf[at : at + s.numel()] = s.numpy()
            at += s.numel()
        inline = buf.tobytes()
    return pb.GetReply(
        first=first,
        found=pack_flags([r is not None for r in ok]),
        sizes=[r.nbytes if r else 0 for r in ok],
        checksums=[r.checksum if r else 0 for r in ok],
        inline=inline,
    )


def _query_keys(req: pb.LookupRequest, ns: Namespace) -> list[ScopedKey]:
    """A lookup's keys in the index's form: sent as keys, or as tokens the
    node keys and scopes in one C pass."""
    if req.WhichOneof("query") != "tokens":
        return scoped_keys(unpack_keys(req.keys), ns.tag)
    if req.start and len(req.start) != KEY_BYTES:
        raise InvalidArgumentError(f"start must be a {KEY_BYTES}-byte key")
    return block_keys(ns, _tokens(req.tokens), start=req.start or None, scoped=True)


def _tokens(raw: bytes) -> np.ndarray:
    if len(raw) % 4:
        raise InvalidArgumentError("tokens must be little-endian uint32s (4 bytes each)")
    return np.frombuffer(raw, dtype="<u4")
