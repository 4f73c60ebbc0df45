"""The cluster directory: which nodes are alive, and which node holds which block.

A node alone needs none: its store's index is its directory. Several nodes
share one that lives in an existing, replicable store (``RedisDirectory``),
so membership and placement need no consensus layer of our own.

Entries are hints, never the truth about bytes: a reader always gets a
block's bytes from the node itself, which checks them. So an entry that went
stale (the block was evicted, the node died) costs one miss, never wrong
data, and is cleaned up when it is found.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from kvstore.config import check_directory_url as check_directory_url
from kvstore.keys import BlockKey
from kvstore.tier import Entry as Entry
from kvstore.tier import Tier

TIERS = tuple(Tier)  # fastest first


@dataclass(frozen=True)
class NodeInfo:
    """What a node announces with each heartbeat."""

    name: str
    url: str  # kvstore://host:port, reachable from the clients
    host: str  # the machine it runs on: a writer prefers a node on its own host
    backend: str  # transfer backend its payloads move over
    dram_capacity: int
    dram_free: int
    ssd_capacity: int = 0
    ssd_free: int = 0
    version: str = ""

    @property
    def free(self) -> int:
        return self.dram_free + self.ssd_free


class Replica(NamedTuple):
    """One node's copy of a block, as a lookup finds it: where, and in which
    tier (a tuple, shared by every key with the same two: a prompt's lookup
    meets thousands)."""

    node: str
    tier: Tier


Locations = list[tuple[Replica, ...]]  # per key: the live copies (empty: a miss)


@dataclass(frozen=True)
class Holder:
    """How much of one prompt a node holds, as a KV-aware router asks before
    it picks a prefill or decode worker: its leading blocks, each one's tier."""

    node: str
    url: str
    host: str
    tiers: tuple[Tier, ...]  # per leading block the node holds
    block_size: int

    @property
    def tokens(self) -> int:
        return len(self.tiers) * self.block_size

    @property
    def tokens_by_tier(self) -> dict[Tier, int]:
        """Of ``tokens``, how many sit in each tier (fastest first)."""
        return {t: self.tiers.count(t) * self.block_size for t in TIERS if t in self.tiers}


def holders(locs: Locations, nodes: Mapping[str, NodeInfo], block_size: int) -> list[Holder]:
    """Per node in ``nodes`` holding the first block, its run of leading blocks
    (most tokens first): ``locs`` is a lookup's answer without ``prefix``."""
    out = []
    for first in locs[0] if locs else ():
        tiers: list[Tier] = []
        for loc in locs:
            tier = next((r.tier for r in loc if r.node == first.node), None)
            if tier is None:
                break
            tiers.append(tier)
        info = nodes.get(first.node)
        if info is not None:
            out.append(Holder(first.node, info.url, info.host, tuple(tiers), block_size))
    return sorted(out, key=lambda h: (-h.tokens, h.node))


class Directory(Protocol):
    url: str

    def register(self, info: NodeInfo) -> bool:
        """Announce or refresh a node for one heartbeat timeout; False when it
        was not registered (first start, or expired or lost with the
        directory), so the node republishes what it holds."""
        ...

    def leave(self, name: str) -> None: ...

    def nodes(self) -> list[NodeInfo]:
        """The live nodes (dead ones are pruned as a side effect)."""
        ...

    def publish(self, node: str, entries: Sequence[Entry]) -> None: ...

    def unpublish(self, node: str, keys: Sequence[BlockKey]) -> None: ...

    def lookup(
        self,
        keys: Sequence[BlockKey],
        *,
        prefix: bool,
        live: Container[str] | None = None,
        dead: dict[str, list[BlockKey]] | None = None,
    ) -> Locations:
        """The copies of each key, in one round trip. With ``live``, only
        copies on those nodes count (the others are added to ``dead``, node ->
        keys, for the caller to unpublish); with ``prefix`` the answer stops at
        the first key with no copy that counts."""
        ...

    def close(self) -> None: ...
