"""The ``kvstore`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import logging
import os
import runpy
import signal
import struct
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvstore.config import StoreConfig, check_directory_url, default_data_dir
from kvstore.errors import InvalidArgumentError, KVStoreError
from kvstore.proto import kvstore_pb2 as pb
from kvstore.rpc import DEFAULT_URL, Connection
from kvstore.units import format_size
from kvstore.version import VERSION
from kvstore.wire import reply_holders

if TYPE_CHECKING:
    from kvstore.node.server import Node
    from kvstore.tools.replay import Result
from transfer import TransferConfig

# the bench/ modules `kvstore bench` runs
BENCHES = (
    "local",
    "transfer",
    "remote",
    "cluster",
    "native",
    "metrics",
    "compare",
    "profile",
    "soak",
    "replay",
)

_EPILOG = """\
Configuration comes from defaults < --config TOML (or $KVSTORE_CONFIG) <
KVSTORE_<SECTION>_<FIELD> env vars (e.g. KVSTORE_DRAM_CAPACITY=8GiB; one that
names no setting is an error) < flags. Example TOML:

  [dram]
  capacity = "8GiB"
  [ssd]
  path = "/nvme/kvstore"
  capacity = "500GiB"
  compression = "none"   # or "lz4" (real KV rarely compresses)
  [server]
  host = "127.0.0.1"     # 0.0.0.0 to serve other hosts (set a token then)
  port = 50061
  token = "..."          # grants every tenant; or per tenant:
  tenant_tokens = { team-a = "...", team-b = "..." }
  [transfer]
  backend = "tcp"        # shm (same host), ucx, tcp
  host = "127.0.0.1"     # the address clients' engines can reach
  [cluster]
  redis = "redis://10.0.0.2:6379/0"   # join a cluster (omit to run alone)
  heartbeat = 1.0        # seconds between heartbeats
  ttl = 3.0              # a node silent this long is dead to readers
