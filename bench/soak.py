"""Soak: mixed put/get/lookup from several processes against one node, for minutes.

A ``kvstore serve`` node (DRAM and an SSD tier small enough that eviction and
demotion run all the time) takes traffic from ``--clients`` processes. Each
client loops over a mix of batch puts, batch gets and prompt lookups on keys
drawn from a shared space (so clients read what others wrote). Every payload
is a slice of one seeded random pool chosen by the key, so any reader can
check every byte it got without having written it. A read that returns
wrong bytes is the one failure that must never happen; a miss is normal
(the block was evicted).

It prints ops/s and p50/p99 latency per operation, errors by kind, wrong
reads, and the node's RSS over time, which must stay flat once the pools are
warm. Exit status 1 when a read was wrong, an unexpected error happened, or
the RSS grew by more than ``--rss-slack``.

Run: ``python -m bench.soak --minutes 10 --clients 4`` or ``kvstore bench
soak`` (``--json``; ``--seconds`` for short runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import queue
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.procs import start_serve
from bench.report import p50_p99_ms

POOL_BYTES = 8 << 20
KEY_SPACE = 4096  # distinct block keys shared by every client
OPS, WEIGHTS = ("put", "get", "lookup"), (0.3, 0.5, 0.2)
BATCH = (1, 16)  # blocks per put/get call, uniform


def _layout() -> Any:
    from client import KVLayout

    # 8 layers x K/V x 16 tokens x 2 heads x 64 dims x fp16 = 64 KiB per block
    return KVLayout(num_layers=8, num_kv_heads=2, head_dim=64, block_size=16, dtype="float16")


def _pool() -> np.ndarray:
    return np.random.default_rng(2026).integers(0, 256, POOL_BYTES, dtype=np.uint8)


def _key(i: int) -> bytes:
    return hashlib.blake2b(f"soak/{i}".encode(), digest_size=16).digest()


def _payload(pool: Any, i: int, nbytes: int) -> Any:
    """Block ``i``'s payload: a slice of the pool (page-unaligned on purpose)."""
    at = (i * 7919 * 64 + i) % (POOL_BYTES - nbytes)
    return pool[at : at + nbytes]


