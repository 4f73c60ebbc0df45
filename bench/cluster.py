"""Cluster mode on this machine: aggregate get bandwidth and directory lookups.

- Aggregate get GB/s with 1, 2 and 3 ``kvstore serve`` nodes sharing a real
  ``redis-server``: one writer spreads 24 chains of 4 x 2 MiB blocks over the
  nodes, then 3 reader processes each read every chain (into registered
  buffers, byte-checked) at once. Each figure is a ratio against the same
  run's single node. On one 2-core machine the nodes and readers share the
  same cores and memory bus, so this shows the overhead of spreading, not the
  scaling separate hosts would give.
- Lookup of a 32k-token prompt in a directory of 10^6 entries, p50 and p99,
  as 2048 keys (16-token blocks) and as 64 keys (512-token blocks), each
  against a raw ``MGET`` of the same keys (the floor: what remains is
  parsing and liveness filtering); and the whole tokens -> hit count
  (keying included) beside a ``PING``.

Run: ``python -m bench.cluster`` or ``kvstore bench cluster`` (``--json``,
``--backend shm``, ``--quick`` for a smoke run).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from functools import partial
from typing import Any

import redis

from bench.procs import read_summary, redis_server, serve_cmd
from bench.report import Row, bench_parser, percentiles_ms, print_table
from client import Client, KVLayout, Namespace
from client.cluster import ClusterStore
from kvstore.cluster.directory import Entry, NodeInfo
from kvstore.cluster.redis_directory import PUBLISH_BATCH, RedisDirectory
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


def lookup_rows(entries: int, samples: int) -> list[Row]:
    with redis_server() as r:
        d = RedisDirectory(r.url, ttl=3600)
        info = NodeInfo("bench-node", "kvstore://127.0.0.1:1", "bench", "tcp", 1 << 30, 1 << 30)
        d.register(info)
        tokens = list(range(32 * 1024))
        with Client(ClusterStore(RedisDirectory(r.url)), NS, owns_store=True) as c:
            keys = c.keys(tokens)
            filler = (i.to_bytes(16, "little") for i in range(entries - len(keys)))
            batch: list[Entry] = [Entry(k, Tier.DRAM, LAYOUT.block_nbytes, 1) for k in keys]
            for k in filler:
                batch.append(Entry(k, Tier.SSD, LAYOUT.block_nbytes, 2))
                if len(batch) == PUBLISH_BATCH:
                    d.publish("bench-node", batch)
                    batch = []
            d.publish("bench-node", batch)
            raw = redis.Redis(port=r.port)
            assert raw.dbsize() >= entries
            assert c.lookup(tokens) == len(tokens)
            store = c.store
            rows = []
            for n in (len(keys), len(keys) // 32):  # 16-token blocks; 512-token (Mooncake's)
                ours = percentiles_ms(partial(store.lookup, keys[:n], ns_tag=NS.tag), samples)
                locs = [b"kvstore:loc:" + k for k in keys[:n]]
                mget = percentiles_ms(partial(raw.mget, locs), samples)
                what = f"directory lookup, {n} keys in {entries:.0e}"
                rows += [
                    Row(f"{what} p50", ours[0], "ms", "raw MGET, same keys p50", mget[0], False),
                    Row(f"{what} p99", ours[1], "ms", "raw MGET, same keys p99", mget[1], False),
                ]

            e2e = percentiles_ms(lambda: c.lookup(tokens), samples)
            ping = percentiles_ms(raw.ping, samples)
    return [
        *rows,
        Row(
            "tokens -> hit count, 32k tokens p50",
            e2e[0],
            "ms",
            "Redis PING p50",
            ping[0],
            False,
        ),
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
    rows += lookup_rows(entries, samples)
    print_table(
        f"cluster of kvstore serve nodes, {readers} readers, chains of {blocks} x 2 MiB",
        rows,
        as_json=args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
