"""An operator's first hour (issue 24): the real ``kvstore`` entry point,
run as a subprocess, as an operator would run it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from client import Client
from kvstore.keys import Namespace
from kvstore.version import VERSION
from tests.conftest import LAYOUT, random_kv, random_tokens
from tests.node import running_node

KVSTORE = [sys.executable, "-m", "kvstore"]


def _imported(*args: str) -> set[str]:
    """Every module ``kvstore ARGS`` imports (``python -X importtime``)."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kvstore", *args], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if "|" in line}


def test_help_and_client_commands_never_import_torch() -> None:
    """torch costs ~2 s to import; ``--help`` and ``stat`` need none of it."""
    assert "torch" not in _imported("--help")
    assert "torch" not in _imported("serve", "--help")
    with running_node(None) as node:
        mods = _imported("stat", "--url", node.url)
        assert "torch" not in mods and "kvstore.rpc" in mods


def _kvstore(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    return subprocess.run([*KVSTORE, *args], capture_output=True, text=True, env=full, timeout=120)


def _refused(r: subprocess.CompletedProcess[str], says: str) -> None:
    """Exit 2, one line saying what to do, no traceback."""
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("kvstore: error: ")]
    assert len(errors) == 1 and says in errors[0], r.stderr
    assert "Traceback" not in r.stderr


SMALL = ("--port", "0", "--dram-capacity", "8MiB", "--ssd-path", "none")


