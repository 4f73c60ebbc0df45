"""The data port against a real ``kvstore serve``: which batches take it,
what a get answers (prefix, gaps, strided and separate destinations), and a
client that outlives the node it pooled connections to."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from bench.procs import free_port
from client import Client, KVLayout, Namespace
from kvstore.errors import KVStoreError
from kvstore.proto import kvstore_pb2 as pb
from kvstore.wire import pack_keys, region_to_pb
from tests.node import NodeProcess, running_node, start_node

LAYOUT = KVLayout(num_layers=2, num_kv_heads=4, head_dim=64, block_size=16, dtype="uint8")
N = LAYOUT.block_nbytes  # 16 KiB
NS = Namespace("dp-model", LAYOUT)


def _blocks(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, N), dtype=torch.uint8, generator=g)


def _moved(c: Client) -> dict[str, Any]:
    return dict(c.store.stats_json()["service"]["transfer_bytes"])  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    # a data-port call carries at most 256 KiB (16 blocks); an engine put is
    # pulled and hashed in parts of 64 KiB (two blocks)
    env = {"KVSTORE_SERVER_STREAM_MAX": "256KiB", "KVSTORE_SERVER_PULL_PART": "64KiB"}
    with running_node(None, "--transfer", "tcp", env=env) as n:
        yield n


def _calls(c: Client) -> dict[str, int]:
    return dict(c.store.stats_json()["service"]["calls"])  # type: ignore[attr-defined]


def test_a_tcp_node_takes_every_batch_on_its_data_port(node: NodeProcess) -> None:
    """A tcp engine is a socket too: a batch past ``stream_max`` rides the
    port in calls of that size, and the engine moves nothing."""
    with Client.connect(node.url, namespace=NS) as c:
        keys = c.keys(list(range(96 * 16)))
        small, large = _blocks(16, seed=1), _blocks(80, seed=2)  # 256 KiB, 1.25 MiB
        before, calls = _moved(c), _calls(c)
        assert c.put_blocks(keys[:16], list(small)) == [True] * 16
        out = torch.zeros_like(small)
        assert c.get_blocks(keys[:16], list(out)) == [True] * 16
        assert torch.equal(out, small)
        assert c.put_blocks(keys[16:], list(large)) == [True] * 80
        out = torch.zeros_like(large)
        assert c.get_blocks(keys[16:], list(out)) == [True] * 80
        assert torch.equal(out, large)
        after, now = _moved(c), _calls(c)
        port = {
            d: after[d].get("dataport", 0) - before.get(d, {}).get("dataport", 0) for d in after
        }
        assert port == {"in": 96 * N, "out": 96 * N}
        for d in ("in", "out"):
            assert after[d].get("tcp", 0) == before.get(d, {}).get("tcp", 0)
        assert now["Put"] - calls.get("Put", 0) == 1 + 5  # 16 blocks a call
        assert now["Get"] - calls.get("Get", 0) == 1 + 5
        # a lookup on the port sees both
        assert c.lookup(list(range(96 * 16))) == 96 * 16


def test_an_shm_node_takes_a_large_batch_on_its_engine() -> None:
    """Over shm the engine maps the node's pool: a batch past the port's
    ``stream_max`` moves there, one call, and the port carries none of it."""
    env = {"KVSTORE_SERVER_STREAM_MAX": "256KiB"}
    with (
        running_node(None, "--transfer", "shm", env=env) as n,
        Client.connect(n.url, namespace=NS) as c,
    ):
        keys = c.keys(list(range(80 * 16)))
        large = _blocks(80, seed=3)
        assert c.put_blocks(keys, list(large)) == [True] * 80
        out = torch.zeros_like(large)
        assert c.get_blocks(keys, list(out)) == [True] * 80
        assert torch.equal(out, large)
        moved, calls = _moved(c), _calls(c)
        assert moved["in"]["shm"] == moved["out"]["shm"] == 80 * N
        assert "dataport" not in moved["in"] and "dataport" not in moved["out"]
        assert calls["Put"] == calls["Get"] == 1


def test_a_refused_large_put_stops_sending_and_the_client_goes_on() -> None:
    """The node answers a refusal before it reads the payload; the client,
    looking between 1 MiB pieces, stops there instead of sending the rest
    of 64 MiB, drops that link, and its next calls work."""
    from kvstore.dataport import PutBlocks
    from kvstore.errors import NotFoundError

    with running_node(None, "--transfer", "tcp") as n, Client.connect(n.url, namespace=NS) as c:
        n_blocks = 4096  # 64 MiB in one call (stream_max 256 MiB)
        payload = np.zeros(n_blocks * N, np.uint8)
        req = pb.PutRequest(
            namespace_id=bytes(16),  # no such namespace: refused before a payload byte is read
            keys=pack_keys(c.keys(list(range(n_blocks * 16)))),
            sizes=[N] * n_blocks,
        )
        put = PutBlocks(req.sizes, lambda: [payload], checksummed=True)
        with pytest.raises(NotFoundError):
            c.store._data.call("Put", req, put=put)  # type: ignore[attr-defined]
        read_past = _moved(c)["in"].get("refused", 0)
        assert read_past < 32 << 20, f"{read_past} bytes of a refused 64 MiB put crossed"
        keys = c.keys(list(range(900 * 16, 904 * 16)))
        data = _blocks(4, seed=11)
        assert c.put_blocks(keys, list(data)) == [True] * 4
        out = torch.zeros_like(data)
        assert c.get_blocks(keys, list(out)) == [True] * 4 and torch.equal(out, data)


def test_a_get_answers_hits_gaps_and_prefixes_into_any_destination(node: NodeProcess) -> None:
    with Client.connect(node.url, namespace=NS) as c:
        keys = c.keys(list(range(100_000, 100_000 + 8 * 16)))
        data = _blocks(8, seed=3)
        have = [0, 1, 2, 4, 5, 7]  # 3 and 6 missing
        assert c.put_blocks([keys[i] for i in have], [data[i] for i in have]) == [True] * 6
        # one contiguous buffer, gaps, no prefix cut: the hits land in place
        out = torch.full_like(data, 0xA5)
        got = c.get_blocks(keys, list(out), prefix=False)
        assert got == [i in have for i in range(8)]
        for i in range(8):
            want = data[i] if i in have else torch.full((N,), 0xA5, dtype=torch.uint8)
            assert torch.equal(out[i], want), f"block {i}"
        # the prefix stops at the first miss
        out = torch.zeros_like(data)
        assert c.get_blocks(keys, list(out), prefix=True) == [True] * 3 + [False] * 5
        assert torch.equal(out[:3], data[:3]) and not out[3:].any()
        # rows apart from each other (every other row of a wider tensor), strided
        # destinations (every other byte) and separate tensors
        wide = torch.zeros(3, 2, N, dtype=torch.uint8)
        assert c.get_blocks(keys[:3], [wide[i, 1] for i in range(3)]) == [True] * 3
        assert torch.equal(wide[:, 1], data[:3]) and not wide[:, 0].any()
        interleaved = torch.zeros(3, N, 2, dtype=torch.uint8)
        strided = [interleaved[i, :, 1] for i in range(3)]
        assert not strided[0].is_contiguous()
        assert c.get_blocks(keys[:3], strided) == [True] * 3
        assert torch.equal(interleaved[:, :, 1], data[:3]) and not interleaved[:, :, 0].any()
        sep = [torch.zeros(N, dtype=torch.uint8) for _ in range(3)]
        assert c.get_blocks(keys[:3], sep) == [True] * 3
        assert all(torch.equal(s, data[i]) for i, s in enumerate(sep))
        # KV-shaped destinations of another dtype: byte for byte
        half = torch.zeros(3, N // 2, dtype=torch.float16)
        assert c.get_blocks(keys[:3], list(half)) == [True] * 3
        assert torch.equal(half.view(torch.uint8).reshape(3, N), data[:3])


def test_nothing_found_and_nothing_sent(node: NodeProcess) -> None:
    with Client.connect(node.url, namespace=NS) as c:
        keys = c.keys(list(range(900_000, 900_000 + 4 * 16)))
        out = torch.full((4, N), 7, dtype=torch.uint8)
        assert c.get_blocks(keys, list(out), prefix=False) == [False] * 4
        assert bool((out == 7).all())
        assert c.lookup(list(range(900_000, 900_000 + 64))) == 0
        assert c.exists(keys) == [False] * 4
        assert c.delete(keys) == 0


def test_a_node_without_a_data_port_serves_the_same_calls() -> None:
    with running_node(None, "--data-port", "-1") as n:
        assert n.summary["data_port"] is None
        with Client.connect(n.url, namespace=NS) as c:
            assert c.store._data is None  # type: ignore[attr-defined]
            keys = c.keys(list(range(64)))
            data = _blocks(4, seed=4)
            assert c.put_blocks(keys, list(data)) == [True] * 4
            out = torch.zeros_like(data)
            assert c.get_blocks(keys, list(out)) == [True] * 4 and torch.equal(out, data)
            assert "dataport" not in _moved(c).get("in", {})


def test_a_client_outlives_the_node_it_pooled_connections_to(tmp_path: Any) -> None:
    ports = ["--port", str(free_port()), "--data-port", str(free_port())]
    first = start_node(tmp_path / "ssd", *ports)
    c = Client.connect(first.url, namespace=NS)
    try:
        keys = c.keys(list(range(4 * 16)))
        data = _blocks(4, seed=5)
        assert c.put_blocks(keys, list(data)) == [True] * 4
        rc, err = first.stop()
        assert rc == 0, err
        with running_node(tmp_path / "ssd", *ports) as again:
            assert again.url == first.url
            # the pooled connection is dead: the call is made again on a new one
            out = torch.zeros_like(data)
            assert c.get_blocks(keys, list(out)) == [True] * 4  # recovered from the SSD log
            assert torch.equal(out, data)
    finally:
        c.close()


def test_threads_sharing_a_client_each_get_their_own_bytes(node: NodeProcess) -> None:
    """Eight threads put and get through one client (its pool of data-port
    connections) at once; each reads back exactly what it wrote."""
    errors: list[BaseException] = []
    with Client.connect(node.url, namespace=NS) as c:

        def work(t: int) -> None:
            try:
                for r in range(10):
                    first = (t + 10) * 10**6 + r * 1000  # tokens no other test keyed
                    keys = c.keys(list(range(first, first + 8 * 16)))
                    data = _blocks(8, seed=1000 * t + r)
                    assert c.put_blocks(keys, list(data)) == [True] * 8
                    out = torch.zeros_like(data)
                    assert c.get_blocks(keys, list(out)) == [True] * 8
                    assert torch.equal(out, data), f"thread {t} round {r} got other bytes"
                    assert c.delete(keys) == 8
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors[0]
        assert c.store.checksum_failures == 0  # type: ignore[attr-defined]


def _forward(listen: tuple[str, int], to: tuple[str, int]) -> socket.socket:
    """A TCP forwarder from ``listen`` to ``to`` (threads pumping bytes both
    ways), as a firewall or NAT that lets one port through; close the
    returned listener to stop accepting."""
    server = socket.create_server(listen)

    def pump(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(1 << 16):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                a, _ = server.accept()
                b = socket.create_connection(to)
                for x, y in ((a, b), (b, a)):
                    threading.Thread(target=pump, args=(x, y), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


def test_a_client_that_cannot_reach_the_data_port_keeps_to_grpc(
    node: NodeProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the gRPC port is let through (to 127.0.0.2, where the node's
    data port is not listening): the client says so once and every call
    goes over gRPC and the engine, with the same answers."""
    grpc_port = int(node.url.rsplit(":", 1)[1])
    fwd = _forward(("127.0.0.2", 0), ("127.0.0.1", grpc_port))
    try:
        url = f"kvstore://127.0.0.2:{fwd.getsockname()[1]}"
        with Client.connect(url, namespace=NS) as c:
            assert c.store._data is None  # type: ignore[attr-defined]
            assert "cannot be reached" in caplog.text
            keys = c.keys(list(range(800_000, 800_000 + 4 * 16)))
            data = _blocks(4, seed=8)
            before = _moved(c)
            assert c.put_blocks(keys, list(data)) == [True] * 4
            out = torch.zeros_like(data)
            assert c.get_blocks(keys, list(out)) == [True] * 4 and torch.equal(out, data)
            assert c.lookup(list(range(800_000, 800_000 + 4 * 16))) == 4 * 16
            after = _moved(c)
            assert after["in"]["grpc"] - before["in"].get("grpc", 0) == 4 * N
            assert after["in"].get("dataport", 0) == before["in"].get("dataport", 0)
    finally:
        fwd.close()