"""
_CLIENT_EPILOG = """\
The node is --url (default $KVSTORE_URL or kvstore://127.0.0.1:50061); the
token is --token (default $KVSTORE_TOKEN).
"""


def _add_store_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("store")
    g.add_argument(
        "--config", metavar="TOML", help="config file (default $KVSTORE_CONFIG; see the epilog)"
    )
    g.add_argument(
        "--hbm-capacity",
        metavar="SIZE",
        help="GPU-memory tier above DRAM, e.g. 16GiB (default 0: none; needs a CUDA GPU)",
    )
    g.add_argument(
        "--dram-capacity",
        metavar="SIZE",
        help="DRAM pool size, e.g. 8GiB (default: a quarter of free memory, at most 4GiB)",
    )
    g.add_argument(
        "--ssd-path",
        metavar="DIR",
        help="SSD tier data dir ('none' disables it; default ~/.cache/kvstore/ssd)",
    )
    g.add_argument(
        "--ssd-capacity", metavar="SIZE", help="SSD tier size limit, e.g. 500GiB (default 64GiB)"
    )
    g.add_argument(
        "--compression",
        choices=["none", "lz4"],
        help="SSD compression (default none: real KV rarely compresses)",
    )
    g.add_argument("--eviction", help="eviction policy: arc (default), prefix-lru or lru")
    g.add_argument(
        "--admission", help="DRAM admission of a put's tail under pressure: all (default) or tail"
    )


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("service")
    g.add_argument("--host", help="address the gRPC service binds (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="gRPC port (default 50061; 0 picks a free one)")
    g.add_argument(
        "--transfer",
        metavar="BACKEND|URL",
        help="payload transport: tcp (default), shm, ucx, or a URL like tcp://10.0.0.5:0",
    )
    g.add_argument("--token", help="token every call must carry (default $KVSTORE_TOKEN)")
    g.add_argument(
        "--data-port",
        type=int,
        metavar="PORT",
        help="port of the data port, where batches move in calls of up to server.stream_max "
        "(256MiB), one round trip each (default 0: a free one; -1: none, gRPC and the engine only)",
    )
    g.add_argument("--max-message", metavar="SIZE", help="largest gRPC message (default 64MiB)")
    g.add_argument("--node", help="this node's name (default host:port; keep it across restarts)")
    g.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus /metrics on this HTTP port (0: a free one; default: none)",
    )
    g.add_argument("--metrics-host", help="address /metrics binds (default 127.0.0.1)")
    g = p.add_argument_group("cluster (see docs/cluster.md)")
    g.add_argument(
        "--redis",
        metavar="URL",
        help="join the cluster whose directory is at redis://host:port/db "
        "(or redis+sentinel://h:p,h:p/SERVICE/db, redis+cluster://h:p,h:p; default: run alone)",
    )
    g.add_argument(
        "--advertise", metavar="HOST:PORT", help="where clients reach this node (default: bind)"
    )
    g.add_argument(
        "--cluster-host",
        metavar="NAME",
        help="this machine's name for locality (default: hostname)",
    )


def config_from_args(args: argparse.Namespace, *, default_ssd: Path | None = None) -> StoreConfig:
    """The one place a store's config is built from flags, env and a TOML file."""
    overrides = {
        "hbm.capacity": args.hbm_capacity,
        "metrics.port": getattr(args, "metrics_port", None),
        "metrics.host": getattr(args, "metrics_host", None),
        "dram.capacity": args.dram_capacity,
        "ssd.path": args.ssd_path,
        "ssd.capacity": args.ssd_capacity,
        "ssd.compression": args.compression,
        "eviction": args.eviction,
        "admission": args.admission,
    }
    if hasattr(args, "host"):  # serve's flags
        overrides.update(
            {
                "server.host": args.host,
                "server.port": args.port,
                "server.data_port": args.data_port,
                "server.token": args.token,
                "server.max_message": args.max_message,
                "server.node": args.node,
                "cluster.redis": args.redis,
                "cluster.advertise": args.advertise,
                "cluster.host": args.cluster_host,
            }
        )
        if args.transfer:
            t = TransferConfig.from_url(args.transfer)
            overrides["transfer.backend"] = t.backend
            if "://" in args.transfer:
                overrides.update({"transfer.host": t.host, "transfer.port": t.port})
    defaults = {"ssd.path": str(default_ssd)} if default_ssd is not None else None
    toml = args.config or os.environ.get("KVSTORE_CONFIG") or None
    return StoreConfig.load(toml, env=os.environ, overrides=overrides, defaults=defaults)


def _serve(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, default_ssd=default_data_dir() / "ssd")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: every thread's stack
    node = _start_node(cfg, quiet=args.json)
    # Everything built so far (modules, config, the pools, a recovered index)
    # lives as long as the process: freezing it keeps the collector's full
    # passes to request garbage. Without this a gen-2 pass over torch's and
    # gRPC's objects stalled one Get in ~100 by ~150 ms (docs/performance.md).
    gc.freeze()
    try:
        s = node.store.stats()
        summary = {
            "url": node.url,
            "node": node.service.node,
            "transfer": node.service.engine.endpoint if node.service.engine else None,
            "data_port": node.data_port.port if node.data_port else None,
            "metrics": node.metrics.url if node.metrics else None,
            "hbm_capacity": cfg.hbm.capacity,
            "dram_capacity": cfg.dram.capacity,
            "ssd_path": str(cfg.ssd.path) if cfg.ssd.path else None,
            "ssd_capacity": cfg.ssd.capacity if cfg.ssd.enabled else 0,
            "recovered_blocks": s.blocks,
            "auth": "token" if cfg.server.secured else "none",
            "cluster": check_directory_url(cfg.cluster.redis) if cfg.cluster.enabled else None,
        }
        if args.json:
            print(json.dumps(summary), flush=True)
        else:
            if cfg.hbm.enabled:
                print(f"kvstore: HBM pool {format_size(cfg.hbm.capacity)} on {cfg.hbm.device}")
            print(f"kvstore: DRAM pool {format_size(cfg.dram.capacity)}", flush=True)
            if cfg.ssd.path:
                print(
                    f"kvstore: SSD tier {cfg.ssd.path} ({format_size(cfg.ssd.capacity)}), "
                    f"{s.blocks} blocks recovered",
                    flush=True,
                )
            print(
                f"kvstore: serving {node.url} (payloads over {summary['transfer']}"
                + (f" and data port {summary['data_port']}" if summary["data_port"] else "")
                + f", auth: {summary['auth']}). Ctrl-C or SIGTERM stops it cleanly.",
                flush=True,
            )
            if cfg.cluster.enabled:
                print(f"kvstore: member of the cluster at {summary['cluster']}", flush=True)
            if node.metrics is not None:
                print(f"kvstore: Prometheus metrics at {node.metrics.url}", flush=True)
        stop.wait()
        print("kvstore: draining in-flight calls, then closing", flush=True)
    finally:
        node.stop()
    print("kvstore: closed", flush=True)
    return 0


def _start_node(cfg: StoreConfig, *, quiet: bool) -> Node:
    """A node of ``cfg``, saying first what it is about to do: faulting a
    large DRAM pool in takes seconds (a bar shows it on a terminal)."""
    from tqdm import tqdm

    from kvstore.node.server import Node

    pool = format_size(cfg.dram.capacity)
    doing = f"faulting in the {pool} DRAM pool" if cfg.dram.prefault else f"a {pool} DRAM pool"
    print(
        f"kvstore: starting on {cfg.server.host}:{cfg.server.port} ({doing}"
        + (f", reading the SSD tier at {cfg.ssd.path}" if cfg.ssd.enabled else "")
        + ")",
        file=sys.stderr if quiet else sys.stdout,
        flush=True,
    )
    show = cfg.dram.prefault and sys.stderr.isatty()
    with tqdm(total=cfg.dram.capacity, unit="B", unit_scale=True, disable=not show) as bar:

        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        return Node(cfg, progress=progress)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _connect(args: argparse.Namespace) -> Connection:
    return Connection(args.url, token=args.token, timeout=args.timeout)


def _stat(args: argparse.Namespace) -> int:
    conn = _connect(args)
    try:
        health = conn.call("Health", pb.HealthRequest())
        stats = json.loads(conn.call("Stats", pb.StatsRequest()).json)
    finally:
        conn.close()
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    st, svc = stats["store"], stats["service"]
    print(
        f"node {svc['node']}  {pb.HealthReply.Status.Name(health.status).lower()}  "
        f"up {svc['uptime_s']:.0f}s  payloads over {svc['transfer_backend'] or 'gRPC only'}"
        + (f", data port {health.data_port}" if health.data_port else "")
    )
    for name, t in st["tiers"].items():
        used, cap = format_size(t["used_bytes"]), format_size(t["capacity_bytes"])
        print(
            f"  {name:5s} {used:>10s} / {cap:<10s} {t['blocks']:>9d} blocks  "
            f"{t['hits']:>9d} hits  {t['evictions']:>7d} moved out for room"
        )
    print(f"  {st['demotions']} blocks demoted to SSD, {st['dropped']} dropped from the store")
    print(
        f"  lookup hit rate {st['lookup_hit_rate']:.1%} (tokens found); read hit rate "
        f"{st['read_hit_rate']:.1%} ({st['hits']} blocks served, {st['misses']} missed); "
        f"{st['blocks']} blocks; {st['checksum_failures']} checksum failures"
    )
    calls = ", ".join(f"{k} {v}" for k, v in sorted(svc["calls"].items()))
    print(f"  calls: {calls or 'none'}; errors: {svc['errors'] or 'none'}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    conn = _connect(args)
    try:
        stats = json.loads(conn.call("Stats", pb.StatsRequest()).json)
    finally:
        conn.close()
    rows = sorted(stats["store"]["namespaces"].values(), key=lambda n: n["name"])
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'NAMESPACE':32s} {'BLOCKS':>9s} {'BYTES':>10s}  ID")
    for n in rows:
        print(f"{n['name']:32s} {n['blocks']:>9d} {format_size(n['bytes']):>10s}  {n['id']}")
    return 0


def _namespace_id(conn: Connection, given: str) -> bytes:
    """A namespace's id from its hex id or its name as ``kvstore ls`` shows
    it (``tenant/model``; a bare model is the default tenant's)."""
    if len(given) == 32:
        try:
            return bytes.fromhex(given)
        except ValueError:
            pass
    name = given if "/" in given else f"default/{given}"
    stats = json.loads(conn.call("Stats", pb.StatsRequest()).json)
    ids = [n["id"] for n in stats["store"]["namespaces"].values() if n["name"] == name and n["id"]]
    if len(ids) != 1:
        raise InvalidArgumentError(
            f"no namespace {given!r} on this node (one name or 32-hex id from kvstore ls)"
            if not ids
            else f"{len(ids)} namespaces are named {name!r}: give the id (kvstore ls)"
        )
    return bytes.fromhex(ids[0])


def _block_request(args: argparse.Namespace, conn: Connection) -> tuple[bytes, bytes]:
    try:
        key = bytes.fromhex(args.key)
    except ValueError:
        raise InvalidArgumentError("the key is 32 hex digits (kvstore get NAMESPACE KEY)") from None
    return _namespace_id(conn, args.namespace), key


def _locate(args: argparse.Namespace) -> int:
    text = Path(args.tokens_file).read_text() if args.tokens_file else args.tokens
    try:
        tokens = [int(t) for t in text.replace(",", " ").split()]
        packed = struct.pack(f"<{len(tokens)}I", *tokens)
    except (ValueError, struct.error):
        raise InvalidArgumentError("tokens are whole numbers 0..2^32-1, space-separated") from None
    conn = _connect(args)
    try:
        nsid = _namespace_id(conn, args.namespace)
        reply = conn.call("Locate", pb.LocateRequest(namespace_id=nsid, tokens=packed))
    finally:
        conn.close()
    found = reply_holders(reply, args.url)
    if args.json:
        rows = [
            {"node": h.node, "url": h.url, "host": h.host, "tokens": h.tokens,
             "tokens_by_tier": h.tokens_by_tier}
            for h in found
        ]  # fmt: skip
        print(json.dumps({"tokens": len(tokens), "block_size": reply.block_size, "holders": rows}))
        return 0
    print(f"{len(found)} node(s) hold a prefix of these {len(tokens)} tokens")
    print(f"{'NODE':24s} {'HOST':16s} {'TOKENS':>8s}  {'BY TIER':24s} URL")
    for h in found:
        by = " ".join(f"{t} {n}" for t, n in h.tokens_by_tier.items())
        print(f"{h.node:24s} {h.host or '-':16s} {h.tokens:>8d}  {by:24s} {h.url}")
    return 0


def _get(args: argparse.Namespace) -> int:
    conn = _connect(args)
    try:
        nsid, key = _block_request(args, conn)
        reply = conn.call("Get", pb.GetRequest(namespace_id=nsid, keys=key))
    finally:
        conn.close()
    if not reply.found or not reply.found[0]:
        print(f"kvstore: block {args.key} not found", file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.buffer.write(reply.inline)
    else:
        Path(args.output).write_bytes(reply.inline)
        print(f"{len(reply.inline)} bytes, xxh3 {reply.checksums[0]:016x} -> {args.output}")
    return 0


def _put(args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    conn = _connect(args)
    try:
        nsid, key = _block_request(args, conn)
        req = pb.PutRequest(namespace_id=nsid, keys=key, sizes=[len(data)], inline=data)
        stored = conn.call("Put", req).stored
    finally:
        conn.close()
    print("stored" if stored and stored[0] else "already present (keys name content)")
    return 0


def _nodes(args: argparse.Namespace) -> int:
    from kvstore.cluster.redis_directory import RedisDirectory

    directory = RedisDirectory(args.redis, prefix=args.prefix)
    try:
        nodes = sorted(directory.nodes(), key=lambda n: n.name)
    finally:
        directory.close()
    if args.json:
        print(json.dumps([asdict(n) for n in nodes], indent=1))
        return 0
    print(
        f"{'NODE':24s} {'URL':28s} {'HOST':16s} {'BACKEND':7s} {'DRAM FREE':>14s} {'SSD FREE':>14s}"
    )
    for n in nodes:
        dram = f"{format_size(n.dram_free)}/{format_size(n.dram_capacity)}"
        ssd = f"{format_size(n.ssd_free)}/{format_size(n.ssd_capacity)}" if n.ssd_capacity else "-"
        print(f"{n.name:24s} {n.url:28s} {n.host:16s} {n.backend:7s} {dram:>14s} {ssd:>14s}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    sys.argv = [f"bench.{args.which}", *args.rest]
    try:
        runpy.run_module(f"bench.{args.which}", run_name="__main__")
    except ImportError as e:
        print(
            f"kvstore {args.command}: cannot load bench.{args.which}: {e} "
            "(run from a checkout installed with pip install -e .)",
            file=sys.stderr,
        )
        return 2
    return 0


def _replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvstore.stats import SHAPES
    from kvstore.tools.replay import capacities, load_trace, run_all

    trace = load_trace(args.trace, args.format, block_size=args.block_size, limit=args.limit)
    sizes = capacities(args.capacity, trace.distinct)
    for part, size in zip(args.capacity.split(","), sizes, strict=False):
        if not part.strip().endswith("%"):  # a bare number is blocks: say so
            print(
                f"kvstore: --capacity {part.strip()} is {size} blocks "
                f"({100 * size / trace.distinct:.2g}% of the {trace.distinct} distinct); "
                f"write {part.strip()}% for a share",
                file=sys.stderr,
            )
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    if "lru" not in policies:
        policies.append("lru")  # the baseline is always in the table
    runs = len(sizes) * len(policies) * len(trace.requests)
    with tqdm(total=runs, disable=args.json or not sys.stderr.isatty(), unit="req") as bar:
        results = run_all(
            trace,
            policies,
            sizes,
            ssd_fraction=args.ssd_fraction,
            progress=lambda _: bar.update(),
            starting=lambda policy, size: bar.set_description(f"{policy} at {size} blocks"),
        )
    opt = {r.capacity: r.hit_rate for r in results if r.policy == "OPT"}

    def vs_opt(r: Result) -> float | None:
        return r.hit_rate / opt[r.capacity] if opt[r.capacity] else None

    if args.json:
        rows = [r.as_dict() | {"vs_opt": vs_opt(r)} for r in results]
        print(json.dumps({"trace": str(args.trace), "requests": len(trace.requests),
                          "accesses": trace.accesses, "distinct_blocks": trace.distinct,
                          "results": rows}))  # fmt: skip
    else:
        print(
            f"{args.trace}: {len(trace.requests)} requests, {trace.accesses} block accesses, "
            f"{trace.distinct} distinct blocks ({trace.block_tokens} tokens each); hit = leading "
            "blocks found"
        )
        shapes = [name for name, _ in SHAPES]
        print(f"{'capacity':>16} {'policy':12} {'hit rate':>9} {'vs OPT':>7} {'tiers':18}"
              + "".join(f"{s:>9}" for s in shapes))  # fmt: skip
        for r in results:
            pct = f"{r.capacity} ({100 * r.capacity / trace.distinct:.0f}%)"
            tiers = " ".join(f"{t} {v:.1%}" for t, v in r.tier_shares().items())
            ratio = vs_opt(r)
            vs = "" if ratio is None else f"{ratio:.2f}x"
            rates = r.shape_rates()
            per = "".join(f"{rates[s]:>9.1%}" if s in rates else f"{'-':>9}" for s in shapes)
            print(f"{pct:>16} {r.policy:12} {r.hit_rate:>9.1%} {vs:>7} {tiers:18}{per}")
    if args.plot:
        _plot(results, args.plot, trace.distinct, Path(args.trace).name)
    return 0


def _plot(results: list[Result], path: str, distinct: int, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgumentError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    policies = list(dict.fromkeys(r.policy for r in results))
    sizes = sorted({r.capacity for r in results})
    if len(sizes) == 1:  # one capacity: a line has no x to run along
        ax.bar(policies, [100 * r.hit_rate for r in results], color="C0")
        ax.set_xlabel(f"policy, at {100 * sizes[0] / distinct:.2g}% of distinct blocks")
    else:
        for policy in policies:
            mine = [r for r in results if r.policy == policy]
            ax.plot(
                [100 * r.capacity / distinct for r in mine],
                [100 * r.hit_rate for r in mine],
                marker="o",
                label=policy,
            )
        ax.set_xlabel("capacity (% of distinct blocks)")
        ax.legend()
    ax.set_ylim(bottom=0)
    ax.set_ylabel("prefix hit rate (% of blocks)")
    ax.set_title(f"{title}: prefix hit rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def _monitor(args: argparse.Namespace) -> int:
    from kvstore.tools.monitor import run

    return run(
        args.source or args.url or os.environ.get("KVSTORE_URL", DEFAULT_URL),
        token=args.token or os.environ.get("KVSTORE_TOKEN"),
        timeout=args.timeout,
        interval=args.interval,
        once=args.once,
        as_json=args.json,
        count=args.count,
        view=args.view.replace("-", " "),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore",
        description="A tiered KV-cache block store for disaggregated LLM inference.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvstore {VERSION}")
    _add_log_flags(parser, on_command=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run a store node: gRPC service on 127.0.0.1:50061, DRAM + SSD tiers",
        description="Open the store (DRAM pool, SSD tier with its index rebuilt from disk), "
        "serve put/get/lookup over gRPC with payloads over the transfer engine, and on "
        "SIGINT/SIGTERM let in-flight calls finish, write DRAM-only blocks to SSD and close.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_store_flags(serve)
    _add_server_flags(serve)
    serve.add_argument("--json", action="store_true", help="print the start-up summary as JSON")
    serve.set_defaults(func=_serve)

    def client_command(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=_CLIENT_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--url",
            default=os.environ.get("KVSTORE_URL", DEFAULT_URL),
            help=f"the node, kvstore://host:port (default $KVSTORE_URL or {DEFAULT_URL})",
        )
        p.add_argument("--token", help="token (default $KVSTORE_TOKEN)")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
        p.set_defaults(func=func)
        return p

    client_command("stat", "a node's health, tiers, hit rate and call counts", _stat).add_argument(
        "--json", action="store_true", help="the whole Stats answer as JSON"
    )
    client_command("ls", "a node's namespaces with block counts and bytes", _ls).add_argument(
        "--json", action="store_true", help="as JSON"
    )
    locate = client_command(
        "locate",
        "which nodes hold how much of a prompt, per tier (a cluster's, as the node's "
        "directory knows them; a lone node answers for itself)",
        _locate,
    )
    locate.add_argument("namespace", help="namespace: its name or id, as kvstore ls shows them")
    given = locate.add_mutually_exclusive_group(required=True)
    given.add_argument("--tokens", help='the prompt\'s token ids, e.g. "1 2 3" or "1,2,3"')
    given.add_argument("--tokens-file", help="a file of token ids (whitespace or commas)")
    locate.add_argument("--json", action="store_true", help="as JSON")
    get = client_command("get", "fetch one raw block (for debugging)", _get)
    get.add_argument("namespace", help="namespace: its name or id, as kvstore ls shows them")
    get.add_argument("key", help="block key (32 hex digits)")
    get.add_argument("-o", "--output", default="-", help="file to write (default stdout)")
    put = client_command("put", "store one raw block (for debugging)", _put)
    put.add_argument("namespace", help="namespace: its name or id, as kvstore ls shows them")
    put.add_argument("key", help="block key (32 hex digits)")
    put.add_argument("file", help="payload file (- for stdin); its size must be the block size")

    replay = sub.add_parser(
        "replay",
        help="replay a request trace through the store's eviction: hit rate vs LRU and OPT",
        description="Replay a trace through the store's real placement and eviction (4 KiB "
        "stand-in payloads, so capacities are exact block counts) for each policy and "
        "capacity, and print the prefix hit rate beside LRU and Belady's offline optimum, "
        "overall, per tier and per prompt length.",
        epilog="example:\n  kvstore replay --trace ../shared/data/traces/"
        "mooncake_synthetic_trace.jsonl --capacity 1%,5%,10%,25% --plot hit-rate.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("--trace", required=True, help="trace file (JSONL)")
    replay.add_argument(
        "--format",
        choices=["mooncake", "tokens"],
        default="mooncake",
        help="mooncake: hash_ids of 512-token blocks; tokens: a token-id list per line "
        "(default mooncake)",
    )
    replay.add_argument(
        "--block-size",
        type=int,
        default=16,
        help="tokens per block for --format tokens (default 16)",
    )
    replay.add_argument(
        "--capacity",
        default="5%",
        help="total capacity: %% of the trace's distinct blocks (5%%), or a block count "
        "(500), comma-separated (default 5%%)",
    )
    replay.add_argument(
        "--ssd-fraction",
        type=float,
        default=0.0,
        help="share of each capacity on the SSD tier (default 0: DRAM only)",
    )
    replay.add_argument(
        "--policy",
        default="arc,prefix-lru",
        help="eviction policies, comma-separated (lru is added); add an admission rule "
        "after a plus, e.g. arc+tail (default arc,prefix-lru)",
    )
    replay.add_argument(
        "--limit", type=int, default=0, help="replay only the first N requests (default 0: all)"
    )
    replay.add_argument("--json", action="store_true", help="the results as JSON")
    replay.add_argument(
        "--plot", metavar="PNG", help="hit rate vs capacity per policy (matplotlib)"
    )
    replay.set_defaults(func=_replay)

    monitor = sub.add_parser(
        "monitor",
        help="live hit rate of a node or a cluster in the terminal",
        description="Poll a node's (or every cluster member's) Stats each interval and show "
        "the lookup hit rate now, over 1 and 10 minutes and in total, per tier, per prefix "
        "shape and per namespace, with throughput and capacity. Keys: tab or arrows switch "
        "views, q quits.",
        epilog="examples:\n  kvstore monitor kvstore://127.0.0.1:50061\n"
        "  kvstore monitor redis://10.0.0.2:6379/0           # one row per node, and the total\n"
        "  kvstore monitor --once --json | jq .lookup_hit_rate   # for scripts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    monitor.add_argument(
        "source",
        nargs="?",
        help="kvstore://host:port (one node) or redis://host:port/db (a cluster); "
        "default $KVSTORE_URL or " + DEFAULT_URL,
    )
    monitor.add_argument("--url", help="the same as SOURCE, as the other commands take it")
    monitor.add_argument(
        "--interval", type=float, default=1.0, help="seconds between polls (default 1)"
    )
    monitor.add_argument("--once", action="store_true", help="print one snapshot and exit")
    monitor.add_argument("--json", action="store_true", help="JSON snapshots, one per line")
    monitor.add_argument("--count", type=int, default=0, help="with --json: stop after N")
    monitor.add_argument(
        "--view",
        choices=["overview", "prefix-shapes", "prefix shapes", "namespaces", "nodes"],
        default="overview",
        help="the view to start in, or to print with --once (default overview)",
    )
    monitor.add_argument("--token", help="token (default $KVSTORE_TOKEN)")
    monitor.add_argument("--timeout", type=float, default=5.0, help="seconds per call (default 5)")
    monitor.set_defaults(func=_monitor)

    nodes = sub.add_parser(
        "nodes",
        help="the live nodes of a cluster, with their free capacity",
        description="List the nodes whose heartbeat is current in a cluster's directory.",
    )
    nodes.add_argument(
        "--redis",
        default=os.environ.get("KVSTORE_CLUSTER_REDIS", ""),
        required="KVSTORE_CLUSTER_REDIS" not in os.environ,
        help="directory URL: redis://host:port/db, redis+sentinel://h:p,h:p/SERVICE/db or "
        "redis+cluster://h:p,h:p (default $KVSTORE_CLUSTER_REDIS)",
    )
    nodes.add_argument(
        "--prefix", default="kvstore", help="the cluster's key prefix (default kvstore)"
    )
    nodes.add_argument("--json", action="store_true", help="as JSON")
    nodes.set_defaults(func=_nodes)

    bench = sub.add_parser(
        "bench",
        help="run a benchmark from bench/ (e.g. 'kvstore bench local')",
        description="Benchmarks print each figure beside a baseline measured in the same run.",
    )
    bench.add_argument(
        "which",
        choices=BENCHES,
        help="local: DRAM/SSD tiers and keying; transfer: each transfer backend vs raw I/O; "
        "remote: kvstore serve via the client; cluster: 1-3 nodes and directory lookups; "
        "native: paged-KV gather/scatter (CPU, and GPU<->pinned host where CUDA is); "
        "metrics: a node's throughput with metrics on vs off; "
        "compare: kvstore beside Mooncake Store and Redis on the same objects; "
        "soak: minutes of mixed load from several processes, every read verified; "
        "replay: eviction policies beside LRU and OPT on the Mooncake trace and a chat workload",
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(func=_bench)

    demo = sub.add_parser(
        "demo",
        help="run a demo end to end (e.g. 'kvstore demo pd')",
        description="Demos start real processes on this host and check what they show.",
    )
    demo.add_argument(
        "which",
        choices=["pd"],
        help="pd: prefill/decode disaggregation with a small Llama model (needs the "
        "'engines' extra: pip install -e '.[engines]'); TTFT cold vs warm, tokens saved",
    )
    demo.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the demo")
    demo.set_defaults(func=_bench)
    for command in sub.choices.values():  # also after the command: kvstore serve -v
        _add_log_flags(command, on_command=True)
        command.set_defaults(command_parser=command)  # a mistake shows this command's usage
    return parser


def _add_log_flags(p: argparse.ArgumentParser, *, on_command: bool) -> None:
    """The logging flags. On a command they default to SUPPRESS, so that a
    flag given before the command is not reset by the command's parser."""
    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if on_command else {}
    g = p.add_argument_group("logging (before or after the command)")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging", **unset)
    g.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log level (default warning; -v is debug)",
        **unset,
    )
    g.add_argument(
        "--log-json",
        action="store_true",
        help="logs as JSON lines (time, level, logger, message)",
    )


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    level = "debug" if args.verbose else (args.log_level or "warning")
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLogFormatter()
        if args.log_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    try:
        return int(args.func(args))
    except (KVStoreError, OSError) as e:  # one line saying what to do; the trace at debug
        logging.getLogger("kvstore").debug("the error's traceback", exc_info=True)
        print(f"kvstore: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
