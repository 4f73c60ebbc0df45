"""The cluster directory in Redis (standalone, or behind Sentinel for HA).

Layout, under a prefix (default ``kvstore``):

- ``P:node:NAME``: a hash of the node's ``NodeInfo``, expiring one
  heartbeat timeout after its last heartbeat; ``P:nodes``: the set of names;
  ``P:names``: node id -> name, for every node ever seen. A node's id is a
  64-bit hash of its name, so it is the same after a restart of the node or
  of Redis, and no client's cached id can come to mean another node.
- ``P:loc:KEY`` (KEY the 16 raw key bytes): a string of 21-byte records
  (node id, tier, size, checksum), one per copy.

A lookup is one ``MGET`` for the whole chain: no script, so Redis spends
well under a microsecond a key and the answer parses in bulk. Liveness is
the caller's to judge (it knows the live nodes) and it unpublishes the dead
entries it meets. Writes are Lua scripts, so replacing one node's record
of a key never loses another node's. Scripts touch keys of many hash slots,
so Redis Cluster is not supported (Sentinel is).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Container, Sequence
from dataclasses import fields
from functools import partial
from typing import Any, TypeVar

import redis
import xxhash
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvstore.cluster.directory import (
    TIERS,
    Entry,
    Locations,
    NodeInfo,
    Replica,
    check_directory_url,
)
from kvstore.errors import DirectoryUnavailableError
from kvstore.keys import BlockKey

T = TypeVar("T")
_RECORD = struct.Struct("<QBIQ")  # node id, tier index, payload bytes, XXH3-64
_ID = struct.Struct("<Q")
_HEAD = 9  # a record's node id and tier: what a lookup reads
PUBLISH_BATCH = 5_000  # keys per script call: Redis runs one script at a time

_HEARTBEAT = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[2])
return existed
"""

# ARGV[1]: the node's packed id; ARGV[2]: '1' to add the records in ARGV[3..]
# (one per key), '0' to only remove this node's records
_REPLACE = """
local id, add = ARGV[1], ARGV[2] == '1'
for i, key in ipairs(KEYS) do
  local old = redis.call('GET', key)
  local keep = ''
  if old then
    for j = 1, #old, 21 do
      if string.sub(old, j, j + 7) ~= id then keep = keep .. string.sub(old, j, j + 20) end
    end
  end
  if add then keep = keep .. ARGV[i + 2] end
  if keep == '' then
    if old then redis.call('DEL', key) end
  else
    redis.call('SET', key, keep)
  end
end
"""

_MEMBERS = """
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local info = redis.call('HGETALL', ARGV[1] .. name)
  if #info == 0 then redis.call('SREM', KEYS[1], name) else out[#out + 1] = info end
end
return out
"""


