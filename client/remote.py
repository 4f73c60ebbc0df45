"""A store node reached over gRPC and its data port, with the same API as
the in-process store.

Batches ride the node's data port (request, reply and bytes in one round
trip on a kept-open socket) where it has one: every batch over tcp, those up
to ``ENGINE_FROM`` over shm and ucx. Larger ones there, and those of a node
without a port past ``inline_max``, move over a transfer engine of the
node's backend: the client names where each block lives in memory it
registered, and the node reads (put) or writes (get) those bytes directly.
Buffers from ``alloc`` are registered once and move with no extra copy;
other contiguous CPU buffers are registered per call (ucx, tcp) or bounced
through a staging buffer (shm, which needs ``/dev/shm`` memory). Smaller
batches of a node without a port ride in the gRPC messages. Over network
backends every payload's XXH3 is checked on arrival.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from client.blockstore import opened
from kvstore.buffers import (
    Payload,
    adjacent_run,
    as_tensor,
    byte_ranges,
    contiguous_bytes,
    copy_bytes,
    flat_bytes,
    nbytes_of,
)
from kvstore.checksum import ArrivalDigests, checksum, checksum_extents
from kvstore.cluster.directory import Holder
from kvstore.dataport import DataPortClient, PutBlocks
from kvstore.errors import (
    BackendUnavailableError,
    ConfigError,
    DataPortRefusedError,
    PeerError,
    StoreFullError,
)
from kvstore.keys import BlockKey, Namespace, check_per_key
from kvstore.proto import kvstore_pb2 as pb
from kvstore.rpc import DEFAULT_URL, Connection
from kvstore.stats import StoreStats
from kvstore.wire import (
    COMPRESSION_CODES,
    MESSAGE_SLACK,
    TIER_NAMES,
    namespace_spec,
    pack_keys,
    pack_parents,
    region_to_pb,
    reply_holders,
    unpack_flags,
)
from transfer import Region, RegionDesc, TransferConfig, TransferEngine, make_engine

log = logging.getLogger(__name__)

MiB = 1 << 20
NETWORK_BACKENDS = ("tcp", "ucx")
# A block this size or larger is registered where it lies for the call (no
# copy); a smaller one is copied through the staging buffer, one grant for all
# of them: registering, granting, revoking and unregistering cost more than
# copying a few KiB, and every region is one more descriptor for the node.
REGISTER_IN_PLACE_FROM = 256 << 10
# Past this many bytes a batch takes an shm or ucx engine rather than the data
# port: one maps the node's pool, the other moves bytes without a socket, and
# both then beat it. A tcp engine is a socket too, with a second conversation
# and grants on top and the hashing after the bytes: over tcp every batch
# takes the port (64 x 2 MiB: 1.3x the engine's put and get, docs/performance.md).
ENGINE_FROM = 16 * MiB
PORT, ENGINE, INLINE = "data port", "engine", "inline"  # how one call's payload moves


@dataclass
class _Unit:
    """Bytes of a batch that move as one span: a run of blocks lying back to
    back in the caller's memory, or one block."""

    src: torch.Tensor  # the caller's bytes (flat uint8 for a run)
    blocks: range  # the batch's blocks in it, in order
    sizes: list[int]
    landed: torch.Tensor | None = None  # flat: where its bytes sit in registered memory


@dataclass
class _Landing:
    """Where a batch's blocks sit in registered memory for one call."""

    refs: pb.BlockRefs
    units: list[_Unit]
    ok: list[bool] | None = None  # a get's blocks that arrived intact

    def digests(self, n: int) -> list[int]:
        """Each block's checksum, as it lies in registered memory."""
        order: list[int] = []
        extents: list[tuple[torch.Tensor, int, int]] = []
        for u in self.units:
            assert u.landed is not None
            at = 0
            for i, size in zip(u.blocks, u.sizes, strict=True):
                order.append(i)
                extents.append((u.landed, at, size))
                at += size
        out = [0] * n
        for i, d in zip(order, checksum_extents(extents), strict=True):  # one batch: every core
            out[i] = d
        return out