@dataclass
class Tally:
    ops: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    wrong: int = 0
    hits: int = 0
    misses: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain containers for the queue (``asdict`` would rebuild a Counter
        from its (key, count) pairs, counting the pairs)."""
        return {
            "ops": dict(self.ops),
            "latencies": self.latencies,
            "errors": dict(self.errors),
            "wrong": self.wrong,
            "hits": self.hits,
            "misses": self.misses,
        }


def _client(url: str, seed: int, deadline: float, out: Any) -> None:
    import torch

    from client import Client, Namespace

    layout = _layout()
    size = layout.block_nbytes
    pool = torch.from_numpy(_pool())
    rng = random.Random(seed)
    tally = Tally()
    with Client.connect(url, namespace=Namespace("soak", layout)) as c:
        dst = c.alloc(BATCH[1] * size)
        src = c.alloc(BATCH[1] * size)
        while time.monotonic() < deadline:
            op = rng.choices(OPS, WEIGHTS)[0]
            ids = rng.sample(range(KEY_SPACE), rng.randint(*BATCH))
            keys = [_key(i) for i in ids]
            blocks = list((src if op == "put" else dst)[: len(ids) * size].view(len(ids), size))
            if op == "put":  # the payload copy is the test's, not the store's: not timed
                for i, b in zip(ids, blocks, strict=True):
                    b.copy_(_payload(pool, i, size))
            t0 = time.perf_counter()
            try:
                if op == "put":
                    c.put_blocks(keys, blocks)
                elif op == "get":
                    found = c.get_blocks(keys, blocks)
                else:
                    c.lookup([rng.randrange(32000) for _ in range(16 * rng.randint(1, 64))])
            except Exception as e:  # counted by kind; the soak goes on
                tally.errors[type(e).__name__] += 1
                continue
            tally.latencies.setdefault(op, []).append(time.perf_counter() - t0)
            tally.ops[op] += 1
            if op == "get":
                for i, got, ok in zip(ids, blocks, found, strict=True):
                    if not ok:
                        tally.misses += 1
                    elif torch.equal(got, _payload(pool, i, size)):
                        tally.hits += 1
                    else:
                        tally.wrong += 1
    out.put(tally.as_dict())


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run(
    seconds: float, clients: int, *, url: str | None, sample_s: float, progress: bool
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvstore-soak-") as tmp:
        node: subprocess.Popen[str] | None = None
        if url is None:
            flags = ("--dram-capacity", "64MiB", "--ssd-path", tmp, "--ssd-capacity", "256MiB")
            node, summary = start_serve(*flags)
            url = str(summary["url"])
        try:  # whatever fails below, the node goes with this process
            return _drive(seconds, clients, url, node, sample_s, progress)
        finally:
            if node is not None:
                node.terminate()
                node.wait(60)


def _drive(
    seconds: float,
    clients: int,
    url: str,
    node: subprocess.Popen[str] | None,
    sample_s: float,
    progress: bool,
) -> dict[str, Any]:
    # the clients' entry point by its importable name: run through `kvstore bench`
    # this file is __main__, which a spawned process cannot import from
    from bench.soak import _client as client

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.monotonic()
    deadline = start + seconds
    procs = [
        ctx.Process(target=client, args=(url, s, deadline, out), daemon=True)
        for s in range(clients)
    ]
    for p in procs:
        p.start()
    rss: list[tuple[float, int]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(seconds), unit="s", desc="soak", leave=False)
    try:
        while time.monotonic() < deadline:
            time.sleep(min(sample_s, max(0.0, deadline - time.monotonic())))
            if node is not None:
                rss.append((time.monotonic() - start, _rss(node.pid)))
            if bar is not None:
                bar.n = int(min(seconds, time.monotonic() - start))
                bar.refresh()
        tallies: list[dict[str, Any]] = []
        while len(tallies) < len(procs):
            try:
                tallies.append(out.get(timeout=5))
            except queue.Empty:
                codes = [p.exitcode for p in procs if p.exitcode is not None]
                if len(codes) > len(tallies) or time.monotonic() > deadline + 120:
                    raise RuntimeError(
                        f"{len(procs) - len(tallies)} soak clients never reported "
                        f"(exit codes so far {codes})"
                    ) from None
        for p in procs:
            p.join(60)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.monotonic() - start
    return _summary(tallies, rss, elapsed, clients)


def _summary(
    tallies: list[dict[str, Any]], rss: list[tuple[float, int]], elapsed: float, clients: int
) -> dict[str, Any]:
    ops: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    lat: dict[str, list[float]] = {}
    wrong = hits = misses = 0
    for t in tallies:
        ops.update(t["ops"])
        errors.update(t["errors"])
        wrong += t["wrong"]
        hits += t["hits"]
        misses += t["misses"]
        for k, v in t["latencies"].items():
            lat.setdefault(k, []).extend(v)
    per_op: dict[str, dict[str, float]] = {}
    for op in sorted(lat):
        p50, p99 = p50_p99_ms(lat[op])
        per_op[op] = {"ops_per_s": ops[op] / elapsed, "p50_ms": p50, "p99_ms": p99}
    warm = [b for s, b in rss if s >= min(30.0, elapsed / 4)]  # after the pools warmed
    return {
        "seconds": elapsed,
        "clients": clients,
        "ops_per_s": sum(ops.values()) / elapsed,
        "per_op": per_op,
        "errors": dict(errors),
        "wrong_reads": wrong,
        "blocks_verified": hits,
        "misses": misses,
        "rss_mib": [(round(s, 1), round(b / 2**20, 1)) for s, b in rss],
        "rss_growth_mib": (max(warm) - warm[0]) / 2**20 if warm else 0.0,
    }


def _print(r: dict[str, Any]) -> None:
    print(f"\nsoak: {r['clients']} clients, {r['seconds']:.0f} s, {r['ops_per_s']:.0f} ops/s")
    print(f"{'op':8} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for op, f in r["per_op"].items():
        print(f"{op:8} {f['ops_per_s']:>8.1f} {f['p50_ms']:>8.2f} {f['p99_ms']:>8.2f}")
    print(f"blocks read and verified: {r['blocks_verified']}, misses: {r['misses']}")
    print(f"wrong reads: {r['wrong_reads']}, errors: {r['errors'] or 'none'}")
    if r["rss_mib"]:
        series = r["rss_mib"]
        step = max(1, len(series) // 12)
        shown = ", ".join(f"{s:.0f}s {m:.0f}" for s, m in series[::step])
        print(f"node RSS MiB: {shown}; growth after warm-up {r['rss_growth_mib']:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvstore bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=1.0, help="how long to run")
    p.add_argument("--seconds", type=float, help="how long to run, in seconds (overrides)")
    p.add_argument("--clients", type=int, default=4, help="client processes")
    p.add_argument("--url", help="soak this node instead of starting one (no RSS figures)")
    p.add_argument("--rss-slack", type=float, default=64.0, help="allowed RSS growth, MiB")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = p.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    sample = max(1.0, min(10.0, seconds / 60))
    result = run(seconds, args.clients, url=args.url, sample_s=sample, progress=not args.json)
    ok = not result["wrong_reads"] and not result["errors"]
    ok = ok and result["rss_growth_mib"] <= args.rss_slack
    result["ok"] = ok
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    sys.exit(main())
