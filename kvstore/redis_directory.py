"""The cluster directory in Redis (standalone, or behind Sentinel for HA).

Layout, under a prefix (default ``kvstore``):

- ``P:node:NAME``: a hash of the node's ``NodeInfo``, expiring one heartbeat
  timeout after its last heartbeat; ``P:nodes``: the set of names.
- ``P:loc:KEY`` (KEY the 16 raw key bytes): a hash, node name -> packed
  (tier, size, checksum). Replicas are more fields of the same hash.

Lookups and heartbeats are Lua scripts, so a whole prompt's chain costs one
round trip and liveness is checked inside Redis: fields of nodes whose
heartbeat expired are skipped and deleted as they are met. Scripts touch
keys of many hash slots, so Redis Cluster is not supported (Sentinel is).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvstore.directory import TIERS, Entry, Locations, NodeInfo, Replica, check_directory_url
from kvstore.errors import DirectoryUnavailableError
from kvstore.keys import BlockKey

T = TypeVar("T")
_ENTRY = struct.Struct("<BIQ")  # tier index, payload bytes, XXH3-64
PUBLISH_BATCH = 10_000  # commands per pipeline when publishing many entries

_LOOKUP = """
local node_prefix, stop_at_miss = ARGV[1], ARGV[2] == '1'
local alive, out = {}, {}
for i, key in ipairs(KEYS) do
  local fields = redis.call('HGETALL', key)
  local live = {}
  for j = 1, #fields, 2 do
    local node = fields[j]
    if alive[node] == nil then
      alive[node] = redis.call('EXISTS', node_prefix .. node) == 1
    end
    if alive[node] then
      live[#live + 1] = node
      live[#live + 1] = fields[j + 1]
    else
      redis.call('HDEL', key, node)
    end
  end
  if #live == 0 and stop_at_miss then break end
  out[i] = live
end
return out
"""

_HEARTBEAT = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return existed
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
        self._lookup = self._r.register_script(_LOOKUP)
        self._heartbeat = self._r.register_script(_HEARTBEAT)
        self._members = self._r.register_script(_MEMBERS)
        self._nodes_key = f"{prefix}:nodes"
        self._node_prefix = f"{prefix}:node:"
        self._loc_prefix = f"{prefix}:loc:".encode()

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise DirectoryUnavailableError(self.url, f"{what}: {e}") from None
        except redis.ResponseError as e:  # e.g. a replica refusing writes, or OOM
            raise DirectoryUnavailableError(self.url, f"{what} refused: {e}") from None

    # -- membership ------------------------------------------------------------------

    def register(self, info: NodeInfo) -> bool:
        args: list[Any] = [self.ttl_ms, info.name]
        for f in fields(NodeInfo):
            args += [f.name, getattr(info, f.name)]
        keys = [self._node_prefix + info.name, self._nodes_key]
        return bool(self._run("heartbeat", lambda: self._heartbeat(keys=keys, args=args)))

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
        return [_node_info(flat) for flat in raw]

    # -- locations -------------------------------------------------------------------

    def publish(self, node: str, entries: Sequence[Entry]) -> None:
        def go() -> None:
            for first in range(0, len(entries), PUBLISH_BATCH):
                pipe = self._r.pipeline(transaction=False)
                for e in entries[first : first + PUBLISH_BATCH]:
                    value = _ENTRY.pack(TIERS.index(e.tier), e.nbytes, e.checksum)
                    pipe.hset(self._loc_prefix + e.key, node, value)
                pipe.execute()

        if entries:
            self._run("publish", go)

    def unpublish(self, node: str, keys: Sequence[BlockKey]) -> None:
        def go() -> None:
            for first in range(0, len(keys), PUBLISH_BATCH):
                pipe = self._r.pipeline(transaction=False)
                for k in keys[first : first + PUBLISH_BATCH]:
                    pipe.hdel(self._loc_prefix + k, node)
                pipe.execute()

        if keys:
            self._run("unpublish", go)

    def lookup(self, keys: Sequence[BlockKey], *, prefix: bool) -> Locations:
        if not keys:
            return []
        locs = [self._loc_prefix + k for k in keys]
        args = [self._node_prefix, "1" if prefix else "0"]
        raw = self._run("lookup", lambda: self._lookup(keys=locs, args=args))
        out: Locations = []
        for flat in raw:
            replicas = []
            for j in range(0, len(flat), 2):
                tier, nbytes, digest = _ENTRY.unpack(flat[j + 1])
                replicas.append(Replica(flat[j].decode(), TIERS[tier], nbytes, digest))
            out.append(tuple(replicas))
        return out

    def flush(self) -> None:
        """Forget every node and entry under this prefix (tests and benches)."""

        def go() -> None:
            for k in self._r.scan_iter(match=self.prefix + ":*", count=10_000):
                self._r.unlink(k)

        self._run("flush", go)

    def close(self) -> None:
        self._r.close()


def _node_info(flat: list[bytes]) -> NodeInfo:
    d = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
    kwargs: dict[str, Any] = {}
    for f in fields(NodeInfo):
        if f.name in d:
            kwargs[f.name] = int(d[f.name]) if f.type in ("int", int) else d[f.name]
    return NodeInfo(**kwargs)
