"""Resource exhaustion from outside, against a real node: idle and excess
connections on the transfer port, peers that stall every data call, calls
that ask for more memory than the node may spend, and a damaged or hostile
data dir. None of them may take the node down or make it serve wrong bytes."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from client import Client, KVLayout, Namespace
from kvstore.errors import InvalidArgumentError, NodeBusyError, ReplyTooLargeError
from kvstore.proto import kvstore_pb2 as pb
from kvstore.wire import pack_keys
from tests.node import NodeProcess, running_node, start_node

LAYOUT = KVLayout(num_layers=1, num_kv_heads=4, head_dim=64, block_size=16, dtype="uint8")  # 8 KiB
NS = Namespace("res", LAYOUT)
N = LAYOUT.block_nbytes


def _block(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (N,), dtype=torch.uint8, generator=g)


def _round_trip(node: NodeProcess, seed: int) -> None:
    """A put and a get over the transfer engine, byte-exact."""
    with Client.connect(node.url, namespace=NS) as c:
        keys = c.keys(list(range(seed * 1000, seed * 1000 + 16 * 160)))  # 160 blocks: 1.25 MiB
        blocks = [_block(seed * 1000 + i) for i in range(len(keys))]
        assert c.put_blocks(keys, blocks) == [True] * len(keys)
        outs = [torch.zeros(N, dtype=torch.uint8) for _ in keys]
        assert c.get_blocks(keys, outs) == [True] * len(keys)
        assert all(torch.equal(o, b) for o, b in zip(outs, blocks, strict=True))


def _health_seconds(node: NodeProcess) -> float:
    with Client.connect(node.url, namespace=NS, transfer="none") as c:
        t0 = time.monotonic()
        c.store.health()  # type: ignore[attr-defined]
        return time.monotonic() - t0


def _transfer_addr(node: NodeProcess) -> tuple[str, int]:
    host, port = str(node.summary["transfer"]).removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def test_idle_connections_cannot_exhaust_the_transfer_port() -> None:
    """Far more idle connections than the node has descriptors for (prlimit
    200): gRPC keeps answering, and once they close the port serves again."""
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux)")
    node = start_node(None, prefix=["prlimit", "--nofile=200:200"])
    socks: list[socket.socket] = []
    try:
        addr = _transfer_addr(node)
        failures = 0
        while len(socks) < 400 and failures < 5:  # a full backlog stops taking more
            try:
                socks.append(socket.create_connection(addr, timeout=0.3))
            except OSError:
                failures += 1
        assert len(socks) > 200  # more than the node has descriptors
        assert _health_seconds(node) < 5
        for s in socks:
            s.close()
        socks.clear()
        time.sleep(0.5)
        _round_trip(node, seed=1)  # the accept loop survived EMFILE
    finally:
        for s in socks:
            s.close()
        rc, err = node.stop()
        assert rc == 0, err


def test_a_silent_connection_is_dropped_after_the_idle_timeout() -> None:
    env = {"KVSTORE_TRANSFER_IDLE_TIMEOUT": "1"}
    with running_node(None, env=env) as node:
        with socket.create_connection(_transfer_addr(node), timeout=10) as s:
            t0 = time.monotonic()
            assert s.recv(1) == b""  # the node closed it
            assert time.monotonic() - t0 < 8
        _round_trip(node, seed=2)  # pooled connections retire before that, calls still work


def test_stalled_destinations_cannot_starve_control_calls() -> None:
    """20 gets whose destination accepts and never answers: data calls past
    the node's slots are refused as busy, and Health answers at once."""
    hole = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def swallow() -> None:
        hole.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(hole.accept()[0])

    threading.Thread(target=swallow, daemon=True).start()
    env = {"KVSTORE_TRANSFER_TIMEOUT": "6"}
    with running_node(None, env=env) as node:
        with Client.connect(node.url, namespace=NS) as c:
            keys = c.keys(list(range(16)))
            assert c.put_blocks(keys, [_block(3)]) == [True]
            nsid = c.store._nsid(NS.tag)  # type: ignore[attr-defined]
        port = hole.getsockname()[1]
        region = pb.Region(endpoint=f"tcp://127.0.0.1:{port}", region_id=1, nbytes=N, key="ab" * 16)
        req = pb.GetRequest(
            namespace_id=nsid,
            keys=pack_keys(keys),
            sizes=[N],
            dest=pb.BlockRefs(regions=[region], region_index=[0], offsets=[0]),
        )
        outcomes: list[str] = []

        def stalled_get() -> None:
            with Client.connect(node.url, namespace=NS, transfer="none") as c:
                try:
                    c.store.call("Get", req)  # type: ignore[attr-defined]
                    outcomes.append("ok")
                except NodeBusyError:
                    outcomes.append("busy")
                except Exception as e:
                    outcomes.append(type(e).__name__)

        threads = [threading.Thread(target=stalled_get) for _ in range(20)]
        for t in threads:
            t.start()
        time.sleep(1.5)  # every slot is stalled on the hole by now
        assert _health_seconds(node) < 2
        for t in threads:
            t.join(60)
        assert "busy" in outcomes, outcomes  # 20 > the 12 data slots of 16 workers
        assert "ok" not in outcomes, outcomes
        stop.set()
        _round_trip(node, seed=4)
    for s in held:
        s.close()
    hole.close()


