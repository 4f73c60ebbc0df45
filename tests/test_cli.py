import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from kvstore.store import TieredStore
from tests.conftest import block_payload, key, make_config

KVSTORE = [sys.executable, "-m", "kvstore"]


def test_serve_recovers_the_ssd_tier_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    with TieredStore(make_config(tmp_path / "ssd", dram=1 << 20)) as store:
        store.put([key(i) for i in range(100)], [block_payload(i) for i in range(100)])
        store.wait_idle()
        assert 0 < store.stats().tier("ssd").blocks < 100  # the rest only in DRAM...
    # ...until close flushed them (ssd.flush_on_close), so a restart finds all
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [
            *KVSTORE,
            "serve",
            "--json",
            "--port",
            "0",
            "--dram-capacity",
            "16MiB",
            "--ssd-path",
            str(tmp_path / "ssd"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    summary = json.loads(proc.stdout.readline())
    assert summary["recovered_blocks"] == 100
    assert summary["dram_capacity"] == 16 << 20
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "closing" in out


def test_serve_defaults_to_the_user_cache_dir(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "KVSTORE_DRAM_CAPACITY": "8MiB"}
    proc = subprocess.Popen(
        [*KVSTORE, "serve", "--json", "--port", "0"], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    summary = json.loads(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=20)
    assert summary["ssd_path"] == str(tmp_path / "cache" / "kvstore" / "ssd")
    assert summary["dram_capacity"] == 8 << 20
    assert proc.returncode == 0


def test_bad_flags_get_a_clear_error() -> None:
    r = subprocess.run(
        [*KVSTORE, "serve", "--dram-capacity", "lots"], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "cannot read 'lots' as a size" in r.stderr
    r = subprocess.run([*KVSTORE, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "serve" in r.stdout and "KVSTORE_" in r.stdout
