"""The ``kvstore`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import signal
import sys
import threading
from pathlib import Path

from kvstore.config import StoreConfig, default_data_dir
from kvstore.errors import KVStoreError
from kvstore.units import format_size

_EPILOG = """\
Configuration comes from defaults < --config TOML < KVSTORE_* env vars < flags.
Example TOML:

  [dram]
  capacity = "8GiB"
  [ssd]
  path = "/nvme/kvstore"
  capacity = "500GiB"
  compression = "none"   # or "lz4" (real KV rarely compresses)
"""


def _add_store_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("store")
    g.add_argument("--config", metavar="TOML", help="config file (see the epilog)")
    g.add_argument("--dram-capacity", metavar="SIZE", help="DRAM pool size, e.g. 8GiB")
    g.add_argument("--ssd-path", metavar="DIR", help="SSD tier data dir ('none' disables it)")
    g.add_argument("--ssd-capacity", metavar="SIZE", help="SSD tier size limit, e.g. 500GiB")
    g.add_argument("--compression", choices=["none", "lz4"], help="default SSD compression")
    g.add_argument("--eviction", help="eviction policy (default prefix-lru)")


def config_from_args(args: argparse.Namespace, *, default_ssd: Path | None = None) -> StoreConfig:
    """The one place a store's config is built from flags, env and a TOML file."""
    overrides = {
        "dram.capacity": args.dram_capacity,
        "ssd.path": args.ssd_path,
        "ssd.capacity": args.ssd_capacity,
        "ssd.compression": args.compression,
        "eviction": args.eviction,
    }
    defaults = {"ssd.path": str(default_ssd)} if default_ssd is not None else None
    return StoreConfig.load(args.config, env=os.environ, overrides=overrides, defaults=defaults)


def _serve(args: argparse.Namespace) -> int:
    from kvstore.store import TieredStore

    cfg = config_from_args(args, default_ssd=default_data_dir() / "ssd")
    with TieredStore(cfg) as store:
        s = store.stats()
        summary = {
            "dram_capacity": cfg.dram.capacity,
            "ssd_path": str(cfg.ssd.path) if cfg.ssd.path else None,
            "ssd_capacity": cfg.ssd.capacity if cfg.ssd.enabled else 0,
            "recovered_blocks": s.blocks,
        }
        if args.json:
            print(json.dumps(summary), flush=True)
        else:
            print(f"kvstore: DRAM pool {format_size(cfg.dram.capacity)}", flush=True)
            if cfg.ssd.path:
                print(
                    f"kvstore: SSD tier {cfg.ssd.path} ({format_size(cfg.ssd.capacity)}), "
                    f"{s.blocks} blocks recovered",
                    flush=True,
                )
            print(
                "kvstore: embedded store open; the network service (gRPC) comes with the "
                "service issue. Ctrl-C or SIGTERM closes it cleanly.",
                flush=True,
            )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        print("kvstore: closing", flush=True)
    return 0


def _bench(args: argparse.Namespace) -> int:
    sys.argv = [f"bench.{args.which}", *args.rest]
    try:
        runpy.run_module(f"bench.{args.which}", run_name="__main__")
    except ImportError as e:
        print(
            f"kvstore bench: cannot load bench.{args.which}: {e} "
            "(run from a checkout installed with pip install -e .)",
            file=sys.stderr,
        )
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore",
        description="A tiered KV-cache block store for disaggregated LLM inference.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run a store node on its embedded default (DRAM + SSD under ~/.cache/kvstore)",
        description="Open the store (DRAM pool, SSD tier with its index rebuilt from disk) "
        "and keep it open until SIGINT/SIGTERM, then close it cleanly.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_store_flags(serve)
    serve.add_argument("--json", action="store_true", help="print the start-up summary as JSON")
    serve.set_defaults(func=_serve)

    bench = sub.add_parser(
        "bench",
        help="run a benchmark from bench/ (e.g. 'kvstore bench local')",
        description="Benchmarks print each figure beside a baseline measured in the same run.",
    )
    bench.add_argument(
        "which",
        choices=["local", "transfer"],
        help="local: DRAM/SSD tiers and keying; transfer: each transfer backend vs raw I/O",
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except KVStoreError as e:
        print(f"kvstore: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
