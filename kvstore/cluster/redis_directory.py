"""The cluster directory in Redis: one server, a Sentinel-managed primary, or a
Redis Cluster (``kvstore.directory_url``).

Layout, under a prefix P (default ``kvstore``):

- Membership, in one hash slot (``{P}``), so its scripts run on a cluster too:
  ``{P}:nodes`` (name -> the node's ``NodeInfo`` as JSON), ``{P}:alive``
  (name -> the Redis clock, in ms, when its heartbeat lapses), ``{P}:ids``
  (name -> its small integer id, handed out by ``{P}:next`` on its first
  heartbeat and kept across its restarts and failovers).
- Locations: one string per block key, 14 bytes of name, ``{T}`` + one byte
  of P's hash + key bytes 1..10, where T is one of 64 characters picked by
  the key's first byte. A name of at most 14 bytes fits Redis's 16-byte
  allocation (a longer one costs a 32-byte one), and T spreads keys over 64
  hash slots: a cluster's lookup is one ``MGET`` per slot, pipelined per
  shard. The value is ``id * 4 + tier`` in decimal, comma-joined for several
  copies: one copy is an integer below 10,000 for the first 2,500 nodes, which
  Redis stores as a shared object, so an entry is its key, its dict entry and
  its table slot (~58 B; it was ~121 B with 28-byte names and 21-byte binary
  records). 86 bits of the key name an entry (six of byte 0, then bytes
  1..10): a lookup in 10^9 entries meets another block's name with a chance
  of ~10^-17, and an entry is a hint either way (the node checks the key).

A lookup is one ``MGET`` (``mget_nonatomic`` on a cluster): no script, so
Redis spends well under a microsecond a key and the answer parses in bulk,
once per distinct value. Liveness is the caller's to judge (it knows the live
nodes) and it unpublishes the dead entries it meets. Writes are Lua scripts
(``EVAL``: no script cache to lose to a failover) over the keys of one slot,
so replacing one node's record of a key never loses another node's.

A failover is seen from the primary's replication id: when it changes (a
replica was promoted, or Redis restarted), ``register`` reports the node as
unknown so it republishes everything it holds, including what the old
primary had not yet copied to its replica.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Container, Sequence
from dataclasses import asdict, fields
from functools import partial
from typing import Any, TypeVar

import numpy as np
import redis
import xxhash

from kvstore.cluster.directory import TIERS, Entry, Locations, NodeInfo, Replica
from kvstore.directory_url import connect, parse_directory_url
from kvstore.errors import DirectoryUnavailableError
from kvstore.keys import BlockKey, split_keys

T = TypeVar("T")
PUBLISH_BATCH = 5_000  # keys per write round: Redis runs one script at a time
TAGS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_"
LOC_BYTES = 14
_TAG_OF = np.frombuffer(TAGS, np.uint8)

# KEYS: nodes, alive, ids, next; ARGV: ttl ms, name, info
_HEARTBEAT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local id = redis.call('HGET', KEYS[3], ARGV[2])
if not id then
  id = redis.call('INCR', KEYS[4])
  redis.call('HSET', KEYS[3], ARGV[2], id)
end
local lapses = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], now + tonumber(ARGV[1]))
return {lapses > now and 1 or 0, tonumber(id)}
"""