def test_start_up_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        _refused(_kvstore("serve", *SMALL, "--port", port), "pick another with --port")
        _refused(_kvstore("serve", *SMALL, "--metrics-port", port), "pick another --metrics-port")
    _refused(_kvstore("serve", *SMALL, "--dram-capacity", "256"), "smaller than one page")
    _refused(_kvstore("serve", *SMALL, "--dram-capacity", "64TiB"), "lower dram.capacity")
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    _refused(_kvstore("serve", *SMALL, "--ssd-path", str(a_file)), "needs a directory")
    yaml = tmp_path / "kvstore.yaml"
    yaml.write_text("dram:\n  capacity: 8GiB\n")
    _refused(_kvstore("serve", *SMALL, "--config", str(yaml)), "is not TOML")
    # named by KVSTORE_CONFIG instead of --config: the same file is read
    _refused(_kvstore("serve", *SMALL, env={"KVSTORE_CONFIG": str(yaml)}), "is not TOML")
    # a typo'd variable is refused like a typo'd TOML key
    typo = {"KVSTORE_DRAM_CAPACTY": "1GiB"}
    _refused(_kvstore("serve", *SMALL, env=typo), "did you mean KVSTORE_DRAM_CAPACITY?")
    # the traceback is there for who asks for it
    r = _kvstore("serve", *SMALL, "--dram-capacity", "64TiB", "--log-level", "debug")
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_version_and_log_flags_after_the_command() -> None:
    r = _kvstore("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"kvstore {VERSION}"
    for args in (["-v", "stat"], ["stat", "-v"], ["stat", "--log-level", "debug"]):
        r = _kvstore(*args, "--url", "kvstore://127.0.0.1:1", "--timeout", "0.5")
        assert r.returncode == 2 and "cannot reach kvstore://127.0.0.1:1" in r.stderr
        assert "DEBUG" in r.stderr, args  # debug logging is on, wherever the flag stood
    r = _kvstore("stat", "--url", "kvstore://127.0.0.1:1", "--timeout", "0.5")
    _refused(r, "cannot reach kvstore://127.0.0.1:1")
    assert "DEBUG" not in r.stderr


def test_one_token_variable_for_nodes_and_clients() -> None:
    """``KVSTORE_TOKEN`` secures ``kvstore serve`` as it authenticates every
    client command; ``KVSTORE_SERVER_TOKEN`` still works, with a warning."""
    env = {"KVSTORE_TOKEN": "s3cret"}
    with running_node(None, env=env) as node:
        r = _kvstore("stat", "--url", node.url, env=env)
        assert r.returncode == 0
        assert f"data port {node.summary['data_port']}" in r.stdout  # where to open a firewall
        _refused(_kvstore("stat", "--url", node.url, env={"KVSTORE_TOKEN": ""}), "token")
    with running_node(None, env={"KVSTORE_SERVER_TOKEN": "old"}) as node:
        assert _kvstore("stat", "--url", node.url, env={"KVSTORE_TOKEN": "old"}).returncode == 0
        _refused(_kvstore("stat", "--url", node.url, env={"KVSTORE_TOKEN": ""}), "token")


def test_serve_says_what_it_does_before_the_pool_is_faulted_in() -> None:
    proc = subprocess.Popen(
        [*KVSTORE, "serve", *SMALL], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("kvstore: starting on 127.0.0.1:0 (faulting in the 8.0 MiB")
        assert "serving kvstore://" in "".join(proc.stdout.readline() for _ in range(2))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_once_against_a_dead_node_fails_and_says_why() -> None:
    dead = "kvstore://127.0.0.1:1"
    for extra in ([], ["--json"]):
        r = _kvstore("monitor", dead, "--once", "--timeout", "0.5", *extra)
        assert r.returncode == 1, r.stderr
        assert f"kvstore: error: {dead} unreachable: " in r.stderr and "Traceback" not in r.stderr
        assert "tab/arrows" not in r.stdout  # no keys to press in a one-shot frame
        if not extra:  # the screen says why, not just how many
            assert f"{dead} unreachable: UNAVAILABLE" in r.stdout
    # --url as every other command takes it, and a view name without a space
    r = _kvstore("monitor", "--url", dead, "--once", "--view", "prefix-shapes", "--timeout", "0.5")
    assert r.returncode == 1 and "by prompt length asked" in r.stdout, r.stderr
    snap = json.loads(_kvstore("monitor", dead, "--once", "--json", "--timeout", "0.5").stdout)
    assert set(snap["unreachable"]) == {dead}
    assert set(snap["lookup_hit_rate"]) == {"now", "1m", "10m", "total"}


def test_stat_names_both_hit_rates() -> None:
    with running_node(None) as node:
        r = _kvstore("stat", "--url", node.url)
        assert r.returncode == 0, r.stderr
        assert "lookup hit rate" in r.stdout and "read hit rate" in r.stdout
        assert "moved out for room" in r.stdout and "demoted to SSD" in r.stdout
        stats = json.loads(_kvstore("stat", "--url", node.url, "--json").stdout)
        assert {"lookup_hit_rate", "read_hit_rate"} <= set(stats["store"])
        assert "hit_rate" not in stats["store"]


def test_get_put_and_locate_take_a_namespace_by_name_or_id(tmp_path: Path) -> None:
    ns = Namespace("tiny-llama", LAYOUT)
    with running_node(None) as node, Client.connect(node.url, namespace=ns) as c:
        tokens = random_tokens(32, seed=3)
        assert c.put(tokens, random_kv(32, seed=4)) == 32
        key = c.keys(tokens)[0].hex()
        (listed,) = json.loads(_kvstore("ls", "--url", node.url, "--json").stdout)
        assert (listed["name"], listed["id"]) == ("default/tiny-llama", ns.root.hex())
        got = {}
        for given in ("tiny-llama", "default/tiny-llama", ns.root.hex()):
            out = tmp_path / f"{len(got)}.bin"
            r = _kvstore("get", "--url", node.url, given, key, "-o", str(out))
            assert r.returncode == 0, r.stderr
            got[given] = out.read_bytes()
        assert len(set(got.values())) == 1 and len(got["tiny-llama"]) == LAYOUT.block_nbytes
        # a new block put by name reads back by id
        other = (b"\x07" * 16).hex()
        (tmp_path / "payload").write_bytes(b"\x01" * LAYOUT.block_nbytes)
        r = _kvstore("put", "--url", node.url, "tiny-llama", other, str(tmp_path / "payload"))
        assert r.returncode == 0 and "stored" in r.stdout, r.stderr
        r = _kvstore("get", "--url", node.url, ns.root.hex(), other, "-o", str(tmp_path / "back"))
        assert (
            r.returncode == 0 and (tmp_path / "back").read_bytes() == b"\x01" * LAYOUT.block_nbytes
        )
        ids = " ".join(str(int(t)) for t in tokens)
        r = _kvstore("locate", "--url", node.url, "tiny-llama", "--tokens", ids, "--json")
        assert json.loads(r.stdout)["holders"][0]["tokens"] == 32
        _refused(_kvstore("get", "--url", node.url, "no-such-model", key), "no namespace")
        # an unknown flag shows the command's usage, not the top-level one
        r = _kvstore("get", "--url", node.url, "tiny-llama", key, "--bogus")
        assert r.returncode == 2 and "usage: kvstore get" in r.stderr


def test_nodes_reads_its_directory_from_the_environment() -> None:
    """With $KVSTORE_CLUSTER_REDIS set, --redis is optional (and shown so)."""
    env = {"KVSTORE_CLUSTER_REDIS": "redis://127.0.0.1:1/0"}
    r = _kvstore("nodes", "--help", env=env)
    assert r.returncode == 0 and "[--redis" in r.stdout
    _refused(_kvstore("nodes", env=env), "unreachable")
    r = _kvstore("nodes", env={"KVSTORE_CLUSTER_REDIS": ""})
    assert r.returncode == 2


def test_every_option_with_a_default_says_it() -> None:
    import argparse

    from kvstore.tools.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    silent = [
        f"{name} {'/'.join(a.option_strings) or a.dest}"
        for name, command in sub.choices.items()
        for a in command._actions
        if a.help not in (None, argparse.SUPPRESS)
        and a.default not in (None, False, argparse.SUPPRESS)
        and "default" not in a.help
    ]
    assert silent == []
