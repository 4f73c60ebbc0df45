"""Timing and the figure-beside-baseline table every benchmark prints."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


def median_seconds(
    fn: Callable[[], object], rounds: int, *, setup: Callable[[], object] | None = None
) -> float:
    """Median wall time of ``fn`` over ``rounds`` runs (after one warm-up run)."""
    times = []
    for i in range(rounds + 1):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i:
            times.append(dt)
    return statistics.median(times)


def percentiles_ms(fn: Callable[[], object], samples: int) -> tuple[float, float]:
    """(p50, p99) of ``fn``'s wall time in ms over ``samples`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return p50_p99_ms(times)


def p50_p99_ms(times: Sequence[float]) -> tuple[float, float]:
    """(p50, p99) in ms of wall times given in seconds."""
    p50, p99 = np.percentile(times, [50, 99])
    return float(p50) * 1e3, float(p99) * 1e3


def bench_parser(
    name: str,
    doc: str | None,
    *,
    rounds: str,
    rounds_default: int | None = None,
    quick: str = "small sizes (smoke test)",
) -> argparse.ArgumentParser:
    """A benchmark's parser with the flags every one takes: --quick, --rounds
    (``rounds`` says what a round is) and --json; add the benchmark's own."""
    p = argparse.ArgumentParser(
        prog=f"kvstore bench {name}", description=(doc or "").split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--rounds", type=int, default=rounds_default, help=rounds)
    p.add_argument("--json", action="store_true", help="one JSON object per table instead of text")
    return p


@dataclass(frozen=True)
class Row:
    name: str
    value: float
    unit: str
    baseline_name: str
    baseline: float
    higher_is_better: bool = True
    target: float | None = None  # minimum acceptable ratio

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.value / self.baseline
        return self.baseline / self.value


def print_table(title: str, rows: list[Row], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"bench": title, "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}))
        return
    print(f"\n{title}")
    head = f"{'measure':40} {'value':>13}   {'baseline (same run)':30} {'value':>13}"
    print(f"{head}  {'ratio':>6}  target")
    for r in rows:
        target = f">= {r.target:.2f}x" if r.target is not None else ""
        ours = f"{r.value:>8.3f} {r.unit:<4}"
        base = f"{r.baseline:>8.3f} {r.unit:<4}"
        print(f"{r.name:40} {ours}   {r.baseline_name:30} {base}  {r.ratio:>5.2f}x  {target}")