# KEYS: nodes, alive, ids; the lapsed are pruned as a side effect
_MEMBERS = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local out = {}
local alive = redis.call('HGETALL', KEYS[2])
for i = 1, #alive, 2 do
  local name = alive[i]
  local info = redis.call('HGET', KEYS[1], name)
  if tonumber(alive[i + 1]) <= now or not info then
    redis.call('HDEL', KEYS[2], name)
    redis.call('HDEL', KEYS[1], name)
  else
    out[#out + 1] = info
    out[#out + 1] = redis.call('HGET', KEYS[3], name) or '0'
  end
end
return out
"""

# ARGV[1]: the node's id; ARGV[2]: '1' to add the codes in ARGV[3..] (one per
# key), '0' to only remove this node's codes
_REPLACE = """
local id, add = tonumber(ARGV[1]), ARGV[2] == '1'
for i, key in ipairs(KEYS) do
  local old = redis.call('GET', key)
  local keep = {}
  if old then
    for code in string.gmatch(old, '%d+') do
      if math.floor(tonumber(code) / 4) ~= id then keep[#keep + 1] = code end
    end
  end
  if add then keep[#keep + 1] = ARGV[i + 2] end
  if #keep == 0 then
    if old then redis.call('DEL', key) end
  else
    redis.call('SET', key, table.concat(keep, ','))
  end
end
"""


class RedisDirectory:
    """Thread-safe (redis-py pools connections). Every failure to reach the
    primary, ``READONLY`` from a demoted one included, is a
    ``DirectoryUnavailableError``; calls never retry on their own, so a caller
    learns of an outage within ``timeout`` and decides."""

    def __init__(
        self, url: str, *, prefix: str = "kvstore", ttl: float = 3.0, timeout: float = 2.0
    ) -> None:
        self.target = parse_directory_url(url)
        self.url = self.target.shown
        self.prefix = prefix
        self.ttl_ms = max(1, int(ttl * 1000))
        self._cluster = self.target.kind == "cluster"
        self._r = connect(self.target, timeout)
        slot = "{" + prefix + "}"
        self._members_keys = [f"{slot}:nodes", f"{slot}:alive", f"{slot}:ids"]
        self._next_key = f"{slot}:next"
        self._p = xxhash.xxh3_64_digest(prefix.encode())[0]
        self._names: dict[int, str] = {}  # node id -> name
        self._ids: dict[str, int] = {}  # name -> node id
        self._epoch: frozenset[str] | None = None  # the primaries' replication ids

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (redis.RedisError, OSError) as e:
            raise DirectoryUnavailableError(self.url, f"{what}: {type(e).__name__}: {e}") from None

    # -- membership ------------------------------------------------------------------

    def register(self, info: NodeInfo) -> bool:
        args = [self.ttl_ms, info.name, json.dumps(asdict(info))]
        keys = [*self._members_keys, self._next_key]
        known, node_id = self._run("heartbeat", lambda: self._r.eval(_HEARTBEAT, 4, *keys, *args))
        self._learn(int(node_id), info.name)
        epoch = self._run("replication id", self._primaries)
        moved, self._epoch = self._epoch is not None and epoch != self._epoch, epoch
        return bool(known) and not moved

    def _primaries(self) -> frozenset[str]:
        """Each primary's replication id: a new one means a promoted replica
        or a restarted server, which may lack the last writes."""
        if not self._cluster:
            return frozenset([str(self._r.info("replication")["master_replid"])])
        answers = self._r.info("replication", target_nodes=redis.RedisCluster.PRIMARIES)
        return frozenset(str(a["master_replid"]) for a in answers.values())

    def leave(self, name: str) -> None:
        nodes, alive, _ = self._members_keys

        def go() -> None:
            pipe = self._r.pipeline(transaction=not self._cluster)
            pipe.hdel(alive, name)
            pipe.hdel(nodes, name)
            pipe.execute()

        self._run("leave", go)

    def nodes(self) -> list[NodeInfo]:
        raw = self._run("list nodes", lambda: self._r.eval(_MEMBERS, 3, *self._members_keys))
        out = []
        names: dict[int, str] = {}
        for at in range(0, len(raw), 2):
            info = _node_info(json.loads(raw[at]))
            names[int(raw[at + 1])] = info.name
            out.append(info)
        for node_id, name in names.items():  # live ones win over a stale cache
            self._learn(node_id, name)
        return out

    def _learn(self, node_id: int, name: str) -> None:
        old = self._ids.get(name)
        if old is not None and old != node_id:
            self._names.pop(old, None)
        self._ids[name], self._names[node_id] = node_id, name

    def _id_of(self, name: str) -> int:
        if name not in self._ids:
            self._refresh_names()
        node_id = self._ids.get(name)
        if node_id is None:
            raise DirectoryUnavailableError(self.url, f"node {name!r} is not registered")
        return node_id

    def _refresh_names(self) -> None:
        ids = self._members_keys[2]
        raw: dict[bytes, bytes] = self._run("node ids", lambda: self._r.hgetall(ids))
        for name, node_id in raw.items():
            self._learn(int(node_id), name.decode())

    # -- locations -------------------------------------------------------------------

    def loc_keys(self, keys: Sequence[BlockKey]) -> list[bytes]:
        """The Redis names of ``keys``' entries, built in one numpy pass."""
        if not keys:
            return []
        raw = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), -1)
        out = np.empty((len(keys), LOC_BYTES), np.uint8)
        out[:, 0], out[:, 2], out[:, 3] = ord("{"), ord("}"), self._p
        out[:, 1] = _TAG_OF[raw[:, 0] & 63]
        out[:, 4:] = raw[:, 1 : LOC_BYTES - 3]
        return split_keys(out.tobytes(), LOC_BYTES)

    def publish(self, node: str, entries: Sequence[Entry]) -> None:
        """Set ``node``'s record of each entry's key (its other copies stay)."""
        base = self._id_of(node) * 4
        codes = [str(base + TIERS.index(e.tier)) for e in entries]
        self._replace_codes(node, [e.key for e in entries], codes)

    def unpublish(self, node: str, keys: Sequence[BlockKey]) -> None:
        self._replace_codes(node, keys, None)

    def _replace_codes(self, node: str, keys: Sequence[BlockKey], codes: list[str] | None) -> None:
        """Replace ``node``'s code in each key's entry with ``codes`` (None:
        drop it): one script call per hash slot's keys, pipelined, in rounds
        of ``PUBLISH_BATCH`` keys."""
        if not keys:
            return
        node_id = self._id_of(node)
        add = "0" if codes is None else "1"
        locs = self.loc_keys(keys)
        for first in range(0, len(keys), PUBLISH_BATCH):
            by_tag: dict[int, tuple[list[bytes], list[str]]] = {}
            for i in range(first, min(first + PUBLISH_BATCH, len(keys))):
                ks, cs = by_tag.setdefault(locs[i][1], ([], []))
                ks.append(locs[i])
                if codes is not None:
                    cs.append(codes[i])
            self._run("update entries", partial(self._scripts, list(by_tag.values()), node_id, add))

    def _scripts(self, groups: list[tuple[list[bytes], list[str]]], node_id: int, add: str) -> None:
        pipe = self._r.pipeline(transaction=False)
        for ks, cs in groups:
            pipe.execute_command("EVAL", _REPLACE, len(ks), *ks, node_id, add, *cs)
        pipe.execute()

    def lookup(
        self,
        keys: Sequence[BlockKey],
        *,
        prefix: bool,
        live: Container[str] | None = None,
        dead: dict[str, list[BlockKey]] | None = None,
    ) -> Locations:
        if not keys:
            return []
        locs = self.loc_keys(keys)
        get = self._r.mget_nonatomic if self._cluster else self._r.mget
        values: list[bytes | None] = self._run("lookup", lambda: get(locs))
        out: Locations = []
        seen: dict[bytes, tuple[tuple[Replica, ...], tuple[str, ...]]] = {}
        for key, v in zip(keys, values, strict=True):
            if v is None:
                out.append(())
                continue
            parsed = seen.get(v)
            if parsed is None:
                parsed = seen[v] = self._parse(v, live)
            out.append(parsed[0])
            if dead is not None:
                for name in parsed[1]:
                    dead.setdefault(name, []).append(key)
        if prefix:  # cut after the whole answer was read, so every dead copy is reported
            out = out[: next((i for i, c in enumerate(out) if not c), len(out))]
        return out

    def _parse(
        self, value: bytes, live: Container[str] | None
    ) -> tuple[tuple[Replica, ...], tuple[str, ...]]:
        """An entry's copies on nodes that count, and the names of those that do not."""
        copies: list[Replica] = []
        dead: list[str] = []
        for code in map(int, value.split(b",")):
            node_id, tier = divmod(code, 4)
            if node_id not in self._names:  # a node registered since we last looked
                self._refresh_names()
            name = self._names.get(node_id)  # None: unknown (its id was lost with Redis)
            if name is not None and (live is None or name in live):
                copies.append(Replica(name, TIERS[tier]))
            elif name is not None:
                dead.append(name)
        return tuple(copies), tuple(dead)

    def flush(self) -> None:
        """Forget every node and entry under this prefix (tests and benches)."""
        p = bytes([self._p])
        escaped = b"\\" + p if p in b"*?[]\\" else p

        def go() -> None:
            for match in (b"{" + self.prefix.encode() + b"}:*", b"\\{?\\}" + escaped + b"*"):
                for k in self._r.scan_iter(match=match, count=10_000):
                    self._r.unlink(k)

        self._run("flush", go)
        self._epoch = None

    def close(self) -> None:
        self._r.close()


def _node_info(d: dict[str, Any]) -> NodeInfo:
    return NodeInfo(**{f.name: d[f.name] for f in fields(NodeInfo) if f.name in d})
