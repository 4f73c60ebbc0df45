"""Transfer engine backends against the raw operation each one is built on, in one run.

For batches of 64 x 2 MiB and 8 x 64 MiB, each backend reads (peer -> us) and
writes (us -> peer) a whole batch between pre-faulted buffers; beside it:

- ``local``, ``shm``: ``np.copyto`` of the same bytes between the same-size buffers;
- ``tcp``: a plain two-process socket loop, ``sendall`` / ``recv_into`` + a 1-byte ack;
- ``ucx``: plain UCXX ``tag_send`` / ``tag_recv`` of the same buffers + an ack,
  with the same UCX options and endpoint kind the backend uses.

Run: ``python -m bench.transfer`` or ``kvstore bench transfer`` (``--json``,
``--backends tcp,shm``, ``--quick`` for a smoke run).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from bench.report import Row, bench_parser, median_seconds, print_table
from transfer import (
    Op,
    Region,
    RegionDesc,
    Transfer,
    TransferEngine,
    available_backends,
    make_engine,
)
from transfer.memory import alloc_anonymous

MiB = 1 << 20
TARGETS = {"local": 0.6, "shm": 0.6, "tcp": 0.8, "ucx": 0.8}
BASELINE_NAME = {
    "local": "np.copyto same bytes",
    "shm": "np.copyto same bytes",
    "tcp": "raw socket sendall/recv_into",
    "ucx": "raw ucxx tag send/recv",
}


def _filled(n: int, nbytes: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    bufs = [alloc_anonymous(nbytes) for _ in range(n)]
    for b in bufs:
        b[:] = np.frombuffer(rng.bytes(nbytes), np.uint8)
    return bufs


def _served_regions(engine: TransferEngine, n: int, nbytes: int) -> list[Region]:
    """The peer's side: ``n`` regions holding ``_filled(n, nbytes, 7)``."""
    regions = [engine.alloc(nbytes) for _ in range(n)]
    for r, src in zip(regions, _filled(n, nbytes, 7), strict=True):
        r.view[:] = src
    return regions


def _grant(engine: TransferEngine, region: Region) -> RegionDesc:
    """The peer lets the benchmark read and write a region whole."""
    return engine.grant(region, read=True, write=True)


# -- processes on the other side ------------------------------------------------
def _engine_peer(backend: str, n: int, nbytes: int, conn: Connection) -> None:
    with make_engine(backend, timeout=30.0) as engine:
        conn.send([_grant(engine, r).to_dict() for r in _served_regions(engine, n, nbytes)])
        conn.recv()  # until the bench is done


def _socket_sink(n: int, nbytes: int, conn: Connection) -> None:
    bufs = _filled(n, nbytes, 8)
    with socket.create_server(("127.0.0.1", 0)) as server:
        conn.send(server.getsockname()[1])
        sock, _ = server.accept()
    with sock:
        while True:
            for b in bufs:
                view, got = b.data.cast("B"), 0
                while got < nbytes:
                    k = sock.recv_into(view[got:])
                    if not k:
                        return
                    got += k
            sock.sendall(b"k")


def _ucx_sink(n: int, nbytes: int, conn: Connection) -> None:
    from transfer.ucx import Array, make_worker, ucx_api, wait_all

    _ctx, worker = make_worker()
    conn.send(worker.address.tobytes())
    hello = np.zeros(4096, np.uint8)
    wait_all([worker.tag_recv(Array(hello), ucx_api.UCXXTag(1))], time.monotonic() + 60)
    size = int(hello[:4].view(np.uint32)[0])
    addr = ucx_api.UCXAddress.create_from_buffer(hello[4 : 4 + size].tobytes())
    ep = ucx_api.UCXEndpoint.create_from_worker_address(worker, addr, False)
    bufs, ack = _filled(n, nbytes, 9), np.ones(8, np.uint8)
    while True:
        reqs = [worker.tag_recv(Array(b), ucx_api.UCXXTag(100 + i)) for i, b in enumerate(bufs)]
        wait_all(reqs, time.monotonic() + 60)
        if conn.poll():
            break
        wait_all([ep.tag_send(Array(ack), ucx_api.UCXXTag(2))], time.monotonic() + 60)
    worker.stop_progress_thread()


# -- baselines -------------------------------------------------------------------
def raw_socket_seconds(ctx: Any, bufs: list[np.ndarray], rounds: int) -> float:
    """Median seconds of ``bufs`` sent one way over a plain socket to another
    process, and its one-byte ack."""
    a, b = ctx.Pipe()
    proc = ctx.Process(target=_socket_sink, args=(len(bufs), bufs[0].nbytes, b))
    proc.start()
    try:
        sock = socket.create_connection(("127.0.0.1", a.recv()))
        ack = bytearray(1)

        def once() -> None:
            for buf in bufs:
                sock.sendall(buf.data)
            sock.recv_into(ack)

        return median_seconds(once, rounds)
    finally:
        sock.close()
        proc.join(30)


