"""Processes dying at the worst moment: a node killed during puts, readers
killed mid-transfer. Nothing acknowledged on SSD is lost, nothing torn or
wrong is ever served, and a dead reader leaves no pinned memory behind.

``KVSTORE_FAULT_REPEATS`` sets how many readers are killed (CI: a few; the
issue's 1,000 on demand)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from client import Client
from tests.fault.blocks import NS, block_keys_of, nbytes, payload_of
from tests.node import running_node, start_node

ROOT = Path(__file__).resolve().parents[2]
REPEATS = int(os.environ.get("KVSTORE_FAULT_REPEATS", "6"))


def _put(c: Client, ids: range) -> None:
    c.put_blocks(block_keys_of(ids), [payload_of(i) for i in ids])


def _read_back(c: Client, ids: list[int]) -> set[int]:
    """The ids found, each checked byte for byte (a wrong byte fails the test)."""
    outs = [torch.empty(nbytes(), dtype=torch.uint8) for _ in ids]
    found = c.get_blocks(block_keys_of(ids), outs)
    for i, out, ok in zip(ids, outs, found, strict=True):
        if ok:
            assert torch.equal(out, payload_of(i)), f"block {i} came back wrong"
    return {i for i, ok in zip(ids, found, strict=True) if ok}


def test_sigkill_during_puts_keeps_every_block_on_ssd(tmp_path: Path) -> None:
    ssd = tmp_path / "ssd"
    node = start_node(ssd, "--dram-capacity", "8MiB")  # 32 blocks: the rest goes down to SSD
    acked: list[int] = []
    with Client.connect(node.url, namespace=NS) as c:
        for lo in range(0, 160, 16):
            _put(c, range(lo, lo + 16))
            acked += range(lo, lo + 16)
        tiers = c.store.locate(block_keys_of(acked), ns_tag=NS.tag)  # type: ignore[attr-defined]
        on_ssd = {i for i, t in zip(acked, tiers, strict=False) if t == "ssd"}
        assert len(on_ssd) >= 100  # most of them were demoted

        stop = threading.Event()

        def writer() -> None:  # keeps putting until the node dies under it
            lo = 1000
            while not stop.is_set():
                try:
                    _put(c, range(lo, lo + 8))
                except Exception:
                    return
                acked.extend(range(lo, lo + 8))
                lo += 8

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(1.0)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(30)
        stop.set()
        t.join(30)
    assert len(acked) > 160  # the writer got some in before the kill

    node = start_node(ssd, "--dram-capacity", "8MiB")
    try:
        with Client.connect(node.url, namespace=NS) as c:
            found = _read_back(c, acked)
            assert on_ssd <= found, f"lost from SSD: {sorted(on_ssd - found)[:10]}"
            assert c.stats().checksum_failures <= 1  # at most the record cut by the kill
    finally:
        rc, err = node.stop()
        assert rc == 0, err


def _dram_used(c: Client) -> int:
    return next(t.used_bytes for t in c.stats().tiers if t.name == "dram")


def test_readers_killed_mid_get_leave_no_pinned_memory() -> None:
    n = 32  # 8 MiB per get
    rng = random.Random(7)
    with running_node(None) as node, Client.connect(node.url, namespace=NS) as c:
        _put(c, range(n))
        used = _dram_used(c)
        for _ in range(REPEATS):
            reader = subprocess.Popen(
                [sys.executable, "-m", "tests.fault.reader", node.url, str(n)],
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            assert reader.stdout is not None
            assert reader.stdout.readline().strip() == "reading"
            time.sleep(rng.uniform(0, 0.05))  # somewhere inside a later get
            reader.kill()
            reader.wait(30)
        # the node serves on, with the same bytes...
        assert _read_back(c, list(range(n))) == set(range(n))
        # ...and no lease survived its reader: every block can go, and its memory with it
        assert c.delete(block_keys_of(range(n))) == n
        deadline = time.monotonic() + 10
        while _dram_used(c) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert used > 0 and _dram_used(c) == 0


def _errors(c: Client) -> int:
    return sum(c.store.stats_json()["service"]["errors"].values())  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["engine", "data port"])
def test_a_stalled_reader_times_out_and_holds_up_no_one(path: str) -> None:
    env = {"KVSTORE_TRANSFER_TIMEOUT": "2"}
    if path == "engine":  # 8 MiB a get, pushed into the reader's engine
        n, flags = 32, ("--data-port", "-1")
    else:  # 40 MiB a get on the data port: more than the sockets' buffers hold
        n, flags = 160, ()
        env["KVSTORE_SERVER_STREAM_MAX"] = "64MiB"
    with (
        running_node(None, *flags, env=env) as node,
        Client.connect(node.url, namespace=NS) as c,
    ):
        _put(c, range(n))
        reader = subprocess.Popen(
            [sys.executable, "-m", "tests.fault.reader", node.url, str(n)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            assert reader.stdout is not None
            assert reader.stdout.readline().strip() == "reading"
            before = _errors(c)
            for _ in range(20):  # stop it until a stop lands inside a get the node is pushing
                reader.send_signal(signal.SIGSTOP)  # a peer that stops reading mid-stream
                slowest = 0.0
                t_end = time.monotonic() + 3.0  # past the 2 s transfer timeout
                while time.monotonic() < t_end:  # meanwhile others are served as usual
                    t0 = time.monotonic()
                    assert _read_back(c, list(range(n))) == set(range(n))
                    slowest = max(slowest, time.monotonic() - t0)
                assert slowest < 1.5, f"a get waited {slowest:.2f} s behind the stalled reader"
                if _errors(c) > before:
                    break  # the stalled push timed out
                reader.send_signal(signal.SIGCONT)
                time.sleep(0.02)
            assert _errors(c) > before, "no stop ever caught a push in flight"
        finally:
            reader.kill()
            reader.wait(30)
        assert c.delete(block_keys_of(range(n))) == n
        deadline = time.monotonic() + 10
        while _dram_used(c) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _dram_used(c) == 0  # the timed-out get released its pins
