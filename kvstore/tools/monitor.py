"""``kvstore monitor``: a node's or a cluster's hit rate, live in the terminal.

It polls ``Stats`` of one node (``kvstore://host:port``) or of every live
member of a cluster (``redis://…``) once per interval and keeps the samples,
so each figure is shown now (over the last interval), over 1 and 10 minutes,
and since the node started. The hit rate is the share of tokens asked for by
``Lookup`` that were found: the prefill the store saved.

It lives in ``kvstore`` (not ``client``) because the ``kvstore`` command runs
it and it needs only the RPC connection and the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kvstore.directory_url import SCHEMES
from kvstore.errors import KVStoreError
from kvstore.proto import kvstore_pb2 as pb
from kvstore.rpc import Connection
from kvstore.stats import LOOKUP_TIERS, SHAPES, StoreStats, merge_stats
from kvstore.units import format_size

# (shown, JSON key, seconds)
WINDOWS = (("now", "now", 0.0), ("1 min", "1m", 60.0), ("10 min", "10m", 600.0))
VIEWS = ("overview", "prefix shapes", "namespaces", "nodes")
SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 600  # samples kept: 10 minutes at one per second


@dataclass(frozen=True)
class Sample:
    """One poll: each node's Stats (store and service sections) and their merge."""

    time: float  # monotonic: windows are measured on it
    nodes: dict[str, dict[str, Any]]
    total: StoreStats
    errors: dict[str, str]  # node -> why it did not answer
    wall: float  # Unix time, for what is shown

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": self.wall,
            "nodes": self.nodes,
            "unreachable": self.errors,
            "total": self.total.as_dict(),
        }


class Source:
    """Where the stats come from: one node, or every member of a cluster."""

    def __init__(self, url: str, *, token: str | None, timeout: float) -> None:
        self.url = url
        self._token, self._timeout = token, timeout
        self._conns: dict[str, Connection] = {}
        self._directory: Any = None
        if url.split("://", 1)[0] in SCHEMES:
            from kvstore.cluster.redis_directory import RedisDirectory

            self._directory = RedisDirectory(url)

    def _targets(self) -> dict[str, str]:
        if self._directory is None:
            return {self.url: self.url}
        return {n.name: n.url for n in self._directory.nodes()}

    def poll(self) -> Sample:
        nodes: dict[str, dict[str, Any]] = {}
        errors: dict[str, str] = {}
        for name, url in self._targets().items():
            try:
                conn = self._conns.get(url)
                if conn is None:
                    conn = self._conns[url] = Connection(
                        url, token=self._token, timeout=self._timeout
                    )
                snap = json.loads(conn.call("Stats", pb.StatsRequest()).json)
                nodes[snap["service"]["node"] if self._directory is None else name] = snap
            except KVStoreError as e:
                errors[name] = str(e)
                stale = self._conns.pop(url, None)
                if stale is not None:
                    stale.close()
        total = merge_stats([StoreStats.from_dict(s["store"]) for s in nodes.values()])
        return Sample(time.monotonic(), nodes, total, errors, time.time())

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        if self._directory is not None:
            self._directory.close()


def _unreachable_line(errors: dict[str, str]) -> str:
    """The header's note of nodes that did not answer, with the first reason."""
    if not errors:
        return ""
    name, why = next(iter(errors.items()))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"\n{name} unreachable{more}: {why[:160]}"


def _unreachable(sample: Sample) -> int:
    """The exit code of ``--once``: 1, each reason on stderr, when a node did
    not answer (a script must not take a dead node for an idle one)."""
    for name, why in sample.errors.items():
        print(f"kvstore: error: {name} unreachable: {why}", file=sys.stderr)
    return 1 if sample.errors else 0


def _rate(hit: float, miss: float) -> float | None:
    return hit / (hit + miss) if hit + miss else None


def _tokens(s: StoreStats) -> tuple[int, int]:
    return sum(s.lookup_hit_tokens.values()), s.lookup_miss_tokens


def _counts(s: StoreStats, kind: str) -> tuple[int, int]:
    """(found, missed): tokens of lookups, or blocks of reads."""
    return _tokens(s) if kind == "lookup" else (s.hits, s.misses)