def test_an_engine_put_failing_in_a_later_part_stores_nothing(node: NodeProcess) -> None:
    """A put pulled in parts (64 KiB here) whose later blocks name a grant
    the client has revoked fails whole: the parts that landed are not
    published, the node answers the next put of the same keys, and the
    blocks then read back exact."""
    from transfer import make_engine

    with Client.connect(node.url, namespace=NS) as c:
        keys = c.keys(list(range(200_000, 200_000 + 12 * 16)))
        data = _blocks(12, seed=9)
        engine = make_engine("tcp")
        try:
            region = engine.register(data.view(-1))
            good = engine.grant(region, 0, 6 * N, read=True, ttl=60)
            gone = engine.grant(region, 6 * N, 6 * N, read=True, ttl=60)
            engine.revoke(gone)
            regions = [region_to_pb(good), region_to_pb(gone)]
            refs = pb.BlockRefs(
                regions=regions,
                region_index=[0] * 6 + [1] * 6,
                offsets=[i * N for i in range(6)] * 2,
            )
            req = pb.PutRequest(
                namespace_id=c.store._nsid(NS.tag),  # type: ignore[attr-defined]
                keys=pack_keys(keys),
                sizes=[N] * 12,
                refs=refs,
            )
            with pytest.raises(KVStoreError):
                c.store.call("Put", req)  # type: ignore[attr-defined]
        finally:
            engine.close()
        assert c.exists(keys) == [False] * 12
        assert c.put_blocks(keys, list(data)) == [True] * 12
        out = torch.zeros_like(data)
        assert c.get_blocks(keys, list(out)) == [True] * 12
        assert torch.equal(out, data)
