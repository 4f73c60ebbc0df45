"""The embedded store against the raw operations it is built on, in one run.

- DRAM put / get_into of 2 MiB blocks in batches of 64, beside ``np.copyto``
  of the same bytes between the same (pre-faulted) buffers; get_into with
  ``verify_dram_reads`` beside get_into without;
- SSD reads of the same blocks, beside a plain ``readinto`` of the same
  segment files into the same buffers, with the page cache warm and cold;
- keying a 128k-token prompt, beside one SHA-256 over the same bytes.

Run: ``python -m bench.local`` or ``kvstore bench local`` (``--json`` for scripts).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.report import Row, median_seconds, print_table
from kvstore.config import DramConfig, SsdConfig, StoreConfig
from kvstore.keys import Namespace, block_keys
from kvstore.layout import KVLayout
from kvstore.store import TieredStore

MiB = 1 << 20
# 32 layers x K/V x 16 tokens x 8 KV heads x 128 dims x bf16 = 2 MiB (a Llama-3-8B block)
LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")


def _buffers(n: int, nbytes: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, nbytes, dtype=np.uint8) for _ in range(n)]


def _copy_all(dsts: list[np.ndarray], srcs: list[np.ndarray]) -> None:
    for d, s in zip(dsts, srcs, strict=True):
        np.copyto(d, s)


def bench_dram(batch: int, rounds: int) -> list[Row]:
    nbytes = LAYOUT.block_nbytes
    srcs = _buffers(batch, nbytes, 1)
    dsts = _buffers(batch, nbytes, 2)  # written once: pre-faulted
    keys = [i.to_bytes(16, "little") for i in range(batch)]
    gb = batch * nbytes / 1e9
    gets = {}
    for verify in (False, True):
        cfg = StoreConfig(dram=DramConfig(capacity=4 * batch * nbytes), verify_dram_reads=verify)
        with TieredStore(cfg) as store:
            if not verify:
                put = median_seconds(
                    lambda: store.put(keys, srcs), rounds, setup=lambda: store.delete(keys)
                )
            store.put(keys, srcs)
            gets[verify] = median_seconds(lambda: store.get_into(keys, dsts), rounds)
            assert all(np.array_equal(d, s) for d, s in zip(dsts, srcs, strict=True))
    get = gets[False]
    memcpy = median_seconds(lambda: _copy_all(dsts, srcs), rounds)
    base = gb / memcpy
    return [
        Row(f"DRAM put ({batch} x 2 MiB)", gb / put, "GB/s", "np.copyto same bytes", base),
        Row(
            f"DRAM get_into ({batch} x 2 MiB)",
            gb / get,
            "GB/s",
            "np.copyto same bytes",
            base,
            target=0.6,
        ),
        Row(
            f"DRAM get_into, verify_dram_reads ({batch} x 2 MiB)",
            gb / gets[True],
            "GB/s",
            "get_into unverified",
            gb / get,
        ),
    ]


def _drop_page_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_ssd(batch: int, rounds: int, data_dir: Path) -> list[Row]:
    nbytes = LAYOUT.block_nbytes
    srcs = _buffers(batch, nbytes, 3)
    dsts = _buffers(batch, nbytes, 4)
    keys = [(1000 + i).to_bytes(16, "little") for i in range(batch)]
    cfg = StoreConfig(
        dram=DramConfig(capacity=4 * MiB, page_size=4 * MiB),  # too small: blocks go to SSD
        ssd=SsdConfig(path=data_dir, capacity=4 * batch * nbytes, segment_size=256 * MiB),
        promote_on_hit=False,
    )
    rows = []
    with TieredStore(cfg) as store:
        store.put(keys, srcs)
        store.wait_idle()
        on_ssd = [k for k in keys if store.tier_of(k) == "ssd"]
        idx = [keys.index(k) for k in on_ssd]
        sub_dsts = [dsts[i] for i in idx]
        gb = len(on_ssd) * nbytes / 1e9
        segs = sorted(data_dir.glob("seg-*.log"))

        def raw_read() -> None:  # the same files, the same bytes, the same buffers
            left = len(sub_dsts)
            for p in segs:
                with open(p, "rb", buffering=0) as f:
                    while left:
                        n = f.readinto(sub_dsts[len(sub_dsts) - left].data)
                        if not n:
                            break
                        left -= 1

        def store_read() -> None:
            ok = store.get_into(on_ssd, sub_dsts, prefix=False)
            assert all(ok)

        for label, setup in (
            ("warm page cache", None),
            ("cold, fadvise DONTNEED", lambda: _drop_page_cache(segs)),
        ):
            raw = median_seconds(raw_read, rounds, setup=setup)
            ours = median_seconds(store_read, rounds, setup=setup)
            rows.append(
                Row(
                    f"SSD get_into ({label})",
                    gb / ours,
                    "GB/s",
                    "plain readinto same files",
                    gb / raw,
                    target=0.7,
                )
            )
        for i in idx:
            assert np.array_equal(dsts[i], srcs[i])
    return rows


def bench_keys(rounds: int) -> list[Row]:
    tokens = np.random.default_rng(5).integers(0, 128_000, 131_072, dtype=np.uint32)
    rows = []
    for bs in (16, 512):
        ns = Namespace("bench", KVLayout(32, 8, 128, bs))
        nblocks = tokens.size // bs
        ours = median_seconds(lambda ns=ns: block_keys(ns, tokens), rounds)  # type: ignore[misc]
        raw = median_seconds(lambda: hashlib.sha256(tokens.tobytes()).digest(), rounds)
        rows.append(
            Row(
                f"keying 128k tokens, bs={bs} (ms/1k blk)",
                ours * 1e3 / nblocks * 1000,
                "ms",
                "one sha256 of the same bytes",
                raw * 1e3 / nblocks * 1000,
                higher_is_better=False,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="bench.local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--batch", type=int, default=64, help="blocks per batch (2 MiB each)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per figure (median)")
    ap.add_argument("--data-dir", help="where the SSD tier writes (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = bench_dram(args.batch, args.rounds)
    with tempfile.TemporaryDirectory(dir=args.data_dir) as d:
        rows += bench_ssd(args.batch, args.rounds, Path(d))
    rows += bench_keys(args.rounds)
    print_table(f"bench.local: embedded store, {os.cpu_count()} cores", rows, as_json=args.json)


if __name__ == "__main__":
    main()
