"""Where a remote put or get spends its time, per block: the profile of the hot path.

For each transfer backend and block size (16 KiB x 256, 2 MiB x 64), a
``kvstore serve`` node is driven by the remote client from ``alloc``
buffers, and the same run measures the parts a call cannot do without, on
the path the batch takes (``path``: a 4 MiB batch goes over the data port,
a 128 MiB one over the engine; docs/service.md):

- ``call``: an empty call on that path: ``exists([])`` on the data port, or
  an empty gRPC call (``Health``) for the engine's batches;
- ``move``: the bytes crossing on that path alone: a plain socket sending
  the batch one way to another process (data port), or the backend's
  engine moving it as one transfer between two processes (the node's pool
  extents and the client's buffer are both one run, so that is what the
  node asks of its engine);
- ``xxh3``: XXH3 of the batch on the client (before a put and after a get,
  over ``tcp``/``ucx`` only);
- ``store``: the store's own work for the batch, in process (``begin_put``
  and ``commit_put`` with the bytes already in place, which includes the
  node's XXH3 of what a put brought; ``begin_read`` to ``end_read``).

What is left of the call after those is per-block Python on the way: wire
encoding and decoding, grants, the plans. Figures are microseconds per
block (medians), so 16 KiB and 2 MiB rows compare directly.

Run: ``python -m bench.profile`` or ``kvstore bench profile`` (``--quick``,
``--json``, ``--backends``).
"""

from __future__ import annotations

import multiprocessing as mp
import os

import torch

from bench.peers.kvstore_peer import object_layout
from bench.procs import start_serve
from bench.report import bench_parser, median_seconds
from bench.transfer import engine_seconds, raw_socket_seconds, runnable
from client import Client, Namespace, StoreConfig
from client.remote import PORT, RemoteStore
from kvstore.checksum import checksums
from kvstore.store import TieredStore

KiB, MiB = 1 << 10, 1 << 20
SHAPES = ((16 * KiB, 256), (2 * MiB, 64))
PARTS = ("call", "move", "xxh3", "store")


def _keys(tag: str, n: int) -> list[bytes]:
    return [f"{tag}/{i}".encode().ljust(16, b".")[-16:] for i in range(n)]


def store_seconds(size: int, n: int, rounds: int) -> tuple[float, float]:
    """The store's bookkeeping for one batch, put and get, bytes in place."""
    config = StoreConfig.load(overrides={"dram.capacity": f"{4 * n * size}", "ssd.path": None})
    store = TieredStore(config)
    keys = _keys("store", n)

    def put() -> None:
        store.commit_put(store.begin_put(keys, [size] * n))

    def get() -> None:
        plan = store.begin_read(keys, sizes=[size] * n)
        for r in plan.reads:
            store.dram_extent(r)
        store.end_read(plan)

    try:
        put_s = median_seconds(put, rounds, setup=lambda: store.delete(keys))
        get_s = median_seconds(get, rounds)
    finally:
        store.close()
    return put_s, get_s


def profile(backend: str, size: int, n: int, rounds: int) -> dict[str, object]:
    proc, summary = start_serve(
        "--ssd-path", "none", "--dram-capacity", f"{max(1024, 4 * n * size // MiB)}MiB",
        "--transfer", backend,
    )  # fmt: skip
    try:
        with Client.connect(
            str(summary["url"]), namespace=Namespace("p", object_layout(size))
        ) as c:
            assert isinstance(c.store, RemoteStore)
            route = c.store.route(n * size)
            src, dst = c.alloc(n * size), c.alloc(n * size)
            src.copy_(torch.randint(0, 256, (n * size,), dtype=torch.uint8))
            blocks, outs = list(src.view(n, size)), list(dst.view(n, size))
            keys = _keys("remote", n)
            put_s = median_seconds(
                lambda: c.put_blocks(keys, blocks), rounds, setup=lambda: c.delete(keys)
            )
            get_s = median_seconds(lambda: c.get_blocks(keys, outs), rounds)
            assert torch.equal(dst, src), "wrong bytes"
            empty = (lambda: c.exists([])) if route == PORT else c.store.health
            call_s = median_seconds(empty, rounds * 4)
            hashes = 1 if c.store.verify else 0  # the client's pass (the node's is in "store")
    finally:
        proc.terminate()
        proc.wait(60)
    ctx = mp.get_context("spawn")
    if route == PORT:
        read_s = write_s = raw_socket_seconds(ctx, [src.numpy()], rounds)
    else:
        read_s, write_s = engine_seconds(ctx, backend, 1, n * size, rounds)
    xxh_s = median_seconds(lambda: checksums(src, [size] * n), rounds)
    store_put_s, store_get_s = store_seconds(size, n, rounds)
    us = 1e6 / n
    put = {"call": call_s, "move": read_s, "xxh3": hashes * xxh_s, "store": store_put_s}
    get = {"call": call_s, "move": write_s, "xxh3": hashes * xxh_s, "store": store_get_s}
    out: dict[str, object] = {"backend": backend, "block": size, "batch": n, "path": route}
    for op, total, parts in (("put", put_s, put), ("get", get_s, get)):
        row = {k: v * us for k, v in parts.items()}
        row["rest"] = total * us - sum(row.values())
        row["total"] = total * us
        row["move share"] = parts["move"] / total
        out[op] = row
    return out


def _print(results: list[dict[str, object]]) -> None:
    cols = (*PARTS, "rest", "total")
    print("\nper block, us (median): the call, and what it is made of, same run")
    print(
        f"{'backend':8} {'block':>8} {'op':4} {'path':>9}"
        + "".join(f"{c:>10}" for c in cols)
        + "  move/total"
    )
    for r in results:
        label = f"{r['block'] // KiB} KiB" if r["block"] < MiB else f"{r['block'] // MiB} MiB"  # type: ignore[operator]
        for op in ("put", "get"):
            row = r[op]
            assert isinstance(row, dict)
            cells = "".join(f"{row[c]:10.2f}" for c in cols)
            print(
                f"{r['backend']:8} {label:>8} {op:4} {r['path']:>9}{cells}"
                f"  {row['move share']:10.2f}x"
            )


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(
        "profile", __doc__, rounds="timed batches per figure (median)", rounds_default=15
    )
    p.add_argument("--backends", default="tcp,shm,ucx", help="comma-separated")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rounds = 3 if args.quick else args.rounds
    shapes = ((16 * KiB, 16), (2 * MiB, 4)) if args.quick else SHAPES
    results = [
        profile(backend, size, n, rounds)
        for backend in runnable(args.backends)
        for size, n in shapes
    ]
    if args.json:
        import json

        print(json.dumps({"profile": results}))
    else:
        _print(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
