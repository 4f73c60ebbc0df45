"""The soak bench for a minute (``bench/soak.py``): several client processes
against one node with eviction and demotion running all the time; every read
is checked against what was written, and the node's memory must stay flat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NODE_OVERHEAD_MIB = 384  # docs/reliability.md: Python, torch, gRPC, index, buffers


def test_a_minute_of_mixed_load_reads_nothing_wrong_and_stays_flat() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvstore",
            "bench",
            "soak",
            "--seconds",
            "60",
            "--clients",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["wrong_reads"] == 0
    assert r["errors"] == {}, r["errors"]
    assert set(r["per_op"]) == {"put", "get", "lookup"}
    assert r["blocks_verified"] > 1000 and r["misses"] > 0  # reads hit, and eviction ran
    assert r["rss_growth_mib"] <= 64, r["rss_mib"]
    # the node stays within its pools (64 MiB of DRAM) plus the documented overhead
    assert max(mib for _, mib in r["rss_mib"]) <= 64 + NODE_OVERHEAD_MIB, r["rss_mib"]
    assert out.returncode == 0 and r["ok"]