def _rss(node: NodeProcess) -> int:
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def test_a_get_is_refused_before_it_reads_more_than_the_node_may_spend(tmp_path: Path) -> None:
    ssd = tmp_path / "ssd"
    with running_node(ssd) as node, Client.connect(node.url, namespace=NS) as c:
        key = c.keys(list(range(16)))
        assert c.put_blocks(key, [_block(5)]) == [True]
    # restarted: the block is on SSD only, so every read of it allocates
    with running_node(ssd) as node, Client.connect(node.url, namespace=NS) as c:
        store = c.store
        nsid = store._nsid(NS.tag)  # type: ignore[attr-defined]
        before = _rss(node)
        many = pack_keys(key * 60_000)  # 469 MiB of reads of one 8 KiB block
        inline = pb.GetRequest(namespace_id=nsid, keys=many, prefix=False, sizes=[N] * 60_000)
        with pytest.raises(ReplyTooLargeError, match="message limit"):
            store.call("Get", inline)  # type: ignore[attr-defined]
        # into regions: refused for its scratch memory, before any transfer starts
        region = pb.Region(endpoint="tcp://127.0.0.1:1", region_id=1, nbytes=N, key="ab" * 16)
        into = pb.GetRequest(
            namespace_id=nsid,
            keys=many,
            prefix=False,
            sizes=[N] * 60_000,
            dest=pb.BlockRefs(regions=[region], region_index=[0] * 60_000, offsets=[0] * 60_000),
        )
        with pytest.raises(InvalidArgumentError, match="scratch memory"):
            store.call("Get", into)  # type: ignore[attr-defined]
        assert c.stats().hits == 0, "the node read blocks for a call it then refused"
        assert _rss(node) - before < 128 << 20
        out = torch.zeros(N, dtype=torch.uint8)
        assert c.get_blocks(key, [out]) == [True] and torch.equal(out, _block(5))


def test_a_damaged_namespace_file_is_an_error_naming_it(tmp_path: Path) -> None:
    ssd = tmp_path / "ssd"
    with running_node(ssd) as node:
        Client.connect(node.url, namespace=NS).close()
    for damage in [b"", b"{not json", b'[{"model": 3}]']:
        (ssd / "namespaces.json").write_bytes(damage)
        node = start_node_failing(ssd)
        assert "namespaces.json" in node and "is damaged" in node, node
        assert "Traceback" not in node


def start_node_failing(ssd: Path) -> str:
    """What a node that refuses to start prints."""
    try:
        n = start_node(ssd)
    except RuntimeError as e:
        return str(e)
    n.stop()
    raise AssertionError("the node started")


def test_links_in_the_data_dir_are_never_followed(tmp_path: Path) -> None:
    ssd = tmp_path / "ssd"
    with running_node(ssd) as node:
        Client.connect(node.url, namespace=NS).close()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 1000)
    os.symlink(victim, ssd / "seg-00000099.log")
    os.symlink(victim, ssd / "namespaces.json.lnk")
    with running_node(ssd) as node:
        _round_trip(node, seed=6)
    assert victim.read_bytes() == b"precious" * 1000
    (ssd / "namespaces.json").unlink()
    os.symlink(victim, ssd / "namespaces.json")
    out = start_node_failing(ssd)
    assert "namespaces.json" in out and "link" in out, out
    assert victim.read_bytes() == b"precious" * 1000
