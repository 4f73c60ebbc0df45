"""``kvstore bench compare`` at a tiny size: every installed peer runs the
same workloads, every byte read back is checked, and a peer that cannot start
is named with the reason instead of failing the run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.compare import Workload, run_workload
from bench.peers.kvstore_peer import KVStorePeer

ROOT = Path(__file__).resolve().parents[1]


def _compare(*flags: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "kvstore", "bench", "compare", "--quick", "--json", *flags],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_every_installed_system_runs_every_workload() -> None:
    result = _compare()
    by_system: dict[str, set[str]] = {}
    for r in result["results"]:
        by_system.setdefault(r["system"], set()).add(r["workload"])
        assert r["get_ops"] > 0
    want = {"kvstore embedded", "kvstore shm", "kvstore tcp", "redis"}
    if importlib.util.find_spec("mooncake") is not None:
        want.add("mooncake tcp")  # CI installs the peers extra
    else:
        assert "mooncake is not importable" in result["skipped"]["mooncake tcp"]
    assert want <= set(by_system)
    workloads = {w["name"] for w in result["workloads"]}
    for system, seen in by_system.items():
        assert workloads <= seen, system
        assert any(w.startswith("lookup") for w in seen), system
    peers = {r["peer"] for r in result["ratios"]}
    assert peers == {s for s in by_system if not s.startswith("kvstore")}
    for row in result["ratios"]:
        assert all(v > 0 for k, v in row.items() if k in ("put", "get", "lookup"))


def test_a_peer_that_cannot_start_is_reported_not_fatal(tmp_path: Path) -> None:
    fake = tmp_path / "mooncake"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('libibverbs.so.1: cannot open')\n")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    result = _compare("--systems", "mooncake,redis", env={"PYTHONPATH": path})
    assert "libibverbs" in result["skipped"]["mooncake tcp"]
    assert "pip install" in result["skipped"]["mooncake tcp"]
    assert {r["system"] for r in result["results"]} == {"redis"}


class _FlipsOneByte(KVStorePeer):
    """The real embedded store, with one byte of every get flipped on the way out."""

    def get(self, keys: list[bytes], dst: torch.Tensor, size: int) -> None:
        super().get(keys, dst, size)
        dst[size + 3] ^= 1


def test_the_harness_stops_on_a_wrong_byte() -> None:
    peer = _FlipsOneByte(None, "64MiB")
    data = torch.randint(0, 256, (4 * 4096,), dtype=torch.uint8)
    try:
        with pytest.raises(AssertionError, match="wrong byte at offset 4099"):
            run_workload(peer, Workload("w", 4096, 4, 1), data)
    finally:
        peer.close()
