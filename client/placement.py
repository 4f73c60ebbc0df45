"""Where a chain's blocks go in a cluster: a pure ranking of live nodes.

A prefix is useful only whole, and a reader fetches it fastest from one
place, so a chain keeps to the nodes that already hold its prefix. A new
chain prefers a node on the writer's own host (its put and later gets stay
off the network), then weighted rendezvous hashing on the chain's first key:
every writer ranks the nodes the same way for the same chain, with no
coordination, and each node's share of new chains is proportional to its free
bytes, so a node that joins empty takes the most new writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import xxhash

from kvstore.cluster.directory import NodeInfo
from kvstore.keys import BlockKey


def rendezvous_score(seed: BlockKey, node: NodeInfo) -> float:
    """Higher wins; P(node wins) is proportional to its free bytes."""
    h = xxhash.xxh3_64_intdigest(seed + node.name.encode())
    u = (h + 1) / (2.0**64 + 1)  # uniform in (0, 1)
    return -max(node.free, 1) / math.log(u)


def rank_nodes(
    nodes: Sequence[NodeInfo],
    seed: BlockKey,
    *,
    need: int,
    holders: Sequence[str] = (),
    host: str = "",
) -> list[NodeInfo]:
    """Every node, best first for a chain of ``need`` bytes starting at
    ``seed``: nodes with room before full ones (a full node would evict to take
    it); among those, the ``holders`` of the chain's prefix, then nodes on
    ``host``, then by rendezvous score."""

    def rank(n: NodeInfo) -> tuple[bool, bool, bool, float]:
        return (
            n.free >= need,
            n.name in holders,
            bool(host) and n.host == host,
            rendezvous_score(seed, n),
        )

    return sorted(nodes, key=rank, reverse=True)
