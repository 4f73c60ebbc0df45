"""Gather/scatter of paged KV against plain copies of the same bytes, in one run.

- CPU: the C++ kernels (``native.gather_blocks`` / ``scatter_blocks``) beside
  ``np.copyto`` of one contiguous buffer of the same size (target >= 0.7x) and
  beside the pure-torch reference (index_select / index_copy_);
- GPU (where CUDA is): GPU caches -> pinned host and back, direct (the kernel
  writes across PCIe) and staged (kernel + one async copy), beside a plain
  ``tensor.copy_`` of one contiguous buffer of the same size (target >= 0.8x);
  and device-to-device beside a contiguous device copy.

Caches are vLLM-shaped (flash: [2, blocks, 16, 8, 128] bf16 per layer; one
MLA row: [blocks, 16, 576]); the batch is a random set of distinct blocks.

Run: ``python -m bench.native`` or ``kvstore bench native`` (``--quick``,
``--json``).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

import numpy as np
import torch

from bench.report import Row, bench_parser, median_seconds, print_table
from native import PagedKV, gather_blocks, native_available, scatter_blocks
from native.reference import copy_reference


def _caches(kind: str, layers: int, blocks: int, device: str) -> list[torch.Tensor]:
    shape = (2, blocks, 16, 8, 128) if kind == "flash" else (blocks, 16, 576)
    g = torch.Generator(device=device).manual_seed(0)
    return [
        torch.randn(shape, dtype=torch.float32, device=device, generator=g).to(torch.bfloat16)
        for _ in range(layers)
    ]


def _ids(blocks: int, n: int) -> torch.Tensor:
    return torch.randperm(blocks, generator=torch.Generator().manual_seed(1))[:n]


def bench_cpu(layers: int, blocks: int, batch: int, rounds: int) -> list[Row]:
    caches = _caches("flash", layers, blocks, "cpu")
    kv = PagedKV.of(caches)
    ids = _ids(blocks, batch)
    nbytes = batch * kv.block_nbytes
    gb = nbytes / 1e9
    out = torch.from_numpy(np.ones(nbytes, dtype=np.uint8))  # written once: pre-faulted
    src = np.ones(nbytes, dtype=np.uint8)
    dst = out.numpy()
    copyto = gb / median_seconds(lambda: np.copyto(dst, src), rounds)
    gather = gb / median_seconds(lambda: gather_blocks(kv, ids, out), rounds)
    expect = out.clone()
    scatter = gb / median_seconds(lambda: scatter_blocks(out, kv, ids), rounds)
    ref_g = gb / median_seconds(lambda: copy_reference(kv.layers, ids, out, gather=True), rounds)
    ref_s = gb / median_seconds(lambda: copy_reference(kv.layers, ids, out, gather=False), rounds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = gb / median_seconds(lambda: gather_blocks(kv, ids, out), rounds)
    finally:
        torch.set_num_threads(threads)
    gather_blocks(kv, ids, out)
    assert torch.equal(out, expect), "gather after scatter changed the bytes"
    what = f"{batch}x{layers} layers, {nbytes >> 20} MiB"
    base = "np.copyto same bytes"
    return [
        Row(f"CPU gather ({what})", gather, "GB/s", base, copyto, target=0.7),
        Row("CPU scatter", scatter, "GB/s", base, copyto, target=0.7),
        Row("CPU gather, 1 thread", one, "GB/s", base, copyto),
        Row(f"CPU gather, {threads} threads", gather, "GB/s", "torch reference gather", ref_g),
        Row(f"CPU scatter, {threads} threads", scatter, "GB/s", "torch reference scatter", ref_s),
    ]


def _cuda_seconds(fn: Callable[[], object], rounds: int) -> float:
    """Median of ``rounds`` timings with CUDA events (after two warm-ups)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(rounds):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(statistics.median(times))


def bench_gpu(kind: str, layers: int, blocks: int, batch: int, rounds: int) -> list[Row]:
    caches = _caches(kind, layers, blocks, "cuda")
    kv = PagedKV.of(caches)
    ids = _ids(blocks, batch)
    nbytes = batch * kv.block_nbytes
    gb = nbytes / 1e9
    host = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty_like(dev)
    d2h = gb / _cuda_seconds(lambda: host.copy_(dev, non_blocking=True), rounds)
    h2d = gb / _cuda_seconds(lambda: dev.copy_(host, non_blocking=True), rounds)
    d2d = gb / _cuda_seconds(lambda: dev2.copy_(dev), rounds)

    def run(fn: Callable[[], object]) -> float:
        return gb / _cuda_seconds(fn, rounds)

    g_direct = run(lambda: gather_blocks(kv, ids, host, mode="direct"))
    expect = host.clone()
    g_staged = run(lambda: gather_blocks(kv, ids, host, mode="staged"))
    assert torch.equal(host, expect), "staged and direct gathers differ"
    s_direct = run(lambda: scatter_blocks(host, kv, ids, mode="direct"))
    s_staged = run(lambda: scatter_blocks(host, kv, ids, mode="staged"))
    g_d2d = run(lambda: gather_blocks(kv, ids, dev))
    s_d2d = run(lambda: scatter_blocks(dev, kv, ids))
    ref = run(lambda: copy_reference(kv.layers, ids.cuda(), dev, gather=True))
    what = f"{kind}, {batch}x{layers}, {nbytes >> 20} MiB"
    return [
        Row(f"GPU->pinned gather direct ({what})", g_direct, "GB/s", "D2H copy_", d2h, target=0.8),
        Row("GPU->pinned gather staged", g_staged, "GB/s", "D2H copy_", d2h, target=0.8),
        Row("pinned->GPU scatter direct", s_direct, "GB/s", "H2D copy_", h2d, target=0.8),
        Row("pinned->GPU scatter staged", s_staged, "GB/s", "H2D copy_", h2d, target=0.8),
        Row("GPU gather device-to-device", g_d2d, "GB/s", "D2D copy_", d2d),
        Row("GPU scatter device-to-device", s_d2d, "GB/s", "D2D copy_", d2d),
        Row("GPU gather device-to-device", g_d2d, "GB/s", "torch reference gather", ref),
    ]


def main(argv: list[str] | None = None) -> int:
    args = bench_parser("native", __doc__, rounds="timed repetitions per figure").parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 10)
    if not native_available("cpu"):
        print(
            "warning: the copy extension is not built; figures are the torch reference",
            file=sys.stderr,
        )
    if args.quick:
        rows = bench_cpu(layers=4, blocks=32, batch=16, rounds=rounds)
    else:
        rows = bench_cpu(layers=16, blocks=128, batch=64, rounds=rounds)
    print_table("native gather/scatter, CPU", rows, as_json=args.json)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        big = not args.quick
        rows = bench_gpu("flash", 32, 1024 if big else 64, 256 if big else 16, rounds)
        rows += bench_gpu("mla", 61, 1024 if big else 64, 256 if big else 16, rounds)[:4]
        print_table(f"native gather/scatter, {name}", rows, as_json=args.json)
    else:
        print("(no GPU here: GPU figures skipped)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