class RedisDirectory:
    """Thread-safe (redis-py pools connections). Every failure to reach Redis
    is a ``DirectoryUnavailableError``; calls never retry on their own, so a
    caller learns of an outage within ``timeout`` and decides."""

    def __init__(
        self, url: str, *, prefix: str = "kvstore", ttl: float = 3.0, timeout: float = 2.0
    ) -> None:
        self.url = check_directory_url(url)
        self.prefix = prefix
        self.ttl_ms = max(1, int(ttl * 1000))
        self._r = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._heartbeat = self._r.register_script(_HEARTBEAT)
        self._replace = self._r.register_script(_REPLACE)
        self._members = self._r.register_script(_MEMBERS)
        self._nodes_key = f"{prefix}:nodes"
        self._node_prefix = f"{prefix}:node:"
        self._names_key = f"{prefix}:names"
        self._loc_prefix = f"{prefix}:loc:".encode()
        self._names: dict[int, str] = {}  # node id -> name

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise DirectoryUnavailableError(self.url, f"{what}: {e}") from None
        except redis.ResponseError as e:  # e.g. a replica refusing writes, or OOM
            raise DirectoryUnavailableError(self.url, f"{what} refused: {e}") from None

    # -- membership ------------------------------------------------------------------

    def register(self, info: NodeInfo) -> bool:
        node_id = node_id_of(info.name)
        self._names[node_id] = info.name
        args: list[Any] = [self.ttl_ms, info.name, _ID.pack(node_id)]
        for f in fields(NodeInfo):
            args += [f.name, getattr(info, f.name)]
        keys = [self._node_prefix + info.name, self._nodes_key, self._names_key]
        return bool(self._run("heartbeat", partial(self._heartbeat, keys=keys, args=args)))

    def leave(self, name: str) -> None:
        def go() -> None:
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(self._node_prefix + name)
            pipe.srem(self._nodes_key, name)
            pipe.execute()

        self._run("leave", go)

    def nodes(self) -> list[NodeInfo]:
        raw = self._run(
            "list nodes", lambda: self._members(keys=[self._nodes_key], args=[self._node_prefix])
        )
        out = [_node_info(flat) for flat in raw]
        for info in out:
            self._names[node_id_of(info.name)] = info.name
        return out

    # -- locations -------------------------------------------------------------------

    def publish(self, node: str, entries: Sequence[Entry]) -> None:
        """Set ``node``'s record of each entry's key (its other copies stay)."""
        node_id = node_id_of(node)
        records = [
            _RECORD.pack(node_id, TIERS.index(e.tier), e.nbytes, e.checksum) for e in entries
        ]
        self._replace_records(node, [e.key for e in entries], records)

    def unpublish(self, node: str, keys: Sequence[BlockKey]) -> None:
        self._replace_records(node, keys, None)

    def _replace_records(
        self, node: str, keys: Sequence[BlockKey], records: list[bytes] | None
    ) -> None:
        """Replace ``node``'s record of each key with ``records`` (None: drop
        it), in script calls of ``PUBLISH_BATCH`` keys."""
        head: list[bytes | str] = [_ID.pack(node_id_of(node)), "0" if records is None else "1"]
        for first in range(0, len(keys), PUBLISH_BATCH):
            locs = [self._loc_prefix + k for k in keys[first : first + PUBLISH_BATCH]]
            args = head + (records[first : first + PUBLISH_BATCH] if records is not None else [])
            self._run("update entries", partial(self._replace, keys=locs, args=args))

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
        locs = [self._loc_prefix + k for k in keys]
        values: list[Any] = self._run("lookup", partial(self._r.mget, locs))
        out: Locations = []
        size = _RECORD.size
        seen: dict[bytes, Replica | None] = {}  # record head (id, tier) -> its copy, None: dead
        for key, v in zip(keys, values, strict=True):
            copies: tuple[Replica, ...] = ()
            for at in range(0, len(v) if v else 0, size):
                head = v[at : at + _HEAD]
                if head not in seen:
                    seen[head] = self._replica(head, live)
                copy = seen[head]
                if copy is not None:
                    copies += (copy,)
                elif dead is not None and (name := self._names.get(_ID.unpack_from(head)[0])):
                    dead.setdefault(name, []).append(key)
            out.append(copies)
        if prefix:  # cut after the whole answer was read, so every dead copy is reported
            out = out[: next((i for i, c in enumerate(out) if not c), len(out))]
        return out

    def _replica(self, head: bytes, live: Container[str] | None) -> Replica | None:
        """The copy a record's head names, or None where its node does not count."""
        node_id, tier = struct.unpack_from("<QB", head)
        if node_id not in self._names:  # a node registered since we last looked
            self._refresh_names()
        name = self._names.get(node_id)  # None: unknown (its name was lost with Redis)
        if name is None or (live is not None and name not in live):
            return None
        return Replica(name, TIERS[tier])

    def _refresh_names(self) -> None:
        raw: dict[bytes, bytes] = self._run("node names", partial(self._r.hgetall, self._names_key))  # type: ignore[arg-type]
        for node_id, name in raw.items():
            self._names[_ID.unpack(node_id)[0]] = name.decode()

    def flush(self) -> None:
        """Forget every node and entry under this prefix (tests and benches)."""

        def go() -> None:
            for k in self._r.scan_iter(match=self.prefix + ":*", count=10_000):
                self._r.unlink(k)

        self._run("flush", go)

    def close(self) -> None:
        self._r.close()


def node_id_of(name: str) -> int:
    return int(xxhash.xxh3_64_intdigest(name.encode()))


def _node_info(flat: list[bytes]) -> NodeInfo:
    d = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
    kwargs: dict[str, Any] = {}
    for f in fields(NodeInfo):
        if f.name in d:
            kwargs[f.name] = int(d[f.name]) if f.type in ("int", int) else d[f.name]
    return NodeInfo(**kwargs)
