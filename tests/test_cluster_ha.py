"""The directory behind Sentinel, as docs/cluster.md sets it up: a primary, one
replica and three sentinels (real ``redis-server`` processes), two real
``kvstore serve`` nodes, and SIGKILL of the primary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis
import torch

from bench.procs import RedisServer, SentinelSet, redis_server
from client import Client
from client.cluster import ClusterStore
from kvstore.cluster.directory import Entry
from kvstore.cluster.redis_directory import RedisDirectory
from kvstore.directory_url import parse_directory_url
from kvstore.errors import ConfigError, DirectoryUnavailableError
from tests.conftest import LAYOUT, read_checked
from tests.node import NodeProcess
from tests.test_cluster import NS, TOKENS, TTL, _node, _prompt, _start, _wait

PROMPTS = 30  # x 12 blocks: 360 blocks, as the failover was first tried


@contextmanager
def _ha(hosts: list[str]) -> Iterator[tuple[SentinelSet, list[NodeProcess]]]:
    s = SentinelSet()
    nodes: list[NodeProcess] = []
    try:
        nodes = [_start(s, h) for h in hosts]  # type: ignore[arg-type]
        yield s, nodes
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.stop()
        s.close()


def _client(url: str, host: str) -> Client:
    store = ClusterStore(RedisDirectory(url), host=host, down_for=TTL, refresh=0.1)
    return Client(store, NS, owns_store=True)


def _counters(c: Client) -> dict[str, int]:
    return c.store.counters  # type: ignore[attr-defined,no-any-return]


def _all_found(c: Client, prompts: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return all(c.lookup(t) == TOKENS for t, _ in prompts)


def _kvstore(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "kvstore", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_sentinel_failover_is_followed_and_every_block_found_again() -> None:
    with (
        _ha(["host-a", "host-b"]) as (s, nodes),
        _client(s.url, "elsewhere") as remote,
        _client(s.url, "host-a") as home,
    ):
        prompts = [_prompt(i) for i in range(PROMPTS)]
        for tokens, kv in prompts:
            remote.put(tokens, kv)
        assert _all_found(remote, prompts)
        watcher = RedisDirectory(s.url, ttl=60)  # a registration that outlives the outage
        watcher.register(_node("watcher", 1 << 20))
        assert watcher.register(_node("watcher", 1 << 20)) is True
        old = s.master_port()
        s.primary.stop()  # SIGKILL
        # during the outage: a writer with a node on its host still stores
        # there; one without is told nothing was stored
        during = [_prompt(100 + i) for i in range(3)]
        for tokens, kv in during:
            assert home.put(tokens, kv) == TOKENS
        unplaced = _counters(remote)["unplaced_blocks"]
        blocks = [torch.zeros(LAYOUT.block_nbytes, dtype=torch.uint8)] * 12
        keys = remote.keys(_prompt(99)[0])
        assert remote.store.put(keys, blocks, ns_tag=NS.tag) == [False] * 12
        assert _counters(remote)["unplaced_blocks"] == unplaced + 12
        _wait(lambda: s.master_port() != old, timeout=30)
        promoted = time.monotonic()
        # every block of every live node, and those stored during the outage,
        # are found again without a restart of anything
        _wait(lambda: _all_found(remote, prompts + during), timeout=10)
        found_after = time.monotonic() - promoted
        assert found_after < 10
        # replicated or not, the new primary may lack the last writes: a node
        # is told to republish everything once the primary moved
        assert watcher.register(_node("watcher", 1 << 20)) is False
        assert watcher.register(_node("watcher", 1 << 20)) is True
        watcher.leave("watcher")
        watcher.close()
        for n in nodes:
            with Client.connect(n.url, namespace=NS) as direct:
                assert direct.store.stats_json()["service"]["cluster"]["republished"] >= 2  # type: ignore[attr-defined]
        for tokens, kv in prompts + during:
            assert read_checked(remote, tokens, kv) == TOKENS
        # a fresh client sees both nodes: their heartbeats moved to the new primary
        with _client(s.url, "fresh") as fresh:
            assert len(fresh.store.nodes()) == 2  # type: ignore[attr-defined]
            assert _all_found(fresh, prompts)
        # and so do the operator's tools, given the same Sentinel URL
        names = sorted(str(n.summary["node"]) for n in nodes)
        listed = json.loads(_kvstore("nodes", "--redis", s.url, "--json"))
        assert sorted(n["name"] for n in listed) == names
        snap = json.loads(_kvstore("monitor", s.url, "--once", "--json"))
        assert sorted(snap["nodes"]) == names and snap["unreachable"] == {}
        print(f"\nfailover: found again {found_after:.2f} s after the promotion")


def test_the_returning_old_primary_is_never_written_to() -> None:
    with _ha(["host-a", "host-b"]) as (s, nodes), _client(s.url, "elsewhere") as c:
        prompts = [_prompt(i) for i in range(6)]
        for tokens, kv in prompts:
            c.put(tokens, kv)
        old = s.master_port()
        s.primary.stop()
        _wait(lambda: s.master_port() != old, timeout=30)
        _wait(lambda: _all_found(c, prompts))
        s.primary.start()  # back, empty, believing it is the primary
        # while the sentinels demote it, and after: every put is published
        # where readers look, and nothing flips between reachable and not
        written = []
        deadline = time.monotonic() + 6
        seed = 200
        while time.monotonic() < deadline:
            tokens, kv = _prompt(seed)
            c.put(tokens, kv)
            written.append((tokens, kv))
            seed += 1
            time.sleep(0.1)
        if not _within(lambda: _role(s.primary) == "slave", 20):
            # Sentinel demotes a returning primary once it has watched it for a
            # while (10-60 s here); past 20 s, send what it would send
            with redis.Redis(port=s.primary.port) as back:
                back.replicaof("127.0.0.1", s.master_port())
            _wait(lambda: _role(s.primary) == "slave")
        failures = _counters(c)["directory_failures"]
        time.sleep(10 * 0.1 + 3 * TTL)
        for tokens, kv in prompts + written:
            assert read_checked(c, tokens, kv) == TOKENS
        assert _counters(c)["directory_failures"] == failures
        for n in nodes:
            with Client.connect(n.url, namespace=NS) as direct:
                cluster = direct.store.stats_json()["service"]["cluster"]  # type: ignore[attr-defined]
            assert cluster["reachable"]
        # a directory pointed straight at the demoted server: READONLY is an
        # outage, never a success
        direct_url = f"redis://127.0.0.1:{s.primary.port}/0"
        d = RedisDirectory(direct_url)
        with pytest.raises(DirectoryUnavailableError, match="read only replica"):
            d.register(_node("n9", 1 << 20))
        d.close()


def _within(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _role(server: RedisServer) -> str:
    with redis.Redis(port=server.port) as r:
        return str(r.info("replication")["role"])


def test_an_entry_is_at_most_64_bytes_of_redis_memory() -> None:
    n = 50_000
    with redis_server() as r:
        d = RedisDirectory(r.url)
        d.register(_node("n1", 1 << 20))
        rr = redis.Redis(port=r.port)
        before = int(rr.info("memory")["used_memory"])
        keys = [os.urandom(16) for _ in range(n)]
        d.publish("n1", [Entry(k, "dram", 1 << 20, 7) for k in keys])
        per_entry = (int(rr.info("memory")["used_memory"]) - before) / n
        assert rr.dbsize() == n + 4
        assert per_entry <= 64, f"{per_entry:.1f} B per entry"
        # a second copy on another node costs its few bytes, and both are found
        d.register(_node("n2", 1 << 20))
        d.publish("n2", [Entry(k, "ssd", 1 << 20, 7) for k in keys[:10]])
        locs = d.lookup(keys[:12], prefix=False)
        assert [sorted(x) for x in locs[:10]] == [[("n1", "dram"), ("n2", "ssd")]] * 10
        assert locs[10:] == [(("n1", "dram"),)] * 2
        d.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:26379/",  # no service name
        "redis+sentinel://127.0.0.1:x/kv/0",
        "redis+sentinel://127.0.0.1:1/kv/zero",
        "redis+cluster://127.0.0.1:1/3",  # a cluster has DB 0 only
        "redis+cluster://,127.0.0.1:1",
    ],
)
def test_bad_ha_urls_are_clear_errors(url: str) -> None:
    with pytest.raises(ConfigError, match=r"directory URL|Sentinel|Cluster"):
        RedisDirectory(url)


def test_ha_urls_parse_and_mask_the_password() -> None:
    t = parse_directory_url("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2,[::1]:5/mymaster/3")
    assert t.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 5))
    assert (t.service, t.db, t.password, t.kind) == ("mymaster", 3, "pw", "redis")
    assert "pw" not in t.shown and ":***@" in t.shown
    c = parse_directory_url("redis+cluster://a:7000,b:7001")
    assert (c.hosts, c.kind) == ((("a", 7000), ("b", 7001)), "cluster")
