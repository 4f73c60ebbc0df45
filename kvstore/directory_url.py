"""Where a cluster's directory lives, as a URL, and a redis-py client for it.

Three deployments, one URL each:

- ``redis://[:PASSWORD@]HOST:PORT/DB`` (``rediss://`` for TLS, ``unix:///path.sock``):
  one Redis, or a primary an operator fails over by hand.
- ``redis+sentinel://[:PASSWORD@]HOST1:PORT1,HOST2:PORT2,.../SERVICE/DB``: the
  primary of ``SERVICE`` as the sentinels elect it. Every new connection asks
  them, so a promotion is followed without a restart, and a connection that
  meets ``READONLY`` (its server was demoted) is dropped and redialled.
- ``redis+cluster://[:PASSWORD@]HOST1:PORT1,HOST2:PORT2,...``: a Redis Cluster,
  any of its nodes as the seeds (DB 0 only; the client follows ``MOVED`` and
  failovers of each shard).

The password reaches the Redis servers (not the sentinels) and is masked in
everything shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from kvstore.errors import ConfigError

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
_DEFAULT_PORT = {"redis+sentinel": 26379, "redis+cluster": 6379}


@dataclass(frozen=True)
class DirectoryURL:
    url: str  # as given
    shown: str  # password masked
    scheme: str
    hosts: tuple[tuple[str, int], ...] = ()  # sentinels or cluster seeds
    service: str = ""  # the sentinels' name for the primary
    db: int = 0
    password: str | None = None

    @property
    def kind(self) -> str:
        """ "redis" (one server, maybe Sentinel-managed) or "cluster"."""
        return "cluster" if self.scheme == "redis+cluster" else "redis"


def parse_directory_url(url: str) -> DirectoryURL:
    parts = urlsplit(url)
    shown = url
    if parts.password is not None:
        shown = url.replace(f":{parts.password}@", ":***@", 1)
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise ConfigError(
            "directory URL must look like redis://host:port/db, "
            "redis+sentinel://host:port,host:port/service/db or "
            f"redis+cluster://host:port,host:port, got {shown!r}"
        )
    password = None if parts.password is None else unquote(parts.password)
    if scheme not in _DEFAULT_PORT:
        if not (parts.hostname or parts.path):
            raise ConfigError(f"directory URL {shown!r} names no host")
        return DirectoryURL(url, shown, scheme, password=password)
    hosts = _hosts(parts.netloc.rpartition("@")[2], _DEFAULT_PORT[scheme], shown)
    path = [p for p in parts.path.split("/") if p]
    if scheme == "redis+cluster":
        if path and path != ["0"]:
            raise ConfigError(f"a Redis Cluster has only DB 0, got {shown!r}")
        return DirectoryURL(url, shown, scheme, hosts, password=password)
    if not path or len(path) > 2:
        raise ConfigError(f"a Sentinel URL ends in /SERVICE_NAME[/DB], got {shown!r}")
    db = _int(path[1], "DB", shown) if len(path) == 2 else 0
    return DirectoryURL(url, shown, scheme, hosts, path[0], db, password)


def _hosts(netloc: str, default_port: int, shown: str) -> tuple[tuple[str, int], ...]:
    out = []
    for part in netloc.split(","):
        host, _, port = part.strip().rpartition(":") if ":" in part else (part.strip(), "", "")
        if not host:
            raise ConfigError(f"directory URL {shown!r} has an empty host in {netloc!r}")
        out.append((host.strip("[]"), _int(port, "port", shown) if port else default_port))
    return tuple(out)


def _int(text: str, what: str, shown: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"directory URL {shown!r}: {what} {text!r} is not a number") from None


def connect(target: DirectoryURL, timeout: float) -> Any:
    """A redis-py client (``redis.Redis`` or ``redis.RedisCluster``) that never
    retries on its own: the directory's callers decide what an outage means."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    opts: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if target.scheme == "redis+sentinel":
        from redis import sentinel as redis_sentinel

        make: Any = redis_sentinel.Sentinel  # typed in some redis-py releases, not others
        sentinel = make(
            list(target.hosts),
            sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
            **opts,
        )
        return sentinel.master_for(target.service, db=target.db, password=target.password, **opts)
    if target.scheme == "redis+cluster":
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in target.hosts],  # type: ignore[no-untyped-call]
            password=target.password,
            **opts,
        )
    return redis.Redis.from_url(target.url, **opts)
