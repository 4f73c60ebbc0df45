"""A cluster of store nodes sharing a Redis directory, with the one-store API.

A lookup is one directory round trip for the whole chain. Bytes never pass
through Redis or a third node: a get asks each holding node for its run of
blocks, and that node writes them straight into the caller's buffers over
the transfer engine (nodes holding parts of one prompt are read in
parallel). A put asks the directory what already exists, ranks the live
nodes for the chain (``client.placement``) and sends the missing blocks to
the first ``replicas`` nodes that take them; each node publishes what it
stored before answering.

Failures degrade to misses, never to errors or wrong bytes: a node that does
not answer is skipped for a heartbeat timeout and its blocks are read from a
replica or missed; an entry whose node answers "not here" is unpublished; and
while Redis is unreachable the client warns once, counts, and serves through
the node on its own host alone (if there is one) until Redis is back.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import numpy as np
import torch

from client.blockstore import opened
from client.placement import rank_nodes
from client.remote import RegisteredMemory, RemoteStore, leading_if
from kvstore.buffers import Payload, as_tensor, nbytes_of
from kvstore.cluster.directory import (
    TIERS,
    Directory,
    Holder,
    Locations,
    NodeInfo,
    Replica,
    holders,
)
from kvstore.errors import (
    DirectoryUnavailableError,
    InvalidArgumentError,
    KVStoreError,
    StoreFullError,
    TransferError,
)
from kvstore.keys import BlockKey, Namespace, block_keys, check_per_key, salted_root
from kvstore.stats import StoreStats, merge_stats
from kvstore.tier import Tier
from transfer import TransferConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

_UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")
RETIRED_MAX = 32  # connections of departed nodes kept open for calls in flight


def _node_failed(e: KVStoreError) -> bool:
    """The node (or the way to it) failed, as opposed to refusing the request."""
    return isinstance(e, TransferError) or e.grpc_code in _UNREACHABLE


class ClusterStore:
    """Thread-safe. ``directory``: the cluster's (the store closes it).
    ``replicas``: copies each put makes (on distinct nodes). ``host``: this
    machine's name for locality (default: its hostname, which is what nodes
    announce unless started with ``--cluster-host``)."""

    def __init__(
        self,
        directory: Directory,
        *,
        token: str | None = None,
        transfer: TransferConfig | str | None = None,
        replicas: int = 1,
        host: str | None = None,
        timeout: float = 60.0,
        down_for: float = 3.0,
        refresh: float = 1.0,
    ) -> None:
        if replicas < 1:
            directory.close()
            raise InvalidArgumentError(f"replicas must be >= 1, got {replicas}")
        self.directory = directory
        self.url = directory.url  # any password masked
        self.replicas = replicas
        self.host = host or socket.gethostname()
        self.counters = {
            "directory_failures": 0,  # directory calls that could not reach Redis
            "node_failures": 0,  # calls to a node that did not answer
            "stale_entries": 0,  # entries whose node no longer had the block
            "unplaced_blocks": 0,  # put blocks no live node could take
        }
        self._token, self._transfer, self._timeout = token, transfer, timeout
        self._down_for, self._refresh = down_for, refresh
        self._namespaces: dict[int, Namespace] = {}
        self._conns: dict[str, RemoteStore] = {}
        self._retired: list[RemoteStore] = []
        self._memory: dict[str, RegisteredMemory | None] = {}  # per backend
        self._members: dict[str, NodeInfo] = {}
        self._members_at = float("-inf")
        self._down: dict[str, float] = {}  # node -> skipped until (monotonic)
        self._reachable = True
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="kvstore-cluster")
        self._live()

    # -- membership and connections ---------------------------------------------------

    def _live(self, *, fresh: bool = False) -> dict[str, NodeInfo]:
        """The live nodes not skipped here (cached for ``refresh`` seconds;
        while Redis is unreachable, the last known ones)."""
        now = time.monotonic()
        if fresh or now - self._members_at >= self._refresh:
            members = self._directory(self.directory.nodes, None)
            with self._lock:
                self._members_at = now
                if members is not None:
                    self._members = {n.name: n for n in members}
                    for name in set(self._conns) - set(self._members):
                        self._retire(name)
        with self._lock:
            return {k: v for k, v in self._members.items() if self._down.get(k, 0.0) <= now}

    def _conn(self, name: str) -> RemoteStore | None:
        with self._lock:
            conn = self._conns.get(name)
            info = self._members.get(name)
        if conn is not None or info is None:
            return conn
        try:
            conn = RemoteStore(
                info.url,
                token=self._token,
                transfer=self._transfer,
                timeout=self._timeout,
                memory=self._memory_for(info.backend, info.url),
            )
            for ns in list(self._namespaces.values()):
                conn.open_namespace(ns)
        except KVStoreError as e:
            if conn is not None:
                conn.close()
            if not _node_failed(e):
                raise
            self._failed(name, e)
            return None
        with self._lock:
            if name in self._conns:  # another thread connected first
                conn.close()
                return self._conns[name]
            self._conns[name] = conn
        return conn

    def _memory_for(self, backend: str, url: str) -> RegisteredMemory | None:
        with self._lock:
            if backend not in self._memory:
                self._memory[backend] = RegisteredMemory.open(self._transfer, backend, url)
            return self._memory[backend]

    def _failed(self, name: str, e: KVStoreError) -> None:
        """Skip a node that did not answer until its heartbeat would have lapsed."""
        with self._lock:
            self.counters["node_failures"] += 1
            self._down[name] = time.monotonic() + self._down_for
            self._retire(name)
        log.warning("node %s skipped for %.0f s: %s", name, self._down_for, e)

    def _retire(self, name: str) -> None:
        """Drop a node's connection without closing it under a call another
        thread may have in flight (closed at ``close``, or once many are
        retired, oldest first). Lock held."""
        conn = self._conns.pop(name, None)
        if conn is not None:
            self._retired.append(conn)
        while len(self._retired) > RETIRED_MAX:
            self._retired.pop(0).close()

    def _directory(self, fn: Callable[[], T], fallback: T) -> T:
        try:
            out = fn()
        except DirectoryUnavailableError as e:
            with self._lock:
                self.counters["directory_failures"] += 1
                warn, self._reachable = self._reachable, False
            if warn:
                log.warning("%s; reading from this host's node alone until it returns", e)
            return fallback
        if not self._reachable:
            self._reachable = True
            log.warning("cluster directory %s reachable again", self.url)
        return out

    def _at_home(self, call: Callable[[RemoteStore], T], otherwise: Callable[[], T]) -> T:
        """``call`` on the node on this host, while the directory cannot be
        reached (``otherwise()`` where this host has none)."""
        local = [n for n in self._live().values() if n.host == self.host]
        home = self._conn(local[0].name) if local else None
        return call(home) if home is not None else otherwise()

    def _locate(self, keys: Sequence[BlockKey], *, prefix: bool) -> Locations | None:
        """Per key, its copies on usable nodes (with ``prefix``, up to the first
        key with none); None while the directory is unreachable."""
        dead: dict[str, list[BlockKey]] = {}
        lookup = partial(self.directory.lookup, keys, prefix=prefix, live=self._live(), dead=dead)
        locs = self._directory(lookup, None)
        if dead:
            self._prune(dead)
        return locs

    def _prune(self, dead: dict[str, list[BlockKey]]) -> None:
        """Unpublish the copies of nodes whose heartbeat lapsed (checked afresh:
        a node may have joined since the last refresh; one skipped here is not
        dead)."""
        self._live(fresh=True)
        with self._lock:
            members = set(self._members)
        for node, keys in dead.items():
            if node not in members:
                self._directory(partial(self.directory.unpublish, node, keys), None)

    # -- the BlockStore API --------------------------------------------------------

    def open_namespace(self, namespace: Namespace) -> None:
        self._namespaces[namespace.tag] = namespace
        with self._lock:
            conns = list(self._conns.items())
        for name, conn in conns:
            try:
                conn.open_namespace(namespace)
            except KVStoreError as e:
                if not _node_failed(e):
                    raise
                self._failed(name, e)

    def _check_ns(self, ns_tag: int | None) -> None:
        opened(self._namespaces, ns_tag, "cluster")

    def put(
        self,
        keys: Sequence[BlockKey],
        payloads: Sequence[Payload],
        parents: Sequence[BlockKey | None] | None = None,
        *,
        ns_tag: int = 0,
        compress: bool | None = None,
    ) -> list[bool]:
        n = len(keys)
        check_per_key(n, payloads=payloads, parents=parents)
        self._check_ns(ns_tag)
        locs = self._locate(keys, prefix=False)
        if locs is None:
            return self._at_home(
                lambda home: home.put(keys, payloads, parents, ns_tag=ns_tag, compress=compress),
                lambda: self._unplaced(n, [False] * n),
            )
        held = [{r.node for r in loc} for loc in locs]
        todo = [i for i in range(n) if len(held[i]) < self.replicas]
        results = [False] * n
        if not todo:
            return results
        before = [i for i in range(todo[0]) if held[i]]
        holders = sorted(held[before[-1]]) if before else []
        srcs = [as_tensor(p) for p in payloads]
        need = sum(nbytes_of(srcs[i]) for i in todo)
        full: StoreFullError | None = None
        ranked = rank_nodes(
            list(self._live().values()), keys[0], need=need, holders=holders, host=self.host
        )
        for node in ranked:
            idx = [i for i in todo if len(held[i]) < self.replicas and node.name not in held[i]]
            if not idx:
                continue
            conn = self._conn(node.name)
            if conn is None:
                continue
            try:
                flags = conn.put(
                    [keys[i] for i in idx],
                    [srcs[i] for i in idx],
                    None if parents is None else [parents[i] for i in idx],
                    ns_tag=ns_tag,
                    compress=compress,
                )
            except StoreFullError as e:
                full = e  # try the next node for the whole run
                continue
            except KVStoreError as e:
                if not _node_failed(e):
                    raise
                self._failed(node.name, e)
                continue
            for i, stored in zip(idx, flags, strict=True):
                held[i].add(node.name)
                results[i] = results[i] or stored
        unplaced = sum(1 for i in todo if not held[i])
        if unplaced and full is not None:
            raise full
        return self._unplaced(unplaced, results)

    def _unplaced(self, n: int, results: list[bool]) -> list[bool]:
        if n:
            with self._lock:
                self.counters["unplaced_blocks"] += n
            log.warning("%d blocks found no live node to take them", n)
        return results

    def get_into(
        self,
        keys: Sequence[BlockKey],
        dsts: Sequence[Payload],
        *,
        prefix: bool = True,
        ns_tag: int | None = None,
    ) -> list[bool]:
        check_per_key(len(keys), destinations=dsts)
        self._check_ns(ns_tag)
        locs = self._locate(keys, prefix=prefix)
        if locs is None:
            return self._at_home(
                lambda home: home.get_into(keys, dsts, prefix=prefix, ns_tag=ns_tag),
                lambda: [False] * len(keys),
            )
        results = [False] * len(keys)
        tried: list[set[str]] = [set() for _ in locs]
        todo = [i for i, loc in enumerate(locs) if loc]
        stale: dict[str, list[BlockKey]] = {}
        while todo:
            runs = self._assign(locs, tried, todo)
            todo = []
            for node, idx, found in self._parallel(
                runs,
                lambda conn, idx: conn.get_into(
                    [keys[i] for i in idx], [dsts[i] for i in idx], prefix=False, ns_tag=ns_tag
                ),
            ):
                if found is None:  # the node did not answer: try another copy
                    todo += idx
                    continue
                for i, ok in zip(idx, found, strict=True):
                    results[i] = ok
                    if not ok:
                        stale.setdefault(node, []).append(keys[i])
                        todo.append(i)
        self._forget(stale)
        return leading_if(results, prefix)

    def _assign(
        self, locs: Locations, tried: list[set[str]], todo: list[int]
    ) -> dict[str, list[int]]:
        """Each key's next untried copy, keeping runs on one node: the node
        the previous key was given, else one on this host, else the first."""
        members = self._live()
        runs: dict[str, list[int]] = {}
        prev = ""
        for i in todo:
            options = [r for r in locs[i] if r.node not in tried[i] and r.node in members]
            if not options:
                continue
            pick = min(options, key=lambda r: self._preference(r, prev, members))
            tried[i].add(pick.node)
            runs.setdefault(pick.node, []).append(i)
            prev = pick.node
        return runs

    def _preference(self, r: Replica, prev: str, members: dict[str, NodeInfo]) -> tuple[int, ...]:
        return (r.node != prev, members[r.node].host != self.host, r.tier is not Tier.DRAM)

    def _parallel(
        self, runs: dict[str, list[int]], fn: Callable[[RemoteStore, list[int]], T]
    ) -> list[tuple[str, list[int], T | None]]:
        """``fn`` on each node's run, in parallel; None where the node failed."""

        def one(item: tuple[str, list[int]]) -> tuple[str, list[int], T | None]:
            name, idx = item
            conn = self._conn(name)
            if conn is None:
                return name, idx, None
            try:
                return name, idx, fn(conn, idx)
            except KVStoreError as e:
                if not _node_failed(e):
                    raise
                self._failed(name, e)
                return name, idx, None

        items = list(runs.items())
        if len(items) == 1:
            return [one(items[0])]
        return list(self._pool.map(one, items))

    def _forget(self, stale: dict[str, list[BlockKey]]) -> None:
        """Unpublish entries whose node answered that it no longer has the block."""
        for node, keys in stale.items():
            with self._lock:
                self.counters["stale_entries"] += len(keys)
            self._directory(partial(self.directory.unpublish, node, keys), None)

    def lookup(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> int:
        self._check_ns(ns_tag)
        locs = self._locate(keys, prefix=True)
        if locs is None:
            return self._at_home(lambda home: home.lookup(keys, ns_tag=ns_tag), lambda: 0)
        return len(locs)

    def locate(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> list[str]:
        """The best tier of each leading key some usable node holds."""
        self._check_ns(ns_tag)
        locs = self._locate(keys, prefix=True)
        if locs is None:
            return self._at_home(lambda home: home.locate(keys, ns_tag=ns_tag), lambda: [])
        return [min((r.tier for r in loc), key=TIERS.index) for loc in locs]

    def holders(
        self, tokens: np.ndarray, *, salt: bytes = b"", ns_tag: int | None = None
    ) -> list[Holder]:
        """The usable nodes holding a prompt's leading blocks, each block's
        tier on each: one directory round trip, no node asked. A directory
        that cannot be reached raises (a router must not read "nobody" into
        it)."""
        ns = opened(self._namespaces, ns_tag, "cluster")
        keys = block_keys(ns, tokens, start=salted_root(ns, salt))
        locs = self._locate(keys, prefix=False)
        if locs is None:
            raise DirectoryUnavailableError(self.url, "locate: no answer from the directory")
        return holders(locs, self._live(), ns.layout.block_size)

    def exists(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> list[bool]:
        self._check_ns(ns_tag)
        locs = self._locate(keys, prefix=False)
        if locs is None:
            return self._at_home(
                lambda home: home.exists(keys, ns_tag=ns_tag), lambda: [False] * len(keys)
            )
        return [bool(loc) for loc in locs]

    def delete(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> int:
        """Delete every copy; returns how many keys some node held."""
        self._check_ns(ns_tag)
        locs = self._locate(keys, prefix=False)
        if locs is None:
            return self._at_home(lambda home: home.delete(keys, ns_tag=ns_tag), lambda: 0)
        runs: dict[str, list[int]] = {}
        for i, loc in enumerate(locs):
            for r in loc:
                runs.setdefault(r.node, []).append(i)
        self._parallel(runs, lambda conn, idx: conn.delete([keys[i] for i in idx], ns_tag=ns_tag))
        return sum(1 for loc in locs if loc)

    def stats(self) -> StoreStats:
        """Every live node's stats, added up."""
        return merge_stats(list(self.stats_by_node().values()))

    def stats_by_node(self) -> dict[str, StoreStats]:
        """Each live node's stats (nodes that do not answer are left out)."""
        parts = self._parallel({name: [] for name in self._live()}, lambda conn, _: conn.stats())
        return {name: st for name, _, st in parts if st is not None}

    def nodes(self) -> list[NodeInfo]:
        return list(self._live().values())

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A buffer registered with the engine of the nodes' backend: it moves
        to and from any node of that backend with no bounce copy."""
        nodes = list(self._live().values())
        memory = self._memory_for(nodes[0].backend, nodes[0].url) if nodes else None
        if memory is None:
            return torch.empty(nbytes, dtype=torch.uint8)
        return memory.alloc(nbytes)

    def close(self) -> None:
        self._pool.shutdown()
        with self._lock:
            for conn in [*self._conns.values(), *self._retired]:
                conn.close()
            self._conns.clear()
            self._retired.clear()
            for memory in self._memory.values():
                if memory is not None:
                    memory.close()
            self._memory.clear()
        self.directory.close()

    def __enter__(self) -> ClusterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
