"""Cluster mode on this machine: aggregate get bandwidth and directory lookups.

- Aggregate get GB/s with 1, 2 and 3 ``kvstore serve`` nodes sharing a real
  ``redis-server``: one writer spreads 24 chains of 4 x 2 MiB blocks over the
  nodes, then 3 reader processes each read every chain (into registered
  buffers, byte-checked) at once. Each figure is a ratio against the same
  run's single node. On one 2-core machine the nodes and readers share the
  same cores and memory bus, so this shows the overhead of spreading, not the
  scaling separate hosts would give.
- Lookup of a 32k-token prompt in a directory of 10^6 entries, on one Redis
  and on a 3-shard Redis Cluster, p50 and p99, as 2048 keys (16-token
  blocks) and as 64 keys (512-token blocks), each against a raw ``MGET`` of
  the same Redis names through the same client (the floor: what remains is
  naming, parsing and liveness filtering); and the whole tokens -> hit count
  (keying included) beside a ``PING``.
- Redis memory per entry (``used_memory`` before and after) beside the
  previous layout's names and records written raw.
- A Sentinel failover (primary, replica, 3 sentinels, down-after 1 s):
  SIGKILL of the primary until a lookup finds every published block again,
  beside SIGKILL until the sentinels name the new primary.

Run: ``python -m bench.cluster`` or ``kvstore bench cluster`` (``--json``,
``--backend shm``, ``--quick`` for a smoke run).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import subprocess
import sys
import time
from functools import partial
from typing import Any

import redis

from bench.procs import SentinelSet, directory_server, read_summary, redis_server, serve_cmd
from bench.report import Row, bench_parser, percentiles_ms, print_table
from client import Client, KVLayout, Namespace
from client.cluster import ClusterStore
from kvstore.cluster.directory import Entry, NodeInfo
from kvstore.cluster.redis_directory import PUBLISH_BATCH, RedisDirectory
from kvstore.directory_url import connect, parse_directory_url
from kvstore.errors import DirectoryUnavailableError
from kvstore.tier import Tier

MiB = 1 << 20
# 32 layers x K/V x 16 tokens x 8 kv heads x 128 dims x fp16 = 2 MiB per block
LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16")
NS = Namespace("bench-cluster", LAYOUT)


def _chain(c: int, blocks: int) -> list[int]:
    return list(range(c * 1_000_000, c * 1_000_000 + blocks * LAYOUT.block_size))


def _reader(url: str, chains: int, blocks: int, rounds: int, barrier: Any, out: Any) -> None:
    with Client(ClusterStore(RedisDirectory(url)), NS, owns_store=True) as c:
        dst = c.alloc(blocks * LAYOUT.block_nbytes)
        views = list(dst.view(blocks, LAYOUT.block_nbytes))
        for ch in range(chains):  # warm: connections, registrations, page faults
            c.get_blocks(c.keys(_chain(ch, blocks)), views)
        barrier.wait()
        t0 = time.perf_counter()
        moved = 0
        for _ in range(rounds):
            for ch in range(chains):
                hits = c.get_blocks(c.keys(_chain(ch, blocks)), views)
                assert all(hits), "a stored chain missed"
                assert int(dst[0]) == ch % 251, "wrong bytes"
                moved += blocks * LAYOUT.block_nbytes
        out.put((moved, time.perf_counter() - t0))


def aggregate_gbs(
    backend: str, nodes: int, readers: int, chains: int, blocks: int, rounds: int
) -> tuple[float, list[int]]:
    """Readers' total GB/s over ``nodes`` nodes, and the chains each node got."""
    with redis_server() as r:
        cmd = serve_cmd(
            "--ssd-path", "none", "--dram-capacity", "640MiB", "--transfer", backend,
            "--redis", r.url,
        )  # fmt: skip
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(nodes)]
        try:
            names = [str(read_summary(p)["node"]) for p in procs]
            store = ClusterStore(RedisDirectory(r.url), host="bench-writer")
            with Client(store, NS, owns_store=True) as c:
                src = c.alloc(blocks * LAYOUT.block_nbytes)
                for ch in range(chains):
                    src.fill_(ch % 251)
                    c.put(_chain(ch, blocks), list(src.view(blocks, LAYOUT.block_nbytes)))
                assert isinstance(c.store, ClusterStore)
                stats = c.store.stats_by_node()
                per_node = [stats[n].blocks // blocks for n in names]
            ctx = mp.get_context("spawn")
            barrier, out = ctx.Barrier(readers), ctx.Queue()
            procs_r = [
                ctx.Process(target=_reader, args=(r.url, chains, blocks, rounds, barrier, out))
                for _ in range(readers)
            ]
            for rp in procs_r:
                rp.start()
            results = [out.get(timeout=600) for _ in procs_r]
            for rp in procs_r:
                rp.join()
                assert rp.exitcode == 0, "a reader failed"
        finally:
            for node in procs:
                node.terminate()
                node.wait(60)
    moved = sum(m for m, _ in results)
    return moved / max(s for _, s in results) / 1e9, per_node


def _bench_node(url: str) -> RedisDirectory:
    """A directory on ``url`` with one registered (pretend) node to publish as."""
    d = RedisDirectory(url, ttl=3600)
    d.register(NodeInfo("bench-node", "kvstore://127.0.0.1:1", "bench", "tcp", 1 << 30, 1 << 30))
    return d


def _publish(d: RedisDirectory, keys: list[bytes], tier: Tier) -> None:
    for first in range(0, len(keys), 64 * PUBLISH_BATCH):
        part = keys[first : first + 64 * PUBLISH_BATCH]
        d.publish("bench-node", [Entry(k, tier, LAYOUT.block_nbytes, 1) for k in part])


def _filler(n: int) -> list[bytes]:
    """``n`` block keys as the store makes them: uniform bytes (SHA-256)."""
    return [hashlib.sha256(i.to_bytes(8, "little")).digest()[:16] for i in range(n)]


def lookup_rows(kind: str, entries: int, samples: int) -> list[Row]:
    """Lookups in a directory of ``entries`` on ``kind`` ("redis" or
    "redis-cluster"), beside a raw ``MGET`` of the same Redis names."""
    with directory_server(kind) as server:
        d = _bench_node(server.url)
        tokens = list(range(32 * 1024))
        with Client(ClusterStore(RedisDirectory(server.url)), NS, owns_store=True) as c:
            keys = c.keys(tokens)
            _publish(d, keys, Tier.DRAM)
            _publish(d, _filler(entries - len(keys)), Tier.SSD)
            held = sum(redis.Redis(port=port).dbsize() for port in server.ports)
            assert held >= entries, f"{held} Redis keys for {entries} entries"
            assert c.lookup(tokens) == len(tokens)
            store = c.store
            raw = connect(parse_directory_url(server.url), 5.0)
            mget = raw.mget_nonatomic if kind == "redis-cluster" else raw.mget
            rows = []
            for n in (len(keys), len(keys) // 32):  # 16-token blocks; 512-token (Mooncake's)
                ours = percentiles_ms(partial(store.lookup, keys[:n], ns_tag=NS.tag), samples)
                floor = percentiles_ms(partial(mget, d.loc_keys(keys[:n])), samples)
                what = f"directory lookup ({kind}), {n} keys in {entries:.0e}"
                rows += [
                    Row(f"{what} p50", ours[0], "ms", "raw MGET, same names p50", floor[0], False),
                    Row(f"{what} p99", ours[1], "ms", "raw MGET, same names p99", floor[1], False),
                ]
            e2e = percentiles_ms(lambda: c.lookup(tokens), samples)
            ping = percentiles_ms(raw.ping, samples)
            raw.close()
        d.close()
    return [
        *rows,
        Row(f"{kind}: tokens -> hit count, 32k p50", e2e[0], "ms", "PING p50", ping[0], False),
    ]


def entry_bytes_row(entries: int) -> Row:
    """Redis memory an entry costs, beside the previous layout (a
    ``P:loc:`` + 16-byte name holding a 21-byte record) stored raw."""
    keys = _filler(entries)
    with redis_server() as server:
        r = redis.Redis(port=server.port)
        d = _bench_node(server.url)
        before = int(r.info("memory")["used_memory"])
        _publish(d, keys, Tier.DRAM)
        ours = (int(r.info("memory")["used_memory"]) - before) / entries
        d.flush()
        d.close()
        r.flushall()
        before = int(r.info("memory")["used_memory"])
        record = bytes(21)
        for first in range(0, entries, 10_000):
            r.mset({b"kvstore:loc:" + k: record for k in keys[first : first + 10_000]})
        old = (int(r.info("memory")["used_memory"]) - before) / entries
        r.close()
    return Row(
        f"Redis memory per entry, {entries:.0e} entries",
        ours,
        "B",
        "previous layout, raw MSET",
        old,
        False,
    )


def failover_rows(blocks: int) -> list[Row]:
    """SIGKILL of a Sentinel set's primary: time until a lookup finds every
    block again, beside the time until the sentinels name the new primary."""
    with SentinelSet() as s:
        d = _bench_node(s.url)
        keys = _filler(blocks)
        _publish(d, keys, Tier.DRAM)
        with redis.Redis(port=s.primary.port) as primary:
            primary.wait(1, 5000)  # the replica has every entry
        old = s.master_port()
        killed = time.monotonic()
        s.primary.stop()
        promoted = found = None
        seen: object = None
        # until both are seen: a client may meet the new primary a moment
        # before most sentinels name it
        while None in (promoted, found) and time.monotonic() - killed < 60:
            if promoted is None and s.master_port() != old:
                promoted = time.monotonic() - killed
            try:
                if found is None:
                    seen = sum(map(bool, d.lookup(keys, prefix=False)))
                    if seen == len(keys):
                        found = time.monotonic() - killed
            except DirectoryUnavailableError as e:
                seen = e
            time.sleep(0.01)
        d.close()
        now = s.master_port()
    assert promoted is not None and found is not None, (
        f"no failover in 60 s: primary {old} -> {now} (after {promoted} s), last lookup {seen}"
    )
    return [
        Row(
            f"Sentinel failover: SIGKILL -> {blocks} blocks found",
            found,
            "s",
            "SIGKILL -> sentinels promote",
            promoted,
            False,
        )
    ]


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(
        "cluster", __doc__, rounds="times each reader reads every chain", rounds_default=3
    )
    p.add_argument("--backend", default="tcp", help="transfer backend of the nodes")
    p.add_argument("--readers", type=int, default=3, help="reader processes")
    p.add_argument("--entries", type=int, default=1_000_000, help="directory size for lookups")
    p.add_argument("--samples", type=int, default=200, help="calls per latency figure")
    args = p.parse_args(argv)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    chains, blocks, rounds = (6, 2, 1) if args.quick else (24, 4, args.rounds)
    readers = 1 if args.quick else args.readers
    entries, samples = (10_000, 5) if args.quick else (args.entries, args.samples)
    rows: list[Row] = []
    one, spread = aggregate_gbs(args.backend, 1, readers, chains, blocks, rounds), {}
    for k in (2, 3):
        spread[k] = aggregate_gbs(args.backend, k, readers, chains, blocks, rounds)
    for k in (1, 2, 3):
        gbs, per_node = one if k == 1 else spread[k]
        rows.append(
            Row(
                f"{args.backend} get, {k} node(s) {per_node}",
                gbs,
                "GB/s",
                "1 node, same readers",
                one[0],
            )
        )
    for kind in ("redis", "redis-cluster"):
        rows += lookup_rows(kind, entries, samples)
    rows.append(entry_bytes_row(entries))
    rows += failover_rows(2_048 if args.quick else 32_768)
    print_table(
        f"cluster of kvstore serve nodes, {readers} readers, chains of {blocks} x 2 MiB",
        rows,
        as_json=args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
