"""The SSD tier's file system fills up under a node (a 4 MiB tmpfs): puts
fail cleanly with RESOURCE_EXHAUSTED or their victims are dropped, reads go
on returning exact bytes, and the node recovers when space comes back.

Needs root for the tmpfs mount (CI runs as root); skipped elsewhere."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from client import Client
from kvstore.errors import StoreFullError
from tests.fault.blocks import NS, block_keys_of, nbytes, payload_of
from tests.node import running_node, start_node


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_refuses_or_drops_and_never_serves_wrong_bytes(small_disk: Path) -> None:
    flags = ("--dram-capacity", "2MiB", "--ssd-capacity", "64MiB")  # the disk is smaller than that
    with (
        running_node(small_disk / "ssd", *flags) as node,
        Client.connect(node.url, namespace=NS) as c,
    ):
        acked: list[int] = []
        refused = 0
        for lo in range(0, 64 * 4, 4):  # 64 MiB of puts into 2 MiB of DRAM + 4 MiB of disk
            ids = range(lo, lo + 4)
            try:
                c.put_blocks(block_keys_of(ids), [payload_of(i) for i in ids])
                acked += ids
            except StoreFullError:
                refused += 1
        stats = c.stats()
        assert refused or stats.demotion_failures or stats.dropped, "the disk never filled"
        # whatever is still there reads back exactly
        outs = [torch.empty(nbytes(), dtype=torch.uint8) for _ in acked]
        found = c.get_blocks(block_keys_of(acked), outs)
        for i, out, ok in zip(acked, outs, found, strict=True):
            if ok:
                assert torch.equal(out, payload_of(i))
        assert any(found)
        # room comes back when blocks go: new puts are taken again
        assert c.delete(block_keys_of(range(64 * 4))) >= sum(found)
        fresh = range(10_000, 10_004)
        c.put_blocks(block_keys_of(fresh), [payload_of(i) for i in fresh])
        back = [torch.empty(nbytes(), dtype=torch.uint8) for _ in fresh]
        assert c.get_blocks(block_keys_of(fresh), back) == [True] * 4
        assert all(torch.equal(b, payload_of(i)) for b, i in zip(back, fresh, strict=True))
        # 4 MiB more needs the disk again: its dead segments are deleted to make room
        more = range(20_000, 20_016)
        for lo in range(0, 16, 4):
            ids = more[lo : lo + 4]
            c.put_blocks(block_keys_of(ids), [payload_of(i) for i in ids])
        assert c.stats().ssd_reclaimed_bytes > 0


def test_deletes_on_a_full_disk_free_room_and_outlast_a_sigkill(small_disk: Path) -> None:
    """Fill the disk, delete every key in one call, SIGKILL the node: the
    delete succeeds (its tombstones come from the reserve), gives the disk
    back at once, and no deleted key is there after the restart. Before, the
    Delete raised DiskFullError after one key and the keys came back."""
    ssd = small_disk / "ssd"
    flags = ("--dram-capacity", "2MiB", "--ssd-capacity", "64MiB")
    ids = range(64)
    node = start_node(ssd, *flags)
    try:
        with Client.connect(node.url, namespace=NS) as c:
            for lo in range(0, len(ids), 4):
                batch = ids[lo : lo + 4]
                with contextlib.suppress(StoreFullError):
                    c.put_blocks(block_keys_of(batch), [payload_of(i) for i in batch])
            assert shutil.disk_usage(small_disk).free < nbytes()  # the disk is full
            present = sum(c.exists(block_keys_of(ids)))
            assert present > 0
            assert 0 < c.delete(block_keys_of(ids)) <= present  # the demoter may drop some first
            assert c.exists(block_keys_of(ids)) == [False] * len(ids)
            assert shutil.disk_usage(small_disk).free >= 2 * nbytes()  # dead segments went
    finally:
        node.proc.send_signal(signal.SIGKILL)
        node.proc.communicate()
    with running_node(ssd, *flags) as node, Client.connect(node.url, namespace=NS) as c:
        assert c.exists(block_keys_of(ids)) == [False] * len(ids)
        assert c.stats().blocks == 0
        fresh = range(100, 104)
        c.put_blocks(block_keys_of(fresh), [payload_of(i) for i in fresh])
        outs = [torch.empty(nbytes(), dtype=torch.uint8) for _ in fresh]
        assert c.get_blocks(block_keys_of(fresh), outs) == [True] * 4