class History:
    """Samples over the last ten minutes, and the figures they give."""

    def __init__(self) -> None:
        self.samples: deque[Sample] = deque(maxlen=HISTORY + 1)
        self.spark: deque[float | None] = deque(maxlen=60)

    def add(self, s: Sample) -> None:
        if self.samples:
            self.spark.append(self.hit_rate(0.0, s))
        self.samples.append(s)

    def _base(self, window: float, now: Sample) -> Sample | None:
        """The sample ``window`` seconds before ``now`` (0: the previous one)."""
        older = [s for s in self.samples if s is not now]
        if not older:
            return None
        if window <= 0:
            return older[-1]
        for s in older:
            if now.time - s.time <= window:
                return s
        return older[-1]

    def hit_rate(
        self, window: float | None, now: Sample | None = None, kind: str = "lookup"
    ) -> float | None:
        """Hit rate over ``window`` seconds (None: since start) of lookups (by
        tokens) or of reads (by blocks)."""
        now = now or self.samples[-1]
        hit, miss = _counts(now.total, kind)
        if window is not None:
            base = self._base(window, now)
            if base is None:
                return None
            h0, m0 = _counts(base.total, kind)
            hit, miss = hit - h0, miss - m0
        return _rate(hit, miss)

    def throughput(self) -> tuple[float, float]:
        """(get, put) bytes per second over the last interval."""
        now = self.samples[-1]
        base = self._base(0.0, now)
        if base is None or now.time <= base.time:
            return 0.0, 0.0
        dt = now.time - base.time
        return (
            (now.total.get_bytes - base.total.get_bytes) / dt,
            (now.total.put_bytes - base.total.put_bytes) / dt,
        )


def sparkline(values: Iterator[float | None] | deque[float | None]) -> str:
    return "".join(" " if v is None else SPARK[min(7, int(v * 8))] for v in values)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:6.1%}"


