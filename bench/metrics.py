"""What the node's metrics cost: the same workload with metrics on and off.

Two ``kvstore serve`` nodes run side by side, one with ``metrics.enabled``
(prefix-shape and namespace lookup accounting, RPC latency histograms,
transfer byte counts, and a ``/metrics`` endpoint scraped every round) and
one without. The remote client drives both alternately, round after round,
so drift on the machine hits both alike. Per round: a put of a batch of
2 MiB blocks (deleted first), a get of the same batch, and 64 lookups of a
32k-token prompt. Also the embedded store (in-process lookups and gets).
Target: metrics on >= 0.97x of metrics off.

Run: ``python -m bench.metrics`` or ``kvstore bench metrics`` (``--quick``,
``--json``).
"""

from __future__ import annotations

import os
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace

import torch

from bench.procs import start_serve
from bench.report import Row, bench_parser, print_table
from client import Client, KVLayout, Namespace
from kvstore.config import DramConfig, MetricsConfig, StoreConfig

# 32 layers x K/V x 16 tokens x 8 kv heads x 128 dims x fp16 = 2 MiB per block
LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16")
TARGET = 0.97


def _alternate(
    fns: dict[str, Callable[[], object]], rounds: int, setup: Callable[[str], object]
) -> dict[str, float]:
    """Median seconds of each fn, run alternately (after one warm-up each)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 1):
        order = list(fns) if r % 2 else list(reversed(fns))
        for k in order:
            setup(k)
            t0 = time.perf_counter()
            fns[k]()
            if r:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_nodes(batch: int, lookups: int, rounds: int) -> list[Row]:
    procs, clients, scrape = [], {}, ""
    ns = Namespace("bench", LAYOUT)
    try:
        for label, flags in (("on", ["--metrics-port", "0"]), ("off", [])):
            env_flags = ["--ssd-path", "none", "--dram-capacity", "512MiB", "--transfer", "shm"]
            env = {**os.environ, "KVSTORE_METRICS_ENABLED": "1" if label == "on" else "0"}
            proc, summary = start_serve(*env_flags, *flags, env=env)
            procs.append(proc)
            if label == "on":
                scrape = str(summary["metrics"])
            clients[label] = Client.connect(str(summary["url"]), namespace=ns)
        nbytes = LAYOUT.block_nbytes
        keys = [i.to_bytes(16, "little") for i in range(batch)]
        bufs = {k: c.alloc(batch * nbytes) for k, c in clients.items()}
        for b in bufs.values():
            b.copy_(torch.randint(0, 256, (batch * nbytes,), dtype=torch.uint8))
        prompt = list(range(32768))

        def put(k: str) -> Callable[[], object]:
            return lambda: clients[k].put_blocks(keys, list(bufs[k].view(batch, nbytes)))

        def get(k: str) -> Callable[[], object]:
            return lambda: clients[k].get_blocks(keys, list(bufs[k].view(batch, nbytes)))

        def lookup(k: str) -> Callable[[], object]:
            return lambda: [clients[k].lookup(prompt) for _ in range(lookups)]

        def scraped(k: str) -> None:
            if k == "on":  # a Prometheus scrape per round, as a live node would see
                with urllib.request.urlopen(scrape, timeout=10) as r:
                    r.read()

        def emptied(k: str) -> None:
            scraped(k)
            clients[k].delete(keys)

        puts = _alternate({k: put(k) for k in clients}, rounds, emptied)
        for k in clients:
            put(k)()
        gets = _alternate({k: get(k) for k in clients}, rounds, scraped)
        looks = _alternate({k: lookup(k) for k in clients}, rounds, scraped)
    finally:
        for c in clients.values():
            c.close()
        for p in procs:
            p.terminate()
            p.wait(timeout=60)
    gb = batch * LAYOUT.block_nbytes / 1e9
    what = f"{batch} x 2 MiB, shm"
    return [
        Row(f"node put, metrics on ({what})", gb / puts["on"], "GB/s", "metrics off",
            gb / puts["off"], target=TARGET),
        Row("node get, metrics on", gb / gets["on"], "GB/s", "metrics off", gb / gets["off"],
            target=TARGET),
        Row("node Lookup 32k tokens, metrics on", lookups / looks["on"], "op/s", "metrics off",
            lookups / looks["off"], target=TARGET),
    ]  # fmt: skip


def bench_embedded(lookups: int, rounds: int) -> list[Row]:
    ns = Namespace("bench", LAYOUT)
    base = StoreConfig(dram=DramConfig(capacity=256 << 20))
    clients = {
        "on": Client.local(base, namespace=ns),
        "off": Client.local(replace(base, metrics=MetricsConfig(enabled=False)), namespace=ns),
    }
    try:
        prompt = list(range(64 * 16))
        kv = torch.randn(LAYOUT.prompt_shape(len(prompt))).half()
        for c in clients.values():
            c.put(prompt, kv)

        def lookup(c: Client) -> Callable[[], object]:
            return lambda: [c.lookup(prompt) for _ in range(lookups)]

        looks = _alternate({k: lookup(c) for k, c in clients.items()}, rounds, lambda k: None)
    finally:
        for c in clients.values():
            c.close()
    return [
        Row("embedded lookup 64 blocks, metrics on", lookups / looks["on"], "op/s", "metrics off",
            lookups / looks["off"], target=TARGET),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = bench_parser("metrics", __doc__, rounds="alternating rounds per figure").parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 25)
    rows = bench_nodes(4 if args.quick else 32, 4 if args.quick else 32, rounds)
    rows += bench_embedded(50 if args.quick else 2000, rounds)
    print_table("metrics on vs off", rows, as_json=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