def _raw_ucx(ctx: Any, bufs: list[np.ndarray], rounds: int) -> float:
    from transfer.ucx import Array, make_worker, ucx_api, wait_all

    a, b = ctx.Pipe()
    proc = ctx.Process(target=_ucx_sink, args=(len(bufs), bufs[0].nbytes, b))
    proc.start()
    _ctx, worker = make_worker()
    try:
        peer = ucx_api.UCXAddress.create_from_buffer(a.recv())
        ep = ucx_api.UCXEndpoint.create_from_worker_address(worker, peer, False)
        mine = worker.address.tobytes()
        hello = np.zeros(4096, np.uint8)
        hello[:4].view(np.uint32)[0] = len(mine)
        hello[4 : 4 + len(mine)] = np.frombuffer(mine, np.uint8)
        wait_all([ep.tag_send(Array(hello), ucx_api.UCXXTag(1))], time.monotonic() + 60)
        ack = np.zeros(8, np.uint8)

        def once() -> None:
            got = worker.tag_recv(Array(ack), ucx_api.UCXXTag(2))
            sends = [ep.tag_send(Array(b), ucx_api.UCXXTag(100 + i)) for i, b in enumerate(bufs)]
            wait_all([*sends, got], time.monotonic() + 60)

        seconds = median_seconds(once, rounds)
        a.send("stop")
        wait_all(
            [ep.tag_send(Array(b), ucx_api.UCXXTag(100 + i)) for i, b in enumerate(bufs)],
            time.monotonic() + 60,
        )
        return seconds
    finally:
        proc.join(30)
        worker.stop_progress_thread()


def _memcpy(bufs: list[np.ndarray], rounds: int) -> float:
    dsts = _filled(len(bufs), bufs[0].nbytes, 10)

    def once() -> None:
        for d, s in zip(dsts, bufs, strict=True):
            np.copyto(d, s)

    return median_seconds(once, rounds)


# -- the engine ------------------------------------------------------------------
def _engine_rounds(
    engine: TransferEngine, descs: list[RegionDesc], n: int, nbytes: int, rounds: int
) -> tuple[float, float]:
    local = [engine.alloc(nbytes) for _ in range(n)]
    reads = [Transfer(Op.READ, r, d, nbytes) for r, d in zip(local, descs, strict=True)]
    writes = [Transfer(Op.WRITE, r, d, nbytes) for r, d in zip(local, descs, strict=True)]
    read_s = median_seconds(lambda: engine.transfer(reads), rounds)
    expect = _filled(1, nbytes, 7)[0]
    assert np.array_equal(local[0].view, expect), "read returned wrong bytes"
    write_s = median_seconds(lambda: engine.transfer(writes), rounds)
    return read_s, write_s


def engine_seconds(ctx: Any, backend: str, n: int, nbytes: int, rounds: int) -> tuple[float, float]:
    """Median seconds of one batch of ``n`` x ``nbytes`` read and written by
    the ``backend`` engine against a peer (another process but for local)."""
    engine = make_engine(backend, timeout=30.0)
    a, b = ctx.Pipe()
    if backend == "local":
        peer_engine = make_engine("local")
        descs = [_grant(peer_engine, r) for r in _served_regions(peer_engine, n, nbytes)]
        proc = None
    else:
        proc = ctx.Process(target=_engine_peer, args=(backend, n, nbytes, b))
        proc.start()
        descs = [RegionDesc.from_dict(d) for d in a.recv()]
    try:
        return _engine_rounds(engine, descs, n, nbytes, rounds)
    finally:
        engine.close()
        if proc is not None:
            a.send("stop")
            proc.join(30)
        else:
            peer_engine.close()


def bench_backend(ctx: Any, backend: str, n: int, nbytes: int, rounds: int) -> list[Row]:
    read_s, write_s = engine_seconds(ctx, backend, n, nbytes, rounds)
    bufs = _filled(n, nbytes, 11)
    baseline: Callable[[], float] = {
        "local": lambda: _memcpy(bufs, rounds),
        "shm": lambda: _memcpy(bufs, rounds),
        "tcp": lambda: raw_socket_seconds(ctx, bufs, rounds),
        "ucx": lambda: _raw_ucx(ctx, bufs, rounds),
    }[backend]
    base = n * nbytes / baseline() / 1e9
    shape = f"{n} x {nbytes // MiB} MiB"
    return [
        Row(
            f"{backend} {op} ({shape})",
            n * nbytes / s / 1e9,
            "GB/s",
            BASELINE_NAME[backend],
            base,
            target=TARGETS[backend],
        )
        for op, s in (("read", read_s), ("write", write_s))
    ]


def runnable(backends: str) -> list[str]:
    """The comma-separated backends that can run here (the others are named on stderr)."""
    avail = available_backends()
    out = []
    for backend in backends.split(","):
        why = avail.get(backend, "unknown backend")
        if why is None:
            out.append(backend)
        else:
            print(f"skipping {backend}: {why}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(
        "transfer",
        __doc__,
        rounds="timed rounds per figure (median)",
        rounds_default=5,
        quick="small batches, one round (smoke test)",
    )
    p.add_argument("--backends", default="local,shm,tcp,ucx", help="comma-separated")
    args = p.parse_args(argv)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    shapes = [(4, MiB)] if args.quick else [(64, 2 * MiB), (8, 64 * MiB)]
    rounds = 1 if args.quick else args.rounds
    ctx = mp.get_context("spawn")
    rows: list[Row] = []
    for backend in runnable(args.backends):
        for n, nbytes in shapes:
            rows += bench_backend(ctx, backend, n, nbytes, rounds)
    print_table("transfer engine vs raw baselines", rows, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
