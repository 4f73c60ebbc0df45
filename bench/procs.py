"""Real processes for benchmarks and tests: a ``redis-server`` on a free
loopback port, and ``kvstore serve`` nodes."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throw-away ``redis-server`` (no persistence) that can be stopped and
    started again on the same port, as an outage would look to clients."""

    def __init__(
        self,
        port: int | None = None,
        *,
        start: bool = True,
        host: str = "127.0.0.1",
        args: Sequence[str] = (),
    ) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(
                "redis-server is not installed: apt-get install redis-server "
                "(bash .ci/setup does it)"
            )
        self.exe = exe
        self.host = host  # a test network namespace's address, or loopback
        self.port = port or free_port()
        self.args = list(args)  # e.g. --replicaof, --cluster-enabled
        self.dir = tempfile.TemporaryDirectory(prefix="kvstore-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def ports(self) -> list[int]:
        return [self.port]

    def start(self, timeout: float = 10.0) -> None:
        cmd = [self.exe, "--port", str(self.port), "--bind", self.host, "--save", ""]
        cmd += ["--appendonly", "no", "--dir", self.dir.name, "--loglevel", "warning", *self.args]
        if self.host != "127.0.0.1":  # a test namespace's private link: no password needed
            cmd += ["--protected-mode", "no"]
        self._spawn(cmd, timeout)

    def _spawn(self, cmd: list[str], timeout: float) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {self.proc.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()  # a server that never answered is not left running
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        self.dir.cleanup()


@contextmanager
def directory_server(kind: str) -> Iterator[RedisServer | ShardedRedis]:
    """A directory of ``kind``: "redis" (one server) or "redis-cluster" (3 shards)."""
    server = RedisServer() if kind == "redis" else ShardedRedis()
    try:
        yield server
    finally:
        server.close()


@contextmanager
def redis_server(port: int | None = None, *, start: bool = True) -> Iterator[RedisServer]:
    server = RedisServer(port, start=start)
    try:
        yield server
    finally:
        server.close()


class SentinelServer(RedisServer):
    """A ``redis-server --sentinel`` watching the primary of ``service``."""

    def __init__(self, primary: int, service: str, *, down_after_ms: int = 1000) -> None:
        self.primary, self.service, self.down_after_ms = primary, service, down_after_ms
        super().__init__()

    def start(self, timeout: float = 10.0) -> None:
        conf = f"{self.dir.name}/sentinel.conf"  # sentinel rewrites it: a file of its own
        with open(conf, "w") as f:
            f.write(
                f"port {self.port}\nbind {self.host}\ndir {self.dir.name}\n"
                f"sentinel monitor {self.service} {self.host} {self.primary} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} 4000\n"
            )
        self._spawn([self.exe, conf, "--sentinel", "--loglevel", "warning"], timeout)


class SentinelSet:
    """What docs/cluster.md tells operators to run for HA: a primary, one
    replica and three sentinels, on loopback."""

    SERVICE = "kvstore"

    def __init__(self, timeout: float = 30.0) -> None:
        fast = ["--repl-diskless-sync-delay", "0"]
        self.primary = RedisServer(args=fast)
        self.replica = RedisServer(args=[*fast, "--replicaof", "127.0.0.1", str(self.primary.port)])
        self.sentinels = [SentinelServer(self.primary.port, self.SERVICE) for _ in range(3)]
        deadline = time.monotonic() + timeout
        while not self._ready():  # the replica in sync, and every sentinel knowing the rest
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the sentinels did not see the replica and each other")
            time.sleep(0.1)

    def _ready(self) -> bool:
        import redis

        with redis.Redis(port=self.replica.port) as r:
            if r.info("replication").get("master_link_status") != "up":
                return False
        for s in self.sentinels:
            with redis.Redis(port=s.port) as r:
                state = r.sentinel_master(self.SERVICE)
                if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                    return False
        return True

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.SERVICE}/0"

    def master_port(self) -> int:
        """The primary most sentinels name now."""
        import redis

        named: list[int] = []
        for s in self.sentinels:
            r = redis.Redis(port=s.port, socket_timeout=2.0)
            try:
                addr: Any = r.sentinel_get_master_addr_by_name(self.SERVICE)
                named.append(int(addr[1]))
            except redis.RedisError:
                continue
            finally:
                r.close()
        if not named:
            raise RuntimeError("no sentinel answered")
        return max(set(named), key=named.count)

    def close(self) -> None:
        for server in [*self.sentinels, self.replica, self.primary]:
            server.close()

    def __enter__(self) -> SentinelSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardedRedis:
    """A Redis Cluster of ``shards`` primaries (no replicas) on loopback."""

    def __init__(self, shards: int = 3) -> None:
        self.servers = [RedisServer(start=False) for _ in range(shards)]
        for r in self.servers:
            r.args = ["--cluster-enabled", "yes", "--cluster-port", str(free_port())]
            r.args += ["--cluster-config-file", f"{r.dir.name}/nodes.conf"]
            r.args += ["--cluster-node-timeout", "2000"]
            r.start()
        exe = shutil.which("redis-cli") or "redis-cli"
        addrs = [f"127.0.0.1:{r.port}" for r in self.servers]
        create = [exe, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"]
        subprocess.run(create, check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not all(self._ok(r.port) for r in self.servers):
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    @staticmethod
    def _ok(port: int) -> bool:
        import redis

        r = redis.Redis(port=port)
        try:
            info: Any = r.cluster("INFO")
            return bool(info.get("cluster_state") == "ok")
        finally:
            r.close()

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{r.port}" for r in self.servers)

    @property
    def ports(self) -> list[int]:
        return [r.port for r in self.servers]

    def close(self) -> None:
        for r in self.servers:
            r.close()


def serve_cmd(*flags: str) -> list[str]:
    """``kvstore serve`` on a free port, printing its start-up summary as JSON."""
    return [sys.executable, "-m", "kvstore", "serve", "--json", "--port", "0", *flags]


def start_serve(
    *flags: str,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    stderr: int | None = None,
) -> tuple[subprocess.Popen[str], dict[str, object]]:
    """A ``kvstore serve`` subprocess with ``flags``, once it is up, and its
    start-up summary (url, node, transfer endpoint, ...). ``prefix`` runs it
    under another command (``ip netns exec NS``); ``env`` is its whole
    environment when given."""
    proc = subprocess.Popen(
        [*prefix, *serve_cmd(*flags)], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
    )
    try:
        return proc, read_summary(proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def read_summary(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        err = proc.communicate(timeout=30)[1] if proc.stderr is not None else ""
        raise RuntimeError(f"kvstore serve did not start: {err}")
    return dict(json.loads(line))
