"""A node's metrics in Prometheus form, and the latency histograms behind them.

Nothing here sits on the data path: counters live where the node already
counts (the store's lock, the service's call lock), and the exporter turns a
snapshot (the same dict ``Stats`` returns) into metric families only when
Prometheus scrapes ``/metrics``.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from kvstore.stats import LOOKUP_TIERS

# Seconds: gRPC control calls take ~0.5 ms here; bulk gets run to seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass
class Histogram:
    """Counts per upper bound (the last slot is +Inf); not thread-safe."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def as_dict(self) -> dict[str, Any]:
        return {"buckets": list(LATENCY_BUCKETS), "counts": list(self.counts), "sum": self.total}


Snapshot = dict[str, Any]


def families(snap: Snapshot) -> Iterator[Any]:
    """Prometheus metric families of one ``Stats`` snapshot."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    st, svc = snap["store"], snap["service"]

    def counter(name: str, doc: str, labels: list[str] | None = None) -> Any:
        return CounterMetricFamily(f"kvstore_{name}", doc, labels=labels)

    def gauge(name: str, doc: str, labels: list[str] | None = None) -> Any:
        return GaugeMetricFamily(f"kvstore_{name}", doc, labels=labels)

    plain = [
        ("lookups", "Lookups answered", st["lookups"]),
        ("lookup_miss_tokens", "Tokens asked for and not found", st["lookup_miss_tokens"]),
        ("get_misses", "Blocks asked for and not served", st["misses"]),
        ("get_bytes", "Payload bytes served", st["get_bytes"]),
        ("put_blocks", "Blocks newly stored", st["puts"]),
        ("put_duplicates", "Blocks put that were already stored", st["put_duplicates"]),
        ("put_bytes", "Payload bytes stored", st["put_bytes"]),
        ("put_refused", "Blocks no tier could take (store full)", st["put_refused"]),
        ("put_declined", "Tail blocks admission kept out of DRAM", st["put_declined"]),
        ("demotions", "Blocks copied from DRAM down to SSD", st["demotions"]),
        ("promotions", "Blocks copied from SSD up to DRAM", st["promotions"]),
        ("dropped", "Blocks that left the store under pressure", st["dropped"]),
        ("checksum_failures", "SSD reads whose checksum did not match", st["checksum_failures"]),
        ("deletes", "Blocks deleted", st["deletes"]),
    ]
    for name, doc, value in plain:
        c = counter(name, doc)
        c.add_metric([], value)
        yield c
    blocks = gauge("blocks", "Blocks stored")
    blocks.add_metric([], st["blocks"])
    yield blocks

    hit_tokens = counter("lookup_hit_tokens", "Tokens found by lookups, per tier", ["tier"])
    for tier, n in st["lookup_hit_tokens"].items():
        hit_tokens.add_metric([tier], n)
    yield hit_tokens
    per_tier = {
        "get_hits": counter("get_hits", "Blocks served, per tier", ["tier"]),
        "evictions": counter("evictions", "Copies that left a tier for room, per tier", ["tier"]),
        "capacity": gauge("tier_capacity_bytes", "Tier capacity", ["tier"]),
        "used": gauge("tier_used_bytes", "Tier bytes in use", ["tier"]),
        "free": gauge("tier_free_bytes", "Tier bytes free", ["tier"]),
        "blocks": gauge("tier_blocks", "Blocks resident, per tier", ["tier"]),
    }
    for tier, t in st["tiers"].items():
        per_tier["get_hits"].add_metric([tier], t["hits"])
        per_tier["evictions"].add_metric([tier], t["evictions"])
        per_tier["capacity"].add_metric([tier], t["capacity_bytes"])
        per_tier["used"].add_metric([tier], t["used_bytes"])
        per_tier["free"].add_metric([tier], t["capacity_bytes"] - t["used_bytes"])
        per_tier["blocks"].add_metric([tier], t["blocks"])
    yield from per_tier.values()

    def lookup_rows(kind: str, label: str, doc: str) -> dict[str, Any]:
        """Lookups, tokens found and tokens missed, per ``label``."""
        return {
            key: counter(f"{kind}_{key}", f"{doc}: {what}", [label])
            for key, what in (
                ("lookups", "lookups"),
                ("hit_tokens", "tokens found"),
                ("miss_tokens", "tokens missed"),
            )
        }

    shape = lookup_rows("prefix", "prefix", "Per prefix-length bucket")
    by_tier = counter(
        "prefix_tier_hit_tokens",
        "Tokens found, per prefix-length bucket and tier",
        ["prefix", "tier"],
    )
    for bucket, row in st["shapes"].items():
        for key, fam in shape.items():
            fam.add_metric([bucket], row[key])
        for tier in LOOKUP_TIERS:
            by_tier.add_metric([bucket, tier], row.get(f"{tier}_hit_tokens", 0))
    yield from (*shape.values(), by_tier)
    ns = lookup_rows("namespace", "namespace", "Per namespace")
    ns_blocks = gauge("namespace_blocks", "Blocks stored per namespace", ["namespace"])
    ns_bytes = gauge("namespace_bytes", "Bytes stored per namespace", ["namespace"])
    for n in st["namespaces"].values():
        for key, fam in ns.items():
            fam.add_metric([n["name"]], n[key])
        ns_blocks.add_metric([n["name"]], n["blocks"])
        ns_bytes.add_metric([n["name"]], n["bytes"])
    yield from (*ns.values(), ns_blocks, ns_bytes)

    calls = counter("rpc_calls", "gRPC calls, per method", ["method"])
    for method, n in svc["calls"].items():
        calls.add_metric([method], n)
    errors = counter(
        "rpc_errors", "gRPC calls that failed, per method and status", ["method", "code"]
    )
    for method, per_code in svc["errors_by_method"].items():
        for code, n in per_code.items():
            errors.add_metric([method, code], n)
    moved = counter("transfer_bytes", "Payload bytes moved", ["backend", "direction"])
    for direction, per_backend in svc.get("transfer_bytes", {}).items():
        for backend, n in per_backend.items():
            moved.add_metric([backend, direction], n)
    latency = HistogramMetricFamily(
        "kvstore_rpc_duration_seconds", "gRPC call latency, per method", labels=["method"]
    )
    for method, h in svc.get("latency", {}).items():
        running, buckets = 0, []
        for bound, n in zip([*map(str, h["buckets"]), "+Inf"], h["counts"], strict=True):
            running += n
            buckets.append((bound, running))
        latency.add_metric([method], buckets, h["sum"])
    uptime = gauge("uptime_seconds", "Seconds since the node started")
    uptime.add_metric([], svc["uptime_s"])
    build = gauge(
        "build_info", "Always 1: the release and the transfer backend", ["version", "backend"]
    )
    build.add_metric([svc["version"], svc["transfer_backend"] or "none"], 1)
    yield from (calls, errors, moved, latency, uptime, build)


class _Collector:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        yield from families(self._snapshot())


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass


class MetricsServer:
    """``/metrics`` over HTTP on its own thread, with the process's own
    collectors (CPU, memory, file descriptors, GC) beside the node's; any
    other path is a 404."""

    def __init__(self, snapshot: Callable[[], Snapshot], host: str, port: int) -> None:
        from prometheus_client import (
            GC_COLLECTOR,
            PLATFORM_COLLECTOR,
            PROCESS_COLLECTOR,
            CollectorRegistry,
            make_wsgi_app,
        )

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(snapshot))
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)
        metrics = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            if environ.get("PATH_INFO", "") in ("/metrics", "/metrics/"):
                return metrics(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: the metrics are at /metrics\n"]

        self._server = make_server(host, port, app, _Server, handler_class=_Quiet)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="kvstore-metrics", daemon=True
        )
        self._thread.start()
        self.host = host
        self.port = int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
