"""Metrics: counters move exactly as a scripted workload says; /metrics parses
as Prometheus text; ``kvstore monitor`` agrees with Stats and runs live in a
pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from client import Client
from kvstore.config import MetricsConfig
from kvstore.errors import KVStoreError, StoreFullError
from kvstore.keys import Namespace, block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.rpc import Connection
from kvstore.store import TieredStore
from kvstore.version import VERSION
from tests.conftest import LAYOUT, make_config, random_kv, random_tokens
from tests.node import running_node

BS = LAYOUT.block_size  # 16 tokens a block


def _chain(tokens: torch.Tensor) -> tuple[list[bytes], list[torch.Tensor]]:
    ns = Namespace("tiny-llama", LAYOUT)
    keys = block_keys(ns, tokens)
    kv = random_kv(len(keys) * BS, seed=1)
    return keys, LAYOUT.block_slices(kv, len(keys))


def test_lookup_counters_follow_a_scripted_workload(tmp_path: Path) -> None:
    ns = Namespace("tiny-llama", LAYOUT)
    tokens = random_tokens(400 * BS, seed=3)
    keys, blocks = _chain(tokens[: 10 * BS])
    with TieredStore(make_config(tmp_path / "ssd")) as first:  # 5 blocks, flushed to SSD
        first.put(keys[:5], blocks[:5], [None, *keys[:4]], ns_tag=ns.tag)
    with TieredStore(make_config(tmp_path / "ssd")) as store:
        store.open_namespace(ns)
        store.put(keys[5:], blocks[5:], keys[4:9], ns_tag=ns.tag)  # 5 more, in DRAM
        all_keys = block_keys(ns, tokens)
        assert store.locate(all_keys[:20], ns_tag=ns.tag) == ["ssd"] * 5 + ["dram"] * 5
        assert store.lookup(all_keys[:300], ns_tag=ns.tag) == 10  # 4800 tokens: 4k-16k
        assert store.lookup(all_keys[:2], ns_tag=ns.tag) == 2  # 32 tokens
        store.lookup(block_keys(ns, random_tokens(64, seed=9)), ns_tag=ns.tag)  # a miss
        store.lookup(all_keys[:4])  # no namespace: counted as a lookup, not in tokens
        s = store.stats()
    assert s.lookups == 5
    assert s.lookup_hit_tokens == {"ssd": (5 + 5 + 2) * BS, "dram": (5 + 5) * BS}
    assert s.lookup_miss_tokens == (10 + 290 + 4) * BS
    tiers = ("hbm_hit_tokens", "dram_hit_tokens", "ssd_hit_tokens")
    assert s.shapes == {  # each prompt length's tokens found, per tier too
        "0-1k": {"lookups": 3, "hit_tokens": 12 * BS, "miss_tokens": 14 * BS}
        | dict(zip(tiers, (0, 5 * BS, 7 * BS), strict=True)),
        "4k-16k": {"lookups": 1, "hit_tokens": 10 * BS, "miss_tokens": 290 * BS}
        | dict(zip(tiers, (0, 5 * BS, 5 * BS), strict=True)),
    }
    (space,) = [n for n in s.namespaces if n.tag == ns.tag]
    assert (space.lookups, space.hit_tokens, space.miss_tokens) == (4, 22 * BS, 304 * BS)
    assert space.name == "default/tiny-llama" and space.blocks == 10
    assert s.lookup_hit_rate == pytest.approx(22 / 326)


def test_metrics_off_keeps_the_basic_counters_only() -> None:
    ns = Namespace("tiny-llama", LAYOUT)
    cfg = replace(make_config(None), metrics=MetricsConfig(enabled=False))
    keys, blocks = _chain(random_tokens(4 * BS, seed=1))
    with TieredStore(cfg) as store:
        store.open_namespace(ns)
        store.put(keys, blocks, ns_tag=ns.tag)
        assert store.lookup(keys, ns_tag=ns.tag) == 4
        s = store.stats()
    assert s.lookups == 1 and s.lookup_hit_blocks == 4
    assert s.lookup_hit_tokens == {} and s.shapes == {}


def test_refused_puts_are_counted() -> None:
    with TieredStore(make_config(None, dram=1 << 20)) as store:
        keys = [i.to_bytes(16, "little") for i in range(40)]
        payload = torch.zeros(32 * 1024, dtype=torch.uint8)
        store.put(keys[:32], [payload] * 32)  # fills the 1 MiB pool
        reading = store.begin_read(keys[:32])  # nothing evictable
        try:
            with pytest.raises(StoreFullError):
                store.put(keys[32:], [payload] * 8)
        finally:
            store.end_read(reading)
        assert store.stats().put_refused == 8


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _stats(url: str) -> dict[str, object]:
    conn = Connection(url)
    try:
        return dict(json.loads(conn.call("Stats", pb.StatsRequest()).json))
    finally:
        conn.close()


def _monitor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstore", "monitor", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_node_serves_prometheus_metrics_and_the_monitor_agrees(tmp_path: Path) -> None:
    ns = Namespace("tiny-llama", LAYOUT)
    with running_node(tmp_path / "ssd", "--metrics-port", "0") as node:
        murl = str(node.summary["metrics"])
        tokens = random_tokens(40 * BS, seed=5)
        kv = random_kv(20 * BS, seed=6)
        with Client.connect(node.url, namespace=ns, transfer="none") as c:
            c.put(tokens[: 20 * BS], kv)
            for _ in range(3):
                assert c.lookup(tokens) == 20 * BS  # 640 tokens asked, 320 found
            assert c.get(tokens[: 20 * BS], torch.empty_like(kv)) == 20 * BS
        m = _metrics(murl)
        assert m[("kvstore_lookups_total", ())] == 3
        assert m[("kvstore_lookup_hit_tokens_total", (("tier", "dram"),))] == 3 * 20 * BS
        assert m[("kvstore_lookup_miss_tokens_total", ())] == 3 * 20 * BS
        assert m[("kvstore_prefix_lookups_total", (("prefix", "0-1k"),))] == 3
        by_tier = (("prefix", "0-1k"), ("tier", "dram"))
        assert m[("kvstore_prefix_tier_hit_tokens_total", by_tier)] == 3 * 20 * BS
        assert (
            m[("kvstore_namespace_hit_tokens_total", (("namespace", "default/tiny-llama"),))] == 960
        )
        assert m[("kvstore_get_hits_total", (("tier", "dram"),))] == 20
        assert m[("kvstore_put_bytes_total", ())] == 20 * LAYOUT.block_nbytes
        assert m[("kvstore_transfer_bytes_total", (("backend", "grpc"), ("direction", "in")))] == (
            20 * LAYOUT.block_nbytes
        )
        assert m[("kvstore_rpc_calls_total", (("method", "Lookup"),))] == 3
        assert m[("kvstore_rpc_duration_seconds_count", (("method", "Lookup"),))] == 3
        assert (
            m[("kvstore_rpc_duration_seconds_bucket", (("le", "+Inf"), ("method", "Lookup")))] == 3
        )
        # the process's own collectors, the release, and errors per method
        assert m[("process_cpu_seconds_total", ())] > 0
        assert m[("process_resident_memory_bytes", ())] > 0
        (build,) = [(k, v) for k, v in m.items() if k[0] == "kvstore_build_info"]
        assert build == (("kvstore_build_info", (("backend", "tcp"), ("version", VERSION))), 1)
        conn = Connection(node.url)
        with pytest.raises(KVStoreError):
            conn.call("Lookup", pb.LookupRequest(namespace_id=b"no such namespace"))
        conn.close()
        code = (("code", "NOT_FOUND"), ("method", "Lookup"))
        assert _metrics(murl)[("kvstore_rpc_errors_total", code)] == 1
        # /metrics alone: any other path is a 404
        base = murl.removesuffix("/metrics")
        for path in ("/", "/favicon.ico", "/metricsx"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path, timeout=10)
            assert err.value.code == 404
        used = m[("kvstore_tier_used_bytes", (("tier", "dram"),))]
        free = m[("kvstore_tier_free_bytes", (("tier", "dram"),))]
        assert used > 0 and used + free == m[("kvstore_tier_capacity_bytes", (("tier", "dram"),))]

        snap = _monitor(node.url, "--once", "--json")
        assert snap.returncode == 0, snap.stderr
        mon = json.loads(snap.stdout)
        stats = _stats(node.url)
        (name,) = mon["nodes"]
        assert mon["nodes"][name]["store"] == stats["store"]
        assert mon["lookup_hit_rate"]["total"] == pytest.approx(0.5)
        assert mon["read_hit_rate"]["total"] == pytest.approx(1.0)
        assert abs(mon["time"] - time.time()) < 60  # a Unix timestamp
        assert mon["total"]["lookup_hit_tokens"] == {"dram": 960}

        text = _monitor(node.url, "--once")
        assert text.returncode == 0, text.stderr
        assert "hit rate" in text.stdout and "50.0%" in text.stdout
        assert "moved" in text.stdout  # the tiers table (80 columns wrap its header)


def test_the_live_view_runs_in_a_terminal_and_quits_on_q(tmp_path: Path) -> None:
    with running_node(tmp_path / "ssd") as node:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the monitor on a pseudo-terminal
            os.execv(
                sys.executable,
                [sys.executable, "-m", "kvstore", "monitor", node.url, "--interval", "0.2"],
            )
        seen = b""

        def read_until(marker: bytes, timeout: float = 20.0) -> bytes:
            nonlocal seen
            end = time.monotonic() + timeout
            while marker not in seen and time.monotonic() < end:
                ready, _, _ = select.select([fd], [], [], 0.2)
                if ready:
                    try:
                        seen += os.read(fd, 65536)
                    except OSError:
                        break
            return seen

        try:
            assert b"lookup (tokens found)" in read_until(b"lookup (tokens found)")
            assert b"tiers" in seen
            time.sleep(0.6)  # a few refreshes
            os.write(fd, b"\t")  # the next view: prefix shapes
            assert b"by prompt length asked" in read_until(b"by prompt length asked")
            assert b"hit rate per tier" in seen  # the tier x prompt-length view
            os.write(fd, b"q")
            end = time.monotonic() + 10
            status = None
            while time.monotonic() < end:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                read_until(b"\x00", 0.1)  # keep the pty drained
            assert status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        finally:
            try:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            os.close(fd)


def test_the_monitor_shows_every_cluster_member_and_the_total(tmp_path: Path) -> None:
    from bench.procs import RedisServer

    redis = RedisServer()
    try:
        flags = ("--redis", redis.url, "--ssd-path", "none")
        with (
            running_node(None, *flags, "--node", "a") as a,
            running_node(None, *flags, "--node", "b"),
        ):
            with Client.connect(a.url, namespace=Namespace("tiny-llama", LAYOUT)) as c:
                c.put(random_tokens(4 * BS, seed=1), random_kv(4 * BS, seed=2))
            out = _monitor(redis.url, "--once", "--json")
            assert out.returncode == 0, out.stderr
            snap = json.loads(out.stdout)
            assert sorted(snap["nodes"]) == ["a", "b"] and snap["unreachable"] == {}
            assert snap["nodes"]["a"]["store"]["blocks"] == 4
            assert snap["total"]["blocks"] == 4 and snap["total"]["puts"] == 4
            text = _monitor(redis.url, "--once", "--view", "nodes")
            assert text.returncode == 0, text.stderr
            rows = [line for line in text.stdout.splitlines() if line.startswith("│")]
            names = [r.split("│")[1].strip() for r in rows]
            assert names[-3:] == ["a", "b", "total"]
    finally:
        redis.close()
