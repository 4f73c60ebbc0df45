import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def test_readme_examples_run() -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2  # the store, the transfer engine
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})  # their asserts check the round trips


def test_bench_local_runs_and_reports_ratios(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.local",
            "--batch",
            "4",
            "--rounds",
            "1",
            "--json",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    names = [row["name"] for row in rows]
    assert any("DRAM get_into" in n for n in names) and any("SSD get_into" in n for n in names)
    assert all(row["value"] > 0 and row["baseline"] > 0 for row in rows)


def _bench_rows(*args: str) -> list[dict[str, Any]]:
    r = subprocess.run(
        [sys.executable, "-m", *args, "--quick", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, Any]] = json.loads(r.stdout)["rows"]
    return rows


def test_bench_transfer_runs_every_available_backend() -> None:
    rows = _bench_rows("bench.transfer")
    backends = {row["name"].split()[0] for row in rows}
    assert {"local", "shm", "tcp"} <= backends
    assert all(row["value"] > 0 and row["baseline"] > 0 for row in rows)


def test_bench_remote_runs_a_node_per_backend() -> None:
    rows = _bench_rows("bench.remote", "--backends", "tcp,shm")
    names = [row["name"] for row in rows]
    assert any("tcp remote get" in n for n in names) and any("shm Lookup" in n for n in names)
    side = [row for row in rows if row["name"].endswith("interleaved")]
    ops = [r["name"].split()[:2] for r in side]
    assert ops == [["shm", "put"], ["shm", "get"], ["shm", "get"], ["shm", "Lookup"]]
    assert all(r["baseline_name"] == "tcp, interleaved" for r in side)
    assert all(row["value"] > 0 and row["baseline"] > 0 for row in rows)


def test_bench_cluster_runs_one_to_three_nodes() -> None:
    rows = _bench_rows("bench.cluster")
    names = [row["name"] for row in rows]
    assert sum("node(s)" in n for n in names) == 3
    for kind in ("(redis)", "(redis-cluster)"):  # one Redis, and a 3-shard Redis Cluster
        assert sum(n.startswith(f"directory lookup {kind}") for n in names) == 4
    assert any(n.startswith("Redis memory per entry") for n in names)
    assert any(n.startswith("Sentinel failover") for n in names)
    assert all(row["value"] > 0 and row["baseline"] > 0 for row in rows)


def test_bench_native_compares_with_copyto_and_the_reference() -> None:
    rows = _bench_rows("bench.native")
    baselines = {row["baseline_name"] for row in rows}
    assert {"np.copyto same bytes", "torch reference gather"} <= baselines
    assert all(row["value"] > 0 and row["baseline"] > 0 for row in rows)


def test_bench_metrics_runs_nodes_with_metrics_on_and_off() -> None:
    rows = _bench_rows("bench.metrics")
    assert {row["baseline_name"] for row in rows} == {"metrics off"}
    assert any("node get" in row["name"] for row in rows)
    assert all(row["value"] > 0 and row["baseline"] > 0 for row in rows)