class RegisteredMemory:
    """A client's transfer engine and the buffers ``alloc`` registered with
    it: one per remote store, or one shared by every node a cluster client
    talks to (so an ``alloc`` buffer moves without a bounce to any of them)."""

    def __init__(self, engine: TransferEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._buffers: list[tuple[int, int, Region]] = []  # (start, end, region)

    @classmethod
    def open(
        cls, transfer: TransferConfig | str | None, backend: str, url: str
    ) -> RegisteredMemory | None:
        """An engine for a node whose backend is ``backend``; None: payloads
        ride in gRPC messages (asked for, or the backend cannot run here)."""
        if transfer == "none" or not backend:
            return None
        config = transfer if isinstance(transfer, TransferConfig) else TransferConfig(backend)
        if isinstance(transfer, str):
            config = TransferConfig.from_url(transfer)
        if config.backend != backend:
            raise ConfigError(
                f"the node at {url} moves payloads over {backend}, not {config.backend}"
            )
        try:
            return cls(make_engine(config))
        except BackendUnavailableError as e:
            log.warning("payloads to %s will ride in gRPC messages: %s", url, e)
            return None

    def alloc(self, nbytes: int) -> torch.Tensor:
        region = self.engine.alloc(nbytes)
        start = int(region.view.__array_interface__["data"][0])
        with self._lock:
            self._buffers.append((start, start + nbytes, region))
        return torch.from_numpy(region.view)

    def find(self, flat: torch.Tensor) -> tuple[Region, int] | None:
        """The registered region holding ``flat``, and its offset there."""
        start = flat.data_ptr()
        end = start + flat.numel()
        with self._lock:
            for lo, hi, region in self._buffers:
                if lo <= start and end <= hi:
                    return region, start - lo
        return None

    def close(self) -> None:
        self.engine.close()


class RemoteStore:
    """Thread-safe. ``transfer``: None follows the node's backend (falling back
    to inline messages where that backend cannot run here), "none" forces
    inline, or a ``TransferConfig`` (its ``host`` must be reachable from the
    node). ``memory``: an engine shared with other stores (kept open at
    ``close``), used when its backend is the node's. ``call_bytes``: the
    most payload one call moves over the engine (a larger batch takes several
    calls; the staging buffer grows to what one call needs). ``data_port``:
    send batches over the node's data port (one round trip a call of up to
    its ``stream_max``, bytes and all) where it has one and ``transfer`` is
    not "none" (which keeps every call on gRPC); over shm and ucx a batch
    past ``ENGINE_FROM`` takes the engine instead."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        transfer: TransferConfig | str | None = None,
        call_bytes: int = 256 * MiB,
        timeout: float = 60.0,
        verify: bool | None = None,
        memory: RegisteredMemory | None = None,
        data_port: bool = True,
    ) -> None:
        self.url = url
        self.rpc = Connection(url, token=token, timeout=timeout)
        self._namespaces: dict[int, bytes] = {}
        self.checksum_failures = 0  # blocks that arrived damaged (counted as misses)
        self.port_refusals = 0  # data-port calls that found no connection and went over gRPC
        self._lock = threading.Lock()  # guards the staging buffer (held for a call)
        self._count_lock = threading.Lock()
        self._staging: Region | None = None
        self._call_bytes = call_bytes
        try:
            health = self.call("Health", pb.HealthRequest())
            self.node = health.node
            self.max_message = int(health.max_message)
            self.inline_max = int(health.inline_max)
            self.stream_max = int(health.stream_max)
            self._data = None
            if data_port and transfer != "none" and health.data_port:
                self._data = self._open_data_port(int(health.data_port), timeout)
            self._owns_memory = memory is None or memory.engine.backend != health.transfer_backend
            if self._owns_memory:
                memory = RegisteredMemory.open(transfer, health.transfer_backend, url)
        except BaseException:
            self.rpc.close()
            raise
        self._memory = memory
        self.engine = memory.engine if memory is not None else None
        backend = self.engine.backend if self.engine else ""
        self.verify = backend in NETWORK_BACKENDS if verify is None else verify

    def call(self, method: str, request: Any) -> Any:
        return self.rpc.call(method, request)

    def _open_data_port(self, port: int, timeout: float) -> DataPortClient | None:
        """The node's data port, tried once; None where it cannot be reached
        from here (a firewall or NAT that lets only the gRPC port through):
        every batch then keeps to gRPC and the engine, as before it existed."""
        host = self.rpc.target.rpartition(":")[0].strip("[]")
        data = DataPortClient(
            host, port, token=self.rpc.token, timeout=timeout, max_body=self.max_message
        )
        try:
            data.connect()
        except DataPortRefusedError as e:
            data.close()
            log.warning(
                "the data port of %s (%s:%d) cannot be reached (%s); calls keep to gRPC",
                self.url,
                host,
                port,
                e,
            )
            return None
        return data

    # -- the BlockStore API ------------------------------------------------------

    def open_namespace(self, namespace: Namespace) -> None:
        reply = self.call("OpenNamespace", pb.OpenNamespaceRequest(spec=namespace_spec(namespace)))
        self._namespaces[namespace.tag] = reply.namespace_id

    def _nsid(self, ns_tag: int | None) -> bytes:
        return opened(self._namespaces, ns_tag, "remote")

    def put(
        self,
        keys: Sequence[BlockKey],
        payloads: Sequence[Payload],
        parents: Sequence[BlockKey | None] | None = None,
        *,
        ns_tag: int = 0,
        compress: bool | None = None,
    ) -> list[bool]:
        check_per_key(len(keys), payloads=payloads, parents=parents)
        nsid = self._nsid(ns_tag)
        srcs = [as_tensor(p) for p in payloads]
        results: list[bool] = []
        sizes = [nbytes_of(t) for t in srcs]
        mode, calls = self._plan(sizes, put=True)
        for a, b in calls:
            req = pb.PutRequest(
                namespace_id=nsid,
                keys=pack_keys(keys[a:b]),
                parents=pack_parents(None if parents is None else parents[a:b]),
                sizes=sizes[a:b],
                compression=COMPRESSION_CODES[compress],
            )
            try:
                results += self._put_chunk(req, srcs[a:b], mode)
            except StoreFullError as e:
                e.stored += sum(results)
                raise
        return results

    def _put_chunk(self, req: pb.PutRequest, srcs: list[torch.Tensor], mode: str) -> list[bool]:
        if mode == PORT:
            assert self._data is not None
            put = PutBlocks(
                list(req.sizes),
                lambda: _host_views(srcs, req.sizes)[0],
                checksummed=self.verify,  # checksums taken as the blocks go out
            )
            try:
                return unpack_flags(self._data.call("Put", req, put=put).stored)
            except DataPortRefusedError as e:
                mode = self._refused(e, sum(req.sizes))
        if mode == INLINE:
            flats = [flat_bytes(t) for t in srcs]
            if self.verify:
                req.checksums.extend(checksum(f) for f in flats)
            req.inline = b"".join(f.numpy().tobytes() for f in flats)
            return unpack_flags(self.call("Put", req).stored)
        with self._landing(srcs, incoming=False) as land:
            req.refs.CopyFrom(land.refs)
            if self._data is not None:  # the request first: the node pulls while this hashes
                hashes = (lambda: land.digests(len(srcs))) if self.verify else None
                try:
                    engine_put = PutBlocks(list(req.sizes), None, checksums=hashes)
                    return unpack_flags(self._data.call("Put", req, put=engine_put).stored)
                except DataPortRefusedError as e:
                    self._refused(e, 0)
            if self.verify:
                req.checksums.extend(land.digests(len(srcs)))
            return unpack_flags(self.call("Put", req).stored)

    def get_into(
        self,
        keys: Sequence[BlockKey],
        dsts: Sequence[Payload],
        *,
        prefix: bool = True,
        ns_tag: int | None = None,
    ) -> list[bool]:
        check_per_key(len(keys), destinations=dsts)
        nsid = self._nsid(ns_tag)
        outs = [as_tensor(d, writable=True) for d in dsts]
        results: list[bool] = []
        sizes = [nbytes_of(t) for t in outs]
        mode, calls = self._plan(sizes, put=False)
        for a, b in calls:
            req = pb.GetRequest(
                namespace_id=nsid,
                keys=pack_keys(keys[a:b]),
                prefix=prefix,
                sizes=sizes[a:b],
            )
            part = self._get_chunk(req, outs[a:b], mode)
            results += part
            if prefix and not all(part):
                break
        return results + [False] * (len(keys) - len(results))

    def _get_chunk(self, req: pb.GetRequest, outs: list[torch.Tensor], mode: str) -> list[bool]:
        if mode == PORT:
            try:
                return leading_if(self._get_port(req, outs), req.prefix)
            except DataPortRefusedError as e:
                mode = self._refused(e, sum(req.sizes))
        if mode == INLINE:
            method = "Get" if sum(req.sizes) <= self.inline_max or self.engine else "BatchGet"
            replies = (
                [self.call("Get", req)] if method == "Get" else self.rpc.stream("BatchGet", req)
            )
            found = [False] * len(outs)
            for reply in replies:
                data = np.frombuffer(reply.inline, dtype=np.uint8)
                at = 0
                for j, (hit, size) in enumerate(zip(reply.found, reply.sizes, strict=True)):
                    if not hit:
                        continue
                    i = reply.first + j
                    src = torch.from_numpy(data[at : at + size].copy())
                    at += size
                    found[i] = self._arrived(src, reply.checksums[j])
                    if found[i]:
                        copy_bytes(outs[i], src)
            return leading_if(found, req.prefix)
        with self._landing(outs, incoming=True) as land:
            req.dest.CopyFrom(land.refs)
            reply = self.call("Get", req)
            found = unpack_flags(reply.found)
            if self.verify and any(found):
                digests = land.digests(len(outs))
                for i, hit in enumerate(found):
                    if hit and digests[i] != reply.checksums[i]:
                        found[i] = False
                        self._damaged()
            land.ok = found
        return leading_if(found, req.prefix)

    def _get_port(self, req: pb.GetRequest, outs: list[torch.Tensor]) -> list[bool]:
        """A get on the data port: the found blocks are received straight into
        the caller's buffers (CPU and contiguous; others through a copy)."""
        assert self._data is not None
        views, copies = _host_views(outs, req.sizes, writable=True)

        decoded: list[list[int]] = []  # the found blocks, decoded once from the reply

        def hits_of(reply: Any) -> list[int]:
            if not decoded:
                found = unpack_flags(reply.found)
                if len(found) != len(outs):
                    raise PeerError(self.url, f"{len(found)} found flags for {len(outs)} blocks")
                decoded.append([i for i, hit in enumerate(found) if hit])
            return decoded[0]

        hashed: list[ArrivalDigests] = []  # the found blocks' checksums, taken as they land

        def land(reply: Any) -> tuple[list[np.ndarray], ArrivalDigests | None]:
            found = hits_of(reply)
            if len(found) == len(outs):
                bufs, sizes = views, list(req.sizes)
            else:
                flats = _per_block(views, req.sizes)
                bufs, sizes = [flats[i] for i in found], [req.sizes[i] for i in found]
            if not self.verify:
                return bufs, None
            hashed.append(ArrivalDigests(bufs, sizes))
            return bufs, hashed[0]

        reply = self._data.call("Get", req, land=land)
        hits = hits_of(reply)
        found = [False] * len(outs)
        digests = hashed[0].digests if hashed else []
        for k, i in enumerate(hits):
            if digests and digests[k] != reply.checksums[i]:
                self._damaged()
                continue
            found[i] = True
            if i in copies:  # then each block has a buffer of its own
                copy_bytes(outs[i], torch.from_numpy(views[i]))
        return found

    def _arrived(self, data: torch.Tensor, digest: int) -> bool:
        if not self.verify or checksum(data) == digest:
            return True
        self._damaged()
        return False

    def _damaged(self) -> None:
        with self._count_lock:
            self.checksum_failures += 1
        log.warning("a block from %s arrived damaged; counted as a miss", self.url)

    def lookup(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> int:
        return int(self._lookup(keys, ns_tag).hit_blocks)

    def locate(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> list[str]:
        return [TIER_NAMES[t] for t in self._lookup(keys, ns_tag).tiers]

    def holders(
        self, tokens: np.ndarray, *, salt: bytes = b"", ns_tag: int | None = None
    ) -> list[Holder]:
        """The nodes holding a prompt's leading blocks, as this node knows
        them (its cluster's directory, or itself alone); it keys the tokens."""
        tokens = np.ascontiguousarray(tokens, dtype="<u4")
        req = pb.LocateRequest(namespace_id=self._nsid(ns_tag), tokens=tokens.tobytes(), salt=salt)
        return reply_holders(self.call("Locate", req), self.url)

    def lookup_tokens(
        self, tokens: np.ndarray, *, start: BlockKey | None = None, ns_tag: int | None = None
    ) -> int:
        """``lookup`` of a prompt's keys, keyed by the node (in C): the call
        carries 4 bytes a token, and the client builds no key at all."""
        tokens = np.ascontiguousarray(tokens, dtype="<u4")
        req = pb.LookupRequest(
            namespace_id=self._nsid(ns_tag), tokens=tokens.tobytes(), start=start or b""
        )
        return int(self._quick("Lookup", req).hit_blocks)

    def _lookup(self, keys: Sequence[BlockKey], ns_tag: int | None) -> Any:
        req = pb.LookupRequest(namespace_id=self._nsid(ns_tag), keys=pack_keys(keys))
        return self._quick("Lookup", req)

    def exists(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> list[bool]:
        req = pb.KeysRequest(namespace_id=self._nsid(ns_tag), keys=pack_keys(keys))
        return unpack_flags(self._quick("Exists", req).found)

    def delete(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> int:
        req = pb.KeysRequest(namespace_id=self._nsid(ns_tag), keys=pack_keys(keys))
        return int(self._quick("Delete", req).deleted)

    def _quick(self, method: str, request: Any) -> Any:
        """A call without payload, on the data port where the node has one."""
        if self._data is not None:
            try:
                return self._data.call(method, request)
            except DataPortRefusedError as e:
                self._refused(e, 0)
        return self.call(method, request)

    def _refused(self, e: DataPortRefusedError, nbytes: int) -> str:
        """A data-port call that found no connection goes over gRPC instead
        (the port is an optimisation: a full or flooded one costs speed, not
        calls); the route it takes there."""
        with self._count_lock:
            self.port_refusals += 1
            first = self.port_refusals == 1
        log.log(logging.WARNING if first else logging.DEBUG, "%s; this call goes over gRPC", e)
        return self._grpc_route(nbytes)

    def stats(self) -> StoreStats:
        return StoreStats.from_dict(self.stats_json()["store"])

    def stats_json(self) -> dict[str, Any]:
        """The node's whole Stats answer: store, namespaces and service counters."""
        return dict(json.loads(self.call("Stats", pb.StatsRequest()).json))

    def health(self) -> Any:
        return self.call("Health", pb.HealthRequest())

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A buffer registered with this client's transfer engine: blocks put
        from or got into it move with no bounce copy. Lives until ``close``."""
        if self._memory is None:
            return torch.empty(nbytes, dtype=torch.uint8)
        return self._memory.alloc(nbytes)

    def close(self) -> None:
        if self._data is not None:
            self._data.close()
        if self._memory is not None:
            if self._staging is not None:
                self._memory.engine.unregister(self._staging)
                self._staging = None
            if self._owns_memory:
                self._memory.close()
        self.rpc.close()

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- payload placement ----------------------------------------------------------

    def _plan(self, sizes: list[int], *, put: bool) -> tuple[str, Iterator[tuple[int, int]]]:
        """(how the batch moves, its calls as index ranges). A batch on the
        data port (``route``) goes in calls of at most ``stream_max``; else
        small batches ride inline in one call, larger ones move over the
        engine, and without an engine a put takes as many messages as it
        needs and a get streams its answer (BatchGet)."""
        total = sum(sizes)
        route = self.route(total)
        if route == PORT:
            return PORT, byte_ranges(sizes, self.stream_max)
        if route == ENGINE:
            cap = self._call_bytes
        elif put and self.engine is None:
            cap = self.max_message - MESSAGE_SLACK
        else:
            cap = total
        return route, byte_ranges(sizes, max(cap, 1))

    def route(self, nbytes: int) -> str:
        """How a batch of ``nbytes`` payload moves: ``PORT`` (the data port),
        ``ENGINE`` (the transfer engine) or ``INLINE`` (gRPC messages): the
        port where the node has one, save for a batch past ``ENGINE_FROM``
        (or ``stream_max``) that an shm or ucx engine can take."""
        if self._data is not None and (
            self.engine is None
            or self.engine.backend == "tcp"
            or nbytes <= min(self.stream_max, ENGINE_FROM)
        ):
            return PORT
        return self._grpc_route(nbytes)

    def _grpc_route(self, nbytes: int) -> str:
        """The route of a batch that does not take the data port."""
        return INLINE if self.engine is None or nbytes <= self.inline_max else ENGINE

    @contextlib.contextmanager
    def _landing(self, tensors: list[torch.Tensor], *, incoming: bool) -> Iterator[_Landing]:
        """Put each block in registered memory: where it already is (an
        ``alloc`` buffer, or itself registered for this call), else a slot of
        the staging buffer (filled before a put; after a get, copied out for
        the blocks the caller marks ``ok``). Blocks back to back in one
        allocation are one unit: found, registered or staged once. The node
        is granted exactly these bytes, for this call: reading them (put) or
        writing them (get)."""
        assert self.engine is not None
        engine = self.engine
        sizes = [nbytes_of(t) for t in tensors]
        run = adjacent_run(tensors)
        units = (
            [_Unit(run, range(len(tensors)), sizes)]
            if run is not None
            else [_Unit(t, range(i, i + 1), sizes[i : i + 1]) for i, t in enumerate(tensors)]
        )
        spans: list[tuple[int, Region, int, int]] = []  # block, region, offset, bytes
        own: list[Region] = []
        grants: list[RegionDesc] = []
        try:
            waiting: list[_Unit] = []
            for u in units:
                flat = contiguous_bytes(u.src)
                found = self._registered(flat) if flat is not None else None
                if (
                    found is None
                    and flat is not None
                    and engine.backend != "shm"
                    and flat.numel() >= REGISTER_IN_PLACE_FROM
                ):
                    region = engine.register(flat)
                    own.append(region)
                    found = (region, 0)
                if found is None or flat is None:
                    waiting.append(u)
                    continue
                u.landed = flat
                _add_spans(spans, u, *found)
            with self._staged(waiting, incoming) as staging:
                for u in waiting:
                    assert staging is not None and u.landed is not None
                    _add_spans(spans, u, staging, u.landed.data_ptr() - staging.view.ctypes.data)
                refs = _grant_spans(engine, spans, len(tensors), incoming, self.rpc.timeout, grants)
                land = _Landing(refs, units)
                yield land
                if incoming:
                    for u in waiting:
                        _copy_out(u, tensors, land.ok)
        finally:
            for desc in grants:
                engine.revoke(desc)
            for region in own:
                engine.unregister(region)

    def _registered(self, flat: torch.Tensor) -> tuple[Region, int] | None:
        return self._memory.find(flat) if self._memory is not None else None

    @contextlib.contextmanager
    def _staged(self, units: list[_Unit], incoming: bool) -> Iterator[Region | None]:
        """Slots of the staging buffer for ``units`` (each unit's ``landed``),
        filled for a put; the buffer is held for the call."""
        if not units:
            yield None
            return
        assert self.engine is not None
        need = sum(sum(u.sizes) for u in units)
        with self._lock:
            if self._staging is None or self._staging.nbytes < need:
                if self._staging is not None:
                    self.engine.unregister(self._staging)
                self._staging = self.engine.alloc(max(need, 16 * MiB))
            region = self._staging
            whole = torch.from_numpy(region.view)
            at = 0
            for u in units:
                n = sum(u.sizes)
                u.landed = whole[at : at + n]
                if not incoming:
                    copy_bytes(u.landed, u.src)
                at += n
            yield region


def _host_views(
    tensors: list[torch.Tensor], sizes: Sequence[int], *, writable: bool = False
) -> tuple[list[np.ndarray], set[int]]:
    """(the batch's bytes as few host buffers as they lie in, the blocks
    whose buffer is a copy). Blocks back to back in one CPU allocation are
    one buffer, else each block is one; a block on a GPU or strided is a
    host copy (for a get, a fresh buffer the caller's block is filled from)."""
    run = adjacent_run(tensors)
    if run is not None and run.is_cpu:
        return [run.numpy()], set()
    flats, copies = [], set()
    for i, t in enumerate(tensors):
        flat = contiguous_bytes(t) if t.is_cpu else None
        if flat is None:
            copies.add(i)
            flat = torch.empty(sizes[i], dtype=torch.uint8) if writable else flat_bytes(t).cpu()
        flats.append(flat.numpy())
    return flats, copies


def _per_block(bufs: list[np.ndarray], sizes: Sequence[int]) -> list[np.ndarray]:
    """A host buffer per block, from ``_host_views``'s buffers."""
    if len(bufs) == len(sizes):
        return bufs
    whole, out, at = bufs[0], [], 0
    for n in sizes:
        out.append(whole[at : at + n])
        at += n
    return out


def _add_spans(
    spans: list[tuple[int, Region, int, int]], u: _Unit, region: Region, offset: int
) -> None:
    """Where each block of ``u`` lies, the unit starting at ``offset`` of ``region``."""
    for i, n in zip(u.blocks, u.sizes, strict=True):
        spans.append((i, region, offset, n))
        offset += n


def _copy_out(u: _Unit, tensors: list[torch.Tensor], ok: list[bool] | None) -> None:
    """A staged unit's arrived blocks, copied to the caller's buffers."""
    assert u.landed is not None
    if ok is None or all(ok[i] for i in u.blocks):
        copy_bytes(u.src, u.landed)
        return
    at = 0
    for i, n in zip(u.blocks, u.sizes, strict=True):
        if ok[i]:
            copy_bytes(tensors[i], u.landed[at : at + n])
        at += n


def _grant_spans(
    engine: TransferEngine,
    spans: list[tuple[int, Region, int, int]],
    n: int,
    write: bool,
    ttl: float,
    grants: list[RegionDesc],
) -> pb.BlockRefs:
    """Grant the node reading (or, with ``write``, writing) each run of
    adjacent block spans (one grant per run, not per block: a staging buffer
    is one run) and say where each block lies in its grant; the grants made
    are appended to ``grants``."""
    region_index, offsets = [0] * n, [0] * n
    regions: list[pb.Region] = []
    by_region: dict[int, list[tuple[int, Region, int, int]]] = {}
    for span in spans:
        by_region.setdefault(span[1].id, []).append(span)
    for group in by_region.values():
        group.sort(key=lambda s: s[2])
        runs: list[tuple[int, int, list[tuple[int, Region, int, int]]]] = []
        start = end = group[0][2]
        members: list[tuple[int, Region, int, int]] = []
        for span in group:
            if span[2] > end:  # a gap: the run so far is one grant
                runs.append((start, end, members))
                start, members = span[2], []
            end = max(end, span[2] + span[3])
            members.append(span)
        runs.append((start, end, members))
        for start, end, members in runs:
            desc = engine.grant(
                members[0][1], start, end - start, read=not write, write=write, ttl=ttl
            )
            grants.append(desc)
            at = len(regions)
            regions.append(region_to_pb(desc))
            for i, _, offset, _ in members:
                region_index[i] = at
                offsets[i] = offset - start
    return pb.BlockRefs(regions=regions, region_index=region_index, offsets=offsets)


def leading_if(found: list[bool], prefix: bool) -> list[bool]:
    """With ``prefix``, nothing after the first miss counts."""
    if prefix and not all(found):
        cut = found.index(False)
        return found[:cut] + [False] * (len(found) - cut)
    return found