def render(history: History, view: str, source: str, *, live: bool = True) -> Any:
    """The rich renderable of one frame (``live``: with the keys' hint)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = history.samples[-1]
    t = now.total
    get_bps, put_bps = history.throughput()
    head = Text.assemble(
        ("kvstore monitor ", "bold"),
        f"{source}  ·  {len(now.nodes)} node(s)",
        (_unreachable_line(now.errors), "red"),
        "\nviews: ",
        *[
            (f"[{v}] " if v == view else f"{v} ", "bold reverse" if v == view else "")
            for v in VIEWS
        ],
        "  (tab/arrows switch, q quits)" if live else "",
    )
    rates = Table(title="hit rates", expand=False)
    for col in ("", *(w for w, _, _ in WINDOWS), "total"):
        rates.add_column(col, justify="right")
    for label, kind in (("lookup (tokens found)", "lookup"), ("read (blocks served)", "read")):
        rates.add_row(
            label,
            *(_pct(history.hit_rate(sec, kind=kind)) for _, _, sec in WINDOWS),
            _pct(history.hit_rate(None, kind=kind)),
        )
    spark = Text.assemble(("lookup hit rate, recent ", "dim"), (sparkline(history.spark), "green"))
    flow = Text(
        f"get {format_size(int(get_bps))}/s   put {format_size(int(put_bps))}/s   "
        f"blocks {t.blocks}   lookups {t.lookups}   reads {t.hits} hit / {t.misses} missed   "
        f"refused {t.put_refused}   declined {t.put_declined}   "
        f"checksum failures {t.checksum_failures}"
    )
    body: list[Any] = [head, rates, spark, flow]
    if view == "overview":
        tiers = Table(title="tiers")
        cols = ("tier", "used", "capacity", "", "blocks", "hit tokens", "hit rate", "moved out")
        for col in cols:
            tiers.add_column(col, justify="left" if col in ("tier", "") else "right")
        asked = sum(_tokens(t))  # a tier's hit rate: its share of all tokens asked
        for tier in t.tiers:
            found = t.lookup_hit_tokens.get(tier.name, 0)
            frac = tier.used_bytes / tier.capacity_bytes if tier.capacity_bytes else 0.0
            bar = "█" * round(frac * 10) + "░" * (10 - round(frac * 10))
            tiers.add_row(
                tier.name,
                format_size(tier.used_bytes),
                format_size(tier.capacity_bytes),
                f"{bar} {frac:.0%}",
                str(tier.blocks),
                str(found),
                _pct(found / asked if asked else None),
                str(tier.evictions),
            )
        body.append(tiers)
    elif view == "prefix shapes":
        shapes = Table(title="by prompt length asked (tokens), and hit rate per tier")
        seen = [n for n in LOOKUP_TIERS if any(x.name == n for x in t.tiers)]
        for col in ("prefix", "lookups", "hit tokens", "missed tokens", "hit rate", *seen):
            shapes.add_column(col, justify="right")
        for name, _ in SHAPES:
            row = t.shapes.get(name, {})
            hit, miss = row.get("hit_tokens", 0), row.get("miss_tokens", 0)
            asked = hit + miss  # a tier's hit rate: its share of the tokens asked
            shapes.add_row(
                name,
                str(row.get("lookups", 0)),
                str(hit),
                str(miss),
                _pct(_rate(hit, miss)),
                *(_pct(row.get(f"{n}_hit_tokens", 0) / asked if asked else None) for n in seen),
            )
        body.append(shapes)
    elif view == "namespaces":
        spaces = Table(title="top namespaces (by lookups)")
        for col in ("namespace", "lookups", "hit rate", "blocks", "bytes"):
            spaces.add_column(col, justify="left" if col == "namespace" else "right")
        top = sorted(t.namespaces, key=lambda n: (n.lookups, n.blocks), reverse=True)[:10]
        for n in top:
            spaces.add_row(
                n.name,
                str(n.lookups),
                _pct(_rate(n.hit_tokens, n.miss_tokens)),
                str(n.blocks),
                format_size(n.bytes),
            )
        body.append(spaces)
    else:
        nodes = Table(title="nodes")
        for col in ("node", "lookup hit", "read hit", "blocks", "used", "calls", "errors"):
            nodes.add_column(col, justify="left" if col == "node" else "right")
        for name, snap in sorted(now.nodes.items()):
            s = StoreStats.from_dict(snap["store"])
            svc = snap["service"]
            nodes.add_row(
                name,
                _pct(_rate(*_tokens(s))),
                _pct(_rate(s.hits, s.misses)),
                str(s.blocks),
                format_size(sum(x.used_bytes for x in s.tiers)),
                str(sum(svc["calls"].values())),
                str(sum(svc["errors"].values())),
            )
        for name, why in sorted(now.errors.items()):
            nodes.add_row(name, "unreachable", "", "", "", "", why[:40], style="red")
        nodes.add_row(
            "total",
            _pct(_rate(*_tokens(t))),
            _pct(_rate(t.hits, t.misses)),
            str(t.blocks),
            format_size(sum(x.used_bytes for x in t.tiers)),
            "",
            "",
            style="bold",
        )
        body.append(nodes)
    return Group(*body)


@contextlib.contextmanager
def _keys() -> Iterator[Any]:
    """Single keypresses from a terminal stdin (None where stdin is no terminal)."""
    if not sys.stdin.isatty():
        yield None
        return
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def _read_key(fd: int | None, timeout: float) -> str:
    if fd is None:
        time.sleep(timeout)
        return ""
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 16).decode(errors="replace") if ready else ""


def run(
    url: str,
    *,
    token: str | None,
    timeout: float,
    interval: float = 1.0,
    once: bool = False,
    as_json: bool = False,
    count: int = 0,
    view: str = VIEWS[0],
) -> int:
    """Poll ``url`` each ``interval`` s and show it live (``once``: one frame;
    ``as_json``: JSON lines, ``count`` of them, 0 for ever)."""
    source = Source(url, token=token, timeout=timeout)
    history = History()
    try:
        if as_json:
            n = 0
            while True:
                history.add(source.poll())
                snap = history.samples[-1].as_dict()
                for kind in ("lookup", "read"):
                    snap[f"{kind}_hit_rate"] = {
                        **{key: history.hit_rate(sec, kind=kind) for _, key, sec in WINDOWS},
                        "total": history.hit_rate(None, kind=kind),
                    }
                print(json.dumps(snap), flush=True)
                n += 1
                if once or (count and n >= count):
                    return _unreachable(history.samples[-1])
                time.sleep(interval)
        from rich.console import Console
        from rich.live import Live

        console = Console()
        history.add(source.poll())
        if once:
            console.print(render(history, view, url, live=False))
            return _unreachable(history.samples[-1])
        current = VIEWS.index(view)
        with (
            _keys() as fd,
            Live(render(history, view, url), console=console, auto_refresh=False) as live,
        ):
            next_poll = time.monotonic() + interval
            while True:
                key = _read_key(fd, max(0.0, min(0.1, next_poll - time.monotonic())))
                if key in ("q", "Q", "\x03"):
                    return 0
                if key in ("\t", "\x1b[C", "\x1b[B"):
                    current = (current + 1) % len(VIEWS)
                elif key in ("\x1b[Z", "\x1b[D", "\x1b[A"):
                    current = (current - 1) % len(VIEWS)
                if time.monotonic() >= next_poll:
                    history.add(source.poll())
                    next_poll = time.monotonic() + interval
                elif not key:
                    continue
                live.update(render(history, VIEWS[current], url), refresh=True)
    finally:
        source.close()
