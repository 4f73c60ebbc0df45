"""A node's side of the cluster: heartbeats, and keeping its directory entries true.

The node is the only writer of its own entries: it publishes a put's blocks
before answering the put (so a reader anywhere finds them at once), and
unpublishes blocks that left its store (deleted, or dropped under pressure)
with the next heartbeat. When the directory forgets the node (Redis
restarted, or the node's heartbeat lapsed and readers pruned its entries),
the next heartbeat finds it unregistered and republishes everything the node
holds. While Redis is unreachable the node keeps serving; it warns once,
counts failed attempts and catches up when Redis is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from kvstore.cluster.directory import Directory, Holder, NodeInfo, holders
from kvstore.config import ClusterConfig
from kvstore.errors import DirectoryUnavailableError
from kvstore.keys import BlockKey
from kvstore.store import TieredStore

log = logging.getLogger(__name__)


class Membership:
    def __init__(
        self,
        store: TieredStore,
        directory: Directory,
        info: Callable[[], NodeInfo],
        config: ClusterConfig,
    ) -> None:
        self.store = store
        self.directory = directory
        self.config = config
        self._info = info
        self.name = info().name
        self.failures = 0  # directory calls that could not reach Redis
        self.republished = 0  # full republishes (first start, or after the directory forgot us)
        self.reachable = True
        self.members: dict[str, NodeInfo] = {}  # the live nodes, as Locate last read them
        self._members_at = float("-inf")
        self._absent: set[str] = set()  # named by entries, but not members at that read
        self._republish = True  # a (re)started node publishes what its SSD tier holds
        self._unpublish: list[BlockKey] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        store.track_removals()
        self.beat()
        self._thread = threading.Thread(target=self._run, name="kvstore-heartbeat", daemon=True)
        self._thread.start()

    def stored(self, keys: Sequence[BlockKey], ns_tag: int) -> None:
        """Publish the entries of ``keys`` (of namespace ``ns_tag``) this node
        now holds (before a put answers)."""
        try:
            self.directory.publish(self.name, self.store.entries(keys, ns_tag=ns_tag))
        except DirectoryUnavailableError as e:
            self._republish = True
            self._lost(e)

    def locate(self, keys: Sequence[BlockKey], block_size: int) -> list[Holder]:
        """Which live nodes hold the leading blocks of ``keys``: one directory
        round trip, and a second (the members, afresh) when the last read is a
        heartbeat old or the answer names a node it did not see. Raises
        ``DirectoryUnavailableError``: a router must not take "nobody" for an
        answer when the directory could not be asked."""
        locs = self.directory.lookup(keys, prefix=False)
        unknown = {r.node for loc in locs[:1] for r in loc} - self.members.keys()
        now = time.monotonic()
        if unknown - self._absent or now - self._members_at > self.config.heartbeat:
            self.members = {n.name: n for n in self.directory.nodes()}
            self._members_at = now
            self._absent = unknown - self.members.keys()  # dead: entries not yet pruned
        return holders(locs, self.members, block_size)

    def removed(self) -> None:
        """Unpublish every block that left the store since the last call."""
        with self._lock:
            keys = self._unpublish + self.store.take_removed()
            self._unpublish = []
            if not keys:
                return
            # a key stored again since it left keeps its (fresh) entry
            gone = [k for k, back in zip(keys, self.store.exists(keys), strict=True) if not back]
            try:
                self.directory.unpublish(self.name, gone)
            except DirectoryUnavailableError as e:
                self._unpublish = gone
                self._lost(e)

    def beat(self) -> None:
        try:
            known = self.directory.register(self._info())
            if not known or self._republish:
                self._republish = False
                entries = self.store.entries()
                self.directory.publish(self.name, entries)
                self.republished += 1
                log.info("published %d blocks to %s", len(entries), self.directory.url)
        except DirectoryUnavailableError as e:
            self._republish = True
            self._lost(e)
            return
        self.removed()
        if not self.reachable:
            self.reachable = True
            log.warning("cluster directory %s reachable again", self.directory.url)

    def leave(self) -> None:
        """Stop heartbeating and deregister: readers skip this node at once."""
        self._stop.set()
        self._thread.join()
        try:
            self.removed()
            self.directory.leave(self.name)
        except DirectoryUnavailableError as e:
            self._lost(e)  # the registration expires by itself
        self.directory.close()

    def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.config.heartbeat
            if self._stop.wait(max(0.0, next_at - time.monotonic())):
                return
            self.beat()
            next_at = max(next_at, time.monotonic() - self.config.heartbeat)

    def _lost(self, e: DirectoryUnavailableError) -> None:
        self.failures += 1
        if self.reachable:
            self.reachable = False
            log.warning("%s; serving this node's own blocks until it returns", e)
