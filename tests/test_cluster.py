"""Cluster mode: a real ``redis-server`` on a free port and real ``kvstore serve``
processes joining it, driven through the cluster client."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import redis
import torch

from bench.procs import RedisServer, ShardedRedis, directory_server, free_port, redis_server
from client import Client, Namespace
from client.cluster import ClusterStore
from client.placement import rank_nodes
from kvstore.cluster.directory import Entry, NodeInfo, holders
from kvstore.cluster.redis_directory import RedisDirectory
from kvstore.errors import (
    ConfigError,
    DirectoryUnavailableError,
    InvalidArgumentError,
    PermissionDeniedError,
)
from tests.conftest import LAYOUT, make_config, random_kv, random_tokens, read_checked
from tests.node import NodeProcess, start_node

HEARTBEAT, TTL = 0.2, 1.0
FAST = {"KVSTORE_CLUSTER_HEARTBEAT": str(HEARTBEAT), "KVSTORE_CLUSTER_TTL": str(TTL)}
NS = Namespace("tiny-llama", LAYOUT)
TOKENS = 16 * 12  # 12 blocks a prompt


KINDS = ["redis", "redis-cluster"]  # the suite runs on one Redis and on a 3-shard Redis Cluster
Server = RedisServer | ShardedRedis


def _start(r: Server, host: str, *flags: str, env: dict[str, str] | None = None) -> NodeProcess:
    return start_node(
        None,
        "--redis",
        r.url,
        "--cluster-host",
        host,
        "--transfer",
        "tcp",
        *flags,
        env=FAST | (env or {}),
    )


@contextmanager
def _cluster(hosts: list[str], kind: str = "redis") -> Iterator[tuple[Server, list[NodeProcess]]]:
    with directory_server(kind) as r, ThreadPoolExecutor(len(hosts)) as pool:
        nodes = list(pool.map(lambda h: _start(r, h), hosts))
        try:
            yield r, nodes
        finally:
            for n in nodes:
                if n.proc.poll() is None:
                    n.stop()


def _client(r: Server, host: str, **kw: object) -> Client:
    store = ClusterStore(RedisDirectory(r.url), host=host, down_for=TTL, refresh=0.1, **kw)  # type: ignore[arg-type]
    return Client(store, NS, owns_store=True)


def _blocks_on(node: NodeProcess) -> int:
    with Client.connect(node.url, namespace=NS) as c:
        return c.stats().blocks


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _prompt(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return random_tokens(TOKENS, seed), random_kv(TOKENS, seed)


def _mget_calls(r: Server) -> int:
    calls = 0
    for port in r.ports:
        with redis.Redis(port=port) as shard:
            calls += int(shard.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_written_through_one_node_read_through_another(kind: str) -> None:
    with (
        _cluster(["host-a", "host-b", "host-c"], kind) as (r, (a, b, c)),
        _client(r, "host-a") as writer,
        _client(r, "host-b") as reader,
    ):
        tokens, kv = _prompt(1)
        assert writer.put(tokens, kv) == TOKENS
        # the writer's own host takes the chain, whole
        assert [_blocks_on(n) for n in (a, b, c)] == [12, 0, 0]
        before = _mget_calls(r)
        assert reader.lookup(tokens) == TOKENS
        # one MGET; on a cluster one per hash slot the chain's keys fall in
        slots = {k[1] for k in RedisDirectory(r.url).loc_keys(reader.keys(tokens))}
        assert _mget_calls(r) == before + (1 if kind == "redis" else len(slots))
        assert read_checked(reader, tokens, kv) == TOKENS
        # a prefix shared by a longer prompt is found, and the tail goes
        # to the node holding the prefix though the writer is elsewhere
        longer = torch.cat([tokens, random_tokens(32, 99)])
        longer_kv = torch.cat([kv, random_kv(32, 99)], dim=2)
        assert reader.lookup(longer) == TOKENS
        reader.put(longer, longer_kv)
        assert [_blocks_on(n) for n in (a, b, c)] == [14, 0, 0]
        # a put straight to one node is published by that node
        other_tokens, other_kv = _prompt(2)
        with Client.connect(c.url, namespace=NS) as direct:
            direct.put(other_tokens, other_kv)
        assert read_checked(reader, other_tokens, other_kv) == TOKENS
        # deleting through the cluster removes every copy and its entries
        assert reader.delete(reader.keys(other_tokens)) == 12
        assert writer.lookup(other_tokens) == 0
        assert _blocks_on(c) == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("replicas", [1, 2])
def test_sigkill_turns_blocks_into_misses_or_replica_hits(replicas: int, kind: str) -> None:
    with (
        _cluster(["h1", "h2", "h3"], kind) as (r, nodes),
        _client(r, "elsewhere", replicas=replicas) as c,
    ):
        prompts = [_prompt(s) for s in range(12)]
        for tokens, kv in prompts:
            c.put(tokens, kv)
        counts = [_blocks_on(n) for n in nodes]
        assert sum(counts) == 12 * 12 * replicas
        victim = max(range(3), key=lambda i: counts[i])
        nodes[victim].proc.kill()
        nodes[victim].proc.wait()
        # at once (its heartbeat not yet expired) and after: no error, no wrong bytes
        served_now = [read_checked(c, t, kv) for t, kv in prompts]
        time.sleep(TTL + 2 * HEARTBEAT)
        served_later = [read_checked(c, t, kv) for t, kv in prompts]
        looked_up = [c.lookup(t) for t, _ in prompts]
        if replicas == 2:
            assert served_now == served_later == looked_up == [TOKENS] * 12
        else:
            lost = sum(1 for s in served_later if s < TOKENS)
            assert 0 < lost < 12
            assert served_now == served_later == looked_up
            assert sum(s // 16 for s in served_later) == 12 * 12 - counts[victim]
        # the dead node's entries were pruned as lookups met them
        victim_name = nodes[victim].summary["node"]
        directory = RedisDirectory(r.url)
        keys = [k for t, _ in prompts for k in c.keys(t)]
        assert all(
            victim_name not in {x.node for x in loc} for loc in directory.lookup(keys, prefix=False)
        )
        assert victim_name not in {n.name for n in directory.nodes()}


def test_redis_outage_degrades_to_misses_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    with (
        _cluster(["host-a", "host-b", "host-c"]) as (r, nodes),
        _client(r, "host-a") as home_client,
        _client(r, "host-b") as other,
    ):
        tokens, kv = _prompt(3)
        home_client.put(tokens, kv)  # lands on host-a's node
        r.stop()
        with caplog.at_level(logging.WARNING, logger="client.cluster"):
            # the node on the client's own host still serves its blocks ...
            assert read_checked(home_client, tokens, kv) == TOKENS
            # ... and the other client degrades to misses, not errors
            assert other.lookup(tokens) == 0
            assert read_checked(other, tokens, kv) == 0
        assert other.store.counters["directory_failures"] > 0  # type: ignore[attr-defined]
        assert "unreachable" in caplog.text
        time.sleep(3 * HEARTBEAT)  # the nodes' heartbeats fail too, and they keep serving
        assert read_checked(home_client, tokens, kv) == TOKENS
        # Redis comes back empty: nodes re-register and republish on their own
        r.start()
        _wait(lambda: other.lookup(tokens) == TOKENS)
        assert read_checked(other, tokens, kv) == TOKENS
        with Client.connect(nodes[0].url, namespace=NS) as direct:
            cluster = direct.store.stats_json()["service"]["cluster"]  # type: ignore[attr-defined]
        assert cluster["reachable"] and cluster["failures"] > 0 and cluster["republished"] >= 2


@pytest.mark.parametrize("kind", KINDS)
def test_a_joining_node_takes_new_writes(kind: str) -> None:
    with _cluster(["h1", "h2", "h3"], kind) as (r, nodes), _client(r, "elsewhere") as c:
        for s in range(6):
            c.put(*_prompt(s))
        before = [_blocks_on(n) for n in nodes]
        # 1 GiB free against ~64 MiB on each of the others (not prefaulted: it stays empty)
        big = {"KVSTORE_DRAM_PREFAULT": "0"}
        fourth = _start(r, "h4", "--dram-capacity", "1GiB", env=big)
        try:
            _wait(lambda: len(c.store.nodes()) == 4)  # type: ignore[attr-defined]
            for s in range(100, 130):
                c.put(*_prompt(s))
            # weighted by free bytes, the new node takes most new chains (~85% expected)
            gained = [_blocks_on(n) - b for n, b in zip(nodes, before, strict=True)]
            assert _blocks_on(fourth) >= 12 * 30 // 2
            assert _blocks_on(fourth) > max(gained)
            # and a writer on its host sends everything there
            with _client(r, "h4") as local:
                held = _blocks_on(fourth)
                local.put(*_prompt(500))
                assert _blocks_on(fourth) == held + 12
            for s in (0, 100, 500):
                assert read_checked(c, *_prompt(s)) == TOKENS
        finally:
            fourth.stop()


def test_node_starts_without_redis_and_joins_when_it_comes() -> None:
    port = free_port()
    with redis_server(port, start=False) as r:
        node = _start(r, "h1")
        try:
            with Client.connect(node.url, namespace=NS) as direct:
                tokens, kv = _prompt(7)
                direct.put(tokens, kv)
                assert read_checked(direct, tokens, kv) == TOKENS
            r.start()
            with _client(r, "elsewhere") as c:
                _wait(lambda: c.lookup(tokens) == TOKENS)
                assert read_checked(c, tokens, kv) == TOKENS
        finally:
            rc, err = node.stop()
        assert rc == 0, err
        assert "unreachable" in err


def _listed(r: Server) -> list[dict[str, object]]:
    cmd = [sys.executable, "-m", "kvstore", "nodes", "--redis", r.url, "--json"]
    return list(json.loads(subprocess.run(cmd, capture_output=True, check=True, text=True).stdout))


@pytest.mark.parametrize("kind", KINDS)
def test_clean_shutdown_leaves_the_cluster(kind: str) -> None:
    with _cluster(["h1", "h2"], kind) as (r, (a, b)):
        listed = _listed(r)
        assert sorted(n["name"] for n in listed) == sorted(n.summary["node"] for n in (a, b))
        assert {n["url"] for n in listed} == {a.url, b.url}
        assert all(n["backend"] == "tcp" and n["dram_free"] == 64 << 20 for n in listed)
        assert a.stop()[0] == 0
        assert [n["name"] for n in _listed(r)] == [b.summary["node"]]


def test_directory_passwords_are_never_shown() -> None:
    d = RedisDirectory("redis://:s3cret@127.0.0.1:1/0", timeout=0.5)
    assert d.url == "redis://:***@127.0.0.1:1/0"
    with pytest.raises(DirectoryUnavailableError) as e:
        d.nodes()
    assert "s3cret" not in str(e.value)
    with pytest.raises(ConfigError) as bad:
        RedisDirectory("http://u:s3cret@x:1/0")
    assert "s3cret" not in str(bad.value)


def test_bad_directory_urls_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="redis://"):
        RedisDirectory("http://127.0.0.1:1/0")
    with pytest.raises(RuntimeError, match="directory URL"):
        start_node(None, "--redis", "mysql://x")


# -- placement: a pure function, checked on many seeds ---------------------------------


def _node(name: str, free: int, host: str = "") -> NodeInfo:
    return NodeInfo(name, f"kvstore://{name}:1", host or name, "tcp", free, free)


def test_rendezvous_spreads_chains_by_free_bytes() -> None:
    nodes = [_node("a", 100), _node("b", 100), _node("c", 200)]
    rng = random.Random(0)
    wins = {"a": 0, "b": 0, "c": 0}
    for _ in range(4000):
        wins[rank_nodes(nodes, rng.randbytes(16), need=1)[0].name] += 1
    assert abs(wins["c"] / 4000 - 0.5) < 0.04
    assert abs(wins["a"] - wins["b"]) / 4000 < 0.05
    # the same chain ranks the same way for every writer
    seed = rng.randbytes(16)
    assert rank_nodes(nodes, seed, need=1) == rank_nodes(list(reversed(nodes)), seed, need=1)


def test_prefix_holders_then_locality_then_room() -> None:
    nodes = [_node("a", 100, "x"), _node("b", 100, "y"), _node("c", 10, "z")]
    seed = bytes(16)
    assert rank_nodes(nodes, seed, need=50, holders=["b"], host="x")[0].name == "b"
    assert rank_nodes(nodes, seed, need=50, host="x")[0].name == "a"
    # a holder without room loses to a node with room
    assert rank_nodes(nodes, seed, need=50, holders=["c"])[0].name != "c"
    assert rank_nodes(nodes, seed, need=50, holders=["c"])[-1].name == "c"


@pytest.mark.parametrize("kind", KINDS)
def test_directory_records_round_trip_merge_and_expire(kind: str) -> None:
    with directory_server(kind) as r:
        d = RedisDirectory(r.url, ttl=0.3)
        k = [bytes([i]) * 16 for i in range(6)]
        assert d.register(_node("n1", 1 << 20)) is False  # first time: the node must publish
        assert d.register(_node("n1", 1 << 20)) is True
        d.register(_node("n2", 1 << 20))
        d.publish("n1", [Entry(k[i], "ssd", 100 + i, 7 * i) for i in range(3)])
        d.publish("n2", [Entry(k[1], "dram", 101, 7)])
        d.publish("n1", [Entry(k[1], "dram", 101, 7)])  # n1's record replaced, n2's kept
        locs = d.lookup([k[0], k[1], k[5], k[2]], prefix=True)
        assert [sorted(loc) for loc in locs] == [[("n1", "ssd")], [("n1", "dram"), ("n2", "dram")]]
        assert [len(x) for x in d.lookup([k[0], k[5], k[2]], prefix=False)] == [1, 0, 1]
        d.unpublish("n1", k[:3])
        assert d.lookup(k[:3], prefix=False) == [(), (("n2", "dram"),), ()]
        # copies on nodes the caller does not count are reported, not returned
        dead: dict[str, list[bytes]] = {}
        d.publish("n1", [Entry(k[4], "dram", 1, 1)])
        assert d.lookup([k[1], k[4]], prefix=True, live={"n1"}, dead=dead) == []
        assert dead == {"n2": [k[1]]}
        # an entry left with no copy is deleted; membership is four keys in one slot
        held = {key for p in r.ports for key in redis.Redis(port=p).scan_iter()}
        members = {f"{{kvstore}}:{n}".encode() for n in ("nodes", "alive", "ids", "next")}
        assert held == members | {d.loc_keys([k[1]])[0], d.loc_keys([k[4]])[0]}
        time.sleep(0.4)  # the heartbeats lapse
        assert d.nodes() == []
        assert d.register(_node("n1", 1 << 20)) is False  # expired: publish again


def _locate_cli(url: str, tokens: torch.Tensor) -> dict[str, object]:
    ids = " ".join(str(int(t)) for t in tokens)
    cmd = [sys.executable, "-m", "kvstore", "locate", "--url", url, NS.root.hex()]
    out = subprocess.run([*cmd, "--tokens", ids, "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


@pytest.mark.parametrize("kind", KINDS)
def test_locate_names_each_holder_and_how_much_it_holds(kind: str) -> None:
    with _cluster(["host-a", "host-b"], kind) as (r, (a, b)), _client(r, "router") as router:
        tokens, kv = _prompt(3)
        with Client.connect(a.url, namespace=NS) as direct:
            assert direct.put(tokens, kv) == TOKENS  # all 12 blocks on a
        with Client.connect(b.url, namespace=NS) as direct:
            assert direct.put(tokens[:48], kv[:, :, :48]) == 48  # the first 3 on b
        names = [a.summary["node"], b.summary["node"]]
        _wait(lambda: [h.tokens for h in router.locate(tokens)] == [TOKENS, 48])
        before = _mget_calls(r)
        found = router.locate(tokens)
        slots = {k[1] for k in RedisDirectory(r.url).loc_keys(router.keys(tokens))}
        assert _mget_calls(r) == before + (1 if kind == "redis" else len(slots))
        assert [(h.node, h.url, h.host) for h in found] == [
            (names[0], a.url, "host-a"),
            (names[1], b.url, "host-b"),
        ]
        assert found[0].tokens_by_tier == {"dram": TOKENS}
        # a longer prompt: the holders of its known prefix, no more
        longer = torch.cat([tokens, random_tokens(32, 98)])
        assert [h.tokens for h in router.locate(longer)] == [TOKENS, 48]
        assert router.locate(random_tokens(TOKENS, 97)) == []
        # asked through a node: the same answer, from its directory, uncounted
        with Client.connect(b.url, namespace=NS) as via_node:
            lookups = via_node.stats().lookups
            assert via_node.locate(tokens) == found
            assert via_node.stats().lookups == lookups
        shown = _locate_cli(b.url, tokens)
        assert [(h["node"], h["tokens"]) for h in shown["holders"]] == [  # type: ignore[attr-defined]
            (names[0], TOKENS),
            (names[1], 48),
        ]
        # a node that left is not named, though its entries are still there
        b.stop()
        _wait(lambda: [h.node for h in router.locate(tokens)] == [names[0]])


def test_locate_on_a_lone_node_and_with_no_directory() -> None:
    node = start_node(None, "--transfer", "tcp")
    try:
        with Client.connect(node.url, namespace=NS) as c:
            tokens, kv = _prompt(4)
            c.put(tokens[:80], kv[:, :, :80])
            (alone,) = c.locate(tokens)
            assert (alone.node, alone.url, alone.tokens) == (node.summary["node"], node.url, 80)
            shown = _locate_cli(node.url, tokens)
            assert shown["holders"][0]["tokens"] == 80  # type: ignore[index]
            assert shown["holders"][0]["url"] == node.url  # type: ignore[index]
    finally:
        node.stop()
    with redis_server() as r, _client(r, "router") as router:
        tokens, _ = _prompt(5)
        assert router.locate(tokens) == []
        r.stop()
        with pytest.raises(DirectoryUnavailableError):
            router.locate(tokens)
    with (
        Client.local(make_config(None), namespace=NS) as embedded,
        pytest.raises(InvalidArgumentError, match="cannot say"),
    ):
        embedded.locate(tokens)


def test_holders_follow_each_nodes_leading_run_and_tiers() -> None:
    with redis_server() as r:
        d = RedisDirectory(r.url)
        for name in ("n1", "n2", "n3"):
            d.register(_node(name, 1 << 20, host=f"h-{name}"))
        k = [bytes([i]) * 16 for i in range(5)]
        d.publish(
            "n1", [Entry(k[0], "dram", 1, 1), Entry(k[1], "ssd", 1, 1), Entry(k[2], "ssd", 1, 1)]
        )
        d.publish("n2", [Entry(k[i], "dram", 1, 1) for i in (0, 1, 3, 4)])  # a gap at k[2]
        d.publish("n3", [Entry(k[i], "hbm", 1, 1) for i in (1, 2)])  # no first block
        nodes = {n.name: n for n in d.nodes()}
        out = holders(d.lookup(k, prefix=False), nodes, block_size=16)
        assert [(h.node, h.host, h.tokens) for h in out] == [("n1", "h-n1", 48), ("n2", "h-n2", 32)]
        assert out[0].tiers == ("dram", "ssd", "ssd")
        assert out[0].tokens_by_tier == {"dram": 16, "ssd": 32}
        # a node not counted live is left out
        assert [h.node for h in holders(d.lookup(k, prefix=False), {"n2": nodes["n2"]}, 16)] == [
            "n2"
        ]
        d.close()


def test_locate_through_a_node_keeps_tenants_apart() -> None:
    """A tenant asks by tokens, keyed in its own namespace: it cannot learn
    whether another tenant cached the same prompt, salted or not."""
    tenants = {"KVSTORE_SERVER_TENANT_TOKENS": "alice=tok-a,bob=tok-b"}
    with redis_server() as r:
        node = _start(r, "host-a", "--token", "admin", env=tenants)
        try:
            ns_a, ns_b = (Namespace("tiny-llama", LAYOUT, tenant=t) for t in ("alice", "bob"))
            tokens, kv = _prompt(6)
            with Client.connect(node.url, namespace=ns_a, token="tok-a") as alice:
                alice.put(tokens, kv)
                salted = alice.keys(tokens[:32], salt=b"lora-1")
                blocks = [torch.full((LAYOUT.block_nbytes,), i, dtype=torch.uint8) for i in (1, 2)]
                assert alice.put_blocks(salted, blocks) == [True, True]
                assert [h.tokens for h in alice.locate(tokens)] == [TOKENS]
                assert [h.tokens for h in alice.locate(tokens, salt=b"lora-1")] == [32]
            with Client.connect(node.url, namespace=ns_b, token="tok-b") as bob:
                assert bob.locate(tokens) == [] and bob.locate(tokens, salt=b"lora-1") == []
                with pytest.raises(PermissionDeniedError):
                    Client.connect(node.url, namespace=ns_a, token="tok-b")
        finally:
            node.stop()
