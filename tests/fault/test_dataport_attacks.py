"""A hostile client on the node's host against the data port, with raw
sockets: no HELLO, a wrong token, another tenant's namespace, payloads that
lie about their size, frames that claim gigabytes, garbage. Each attack
checks what matters: no byte of another tenant is read or written, the node
stays up, and a refused request leaves the connection in step."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import Client, KVLayout, Namespace
from kvstore.checksum import checksum
from kvstore.dataport import (
    CHECKSUMS_AFTER,
    CODES,
    ERROR,
    HELLO,
    OK,
    error_from,
    frame,
    read_frame,
)
from kvstore.errors import (
    AuthError,
    ChecksumMismatchError,
    InvalidArgumentError,
    KVStoreError,
    PayloadSizeError,
    PermissionDeniedError,
)
from kvstore.proto import kvstore_pb2 as pb
from kvstore.wire import pack_keys, unpack_flags
from tests.node import NodeProcess, running_node
from transfer.protocol import ProtocolError

SMALL = KVLayout(num_layers=1, num_kv_heads=4, head_dim=64, block_size=16, dtype="uint8")  # 8 KiB
ALICE = Namespace("llama", SMALL, tenant="alice")
BOB = Namespace("llama", SMALL, tenant="bob")
N = SMALL.block_nbytes


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    env = {"KVSTORE_SERVER_TENANT_TOKENS": "alice=tok-a,bob=tok-b"}
    with running_node(None, "--token", "admin", env=env) as n:
        yield n


def _addr(node: NodeProcess) -> tuple[str, int]:
    return "127.0.0.1", int(node.summary["data_port"])


def _connect(node: NodeProcess, token: bytes | None) -> socket.socket:
    s = socket.create_connection(_addr(node), timeout=10)
    if token is not None:
        s.sendall(frame(HELLO, token) + token)
        code, body, _ = _reply(s)
        if code == ERROR:
            s.close()
            raise error_from(body)
    return s


def _reply(s: socket.socket) -> tuple[int, bytearray, int]:
    got = read_frame(s, 1 << 26)
    assert got is not None, "the node closed the connection instead of answering"
    return got


def _request(s: socket.socket, method: str, req: object, payload: bytes = b"") -> object:
    body = req.SerializeToString()  # type: ignore[attr-defined]
    s.sendall(frame(CODES[method], body, len(payload)) + body + payload)
    code, raw, n = _reply(s)
    if code == ERROR:
        raise error_from(raw)
    assert code == OK
    reply = pb.GetReply.FromString(bytes(raw)) if method == "Get" else raw
    if n:
        data = s.recv(n, socket.MSG_WAITALL)
        return reply, data
    return reply, b""


def _put(s: socket.socket, req: pb.PutRequest, payload: bytes, flags: int = 0) -> list[bool]:
    """A data-port Put of ``req`` with ``payload`` (raw, as a client may lie)."""
    body = req.SerializeToString()
    s.sendall(frame(CODES["Put"], body, len(payload), flags) + body + payload)
    code, raw, _ = _reply(s)
    if code == ERROR:
        raise error_from(raw)
    return unpack_flags(pb.PutReply.FromString(bytes(raw)).stored)


def _stored(s: socket.socket, nsid: bytes, keys: list[bytes]) -> list[bool]:
    raw, _ = _request(s, "Exists", pb.KeysRequest(namespace_id=nsid, keys=pack_keys(keys)))
    return unpack_flags(pb.ExistsReply.FromString(bytes(raw)).found)


def _closed(s: socket.socket) -> bool:
    """The node dropped the link (EOF or reset) rather than answering."""
    s.settimeout(10)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def _alice(node: NodeProcess) -> tuple[bytes, list[bytes], list[torch.Tensor]]:
    """Alice's namespace id, and 4 blocks she stored."""
    g = torch.Generator().manual_seed(3)
    blocks = [torch.randint(0, 256, (N,), dtype=torch.uint8, generator=g) for _ in range(4)]
    with Client.connect(node.url, namespace=ALICE, token="tok-a") as a:
        keys = a.keys(list(range(64)))
        a.put_blocks(keys, blocks)
        nsid = a.store._nsid(ALICE.tag)  # type: ignore[attr-defined]
    return nsid, keys, blocks


def _alice_intact(node: NodeProcess, keys: list[bytes], blocks: list[torch.Tensor]) -> None:
    with Client.connect(node.url, namespace=ALICE, token="tok-a") as a:
        outs = [torch.zeros(N, dtype=torch.uint8) for _ in blocks]
        assert a.get_blocks(keys, outs) == [True] * len(keys)
        for got, want in zip(outs, blocks, strict=True):
            assert torch.equal(got, want), "alice's block changed"


def test_no_request_is_served_before_a_good_hello(node: NodeProcess) -> None:
    nsid, keys, blocks = _alice(node)
    get = pb.GetRequest(namespace_id=nsid, keys=pack_keys(keys), sizes=[N] * 4)
    body = get.SerializeToString()
    with socket.create_connection(_addr(node), timeout=10) as s:  # no HELLO at all
        s.sendall(frame(CODES["Get"], body) + body)
        assert _closed(s)
    for token in (b"", b"tok-wrong", b"\xff\xfe"):
        with pytest.raises(KVStoreError) as e:
            _connect(node, token)
        assert isinstance(e.value, AuthError) or "UTF-8" in str(e.value)
    with socket.create_connection(_addr(node), timeout=10) as s:  # garbage
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
        assert _closed(s)
    _alice_intact(node, keys, blocks)


def test_a_tenant_cannot_reach_another_tenants_namespace(node: NodeProcess) -> None:
    nsid, keys, blocks = _alice(node)
    with _connect(node, b"tok-b") as s:
        get = pb.GetRequest(namespace_id=nsid, keys=pack_keys(keys), sizes=[N] * 4)
        with pytest.raises(PermissionDeniedError):
            _request(s, "Get", get)
        evil = bytes([0xEE]) * N
        put = pb.PutRequest(namespace_id=nsid, keys=pack_keys(keys[:1]), sizes=[N])
        with pytest.raises(PermissionDeniedError):
            _request(s, "Put", put, evil)  # refused, its payload drained: still in step
        with pytest.raises(PermissionDeniedError):
            _request(s, "Lookup", pb.LookupRequest(namespace_id=nsid, keys=pack_keys(keys)))
        with pytest.raises(PermissionDeniedError):
            _request(s, "Delete", pb.KeysRequest(namespace_id=nsid, keys=pack_keys(keys)))
    _alice_intact(node, keys, blocks)


def test_payloads_that_lie_about_their_size_store_nothing(node: NodeProcess) -> None:
    nsid, keys, blocks = _alice(node)
    with Client.connect(node.url, namespace=ALICE, token="tok-a") as a:
        fresh = a.keys(list(range(1000, 1032)))
    with _connect(node, b"tok-a") as s:
        for sizes, payload in [([N, N], N), ([N], N + 1), ([N], N - 1), ([N - 8], N - 8)]:
            put = pb.PutRequest(namespace_id=nsid, keys=pack_keys(fresh[: len(sizes)]), sizes=sizes)
            with pytest.raises(PayloadSizeError):
                _request(s, "Put", put, b"\xee" * payload)
        # a wrong checksum: refused after the bytes arrived, nothing published
        put = pb.PutRequest(
            namespace_id=nsid, keys=pack_keys(fresh[:1]), sizes=[N], checksums=[12345]
        )
        with pytest.raises(ChecksumMismatchError):
            _request(s, "Put", put, b"\xee" * N)
        # the connection is still in step: a lookup answers, and nothing went in
        exists = pb.KeysRequest(namespace_id=nsid, keys=pack_keys(fresh[:2]))
        raw, _ = _request(s, "Exists", exists)
        assert unpack_flags(pb.ExistsReply.FromString(bytes(raw)).found) == [False, False]
        # a get answers only what is there, and exactly those bytes
        get = pb.GetRequest(namespace_id=nsid, keys=pack_keys(keys), sizes=[N] * 4)
        reply, data = _request(s, "Get", get)
        assert unpack_flags(reply.found) == [True] * 4  # type: ignore[attr-defined]
        assert data == b"".join(b.numpy().tobytes() for b in blocks)
        assert list(reply.checksums) == [checksum(b) for b in blocks]  # type: ignore[attr-defined]
    _alice_intact(node, keys, blocks)


def test_trailing_checksums_are_checked_and_cannot_be_bent(node: NodeProcess) -> None:
    """A put whose checksums follow its blocks (``CHECKSUMS_AFTER``): the
    right ones store, a wrong one stores nothing of the batch, a trailer of
    the wrong length or one beside body checksums is refused with its bytes
    read past; the flag on any other method drops the link."""
    nsid, keys, blocks = _alice(node)
    with Client.connect(node.url, namespace=ALICE, token="tok-a") as a:
        fresh = a.keys(list(range(3000, 3032)))
    data = [bytes([i + 1]) * N for i in range(2)]
    sums = [checksum(torch.frombuffer(bytearray(d), dtype=torch.uint8)) for d in data]

    def put(s: socket.socket, digests: list[int], extra: bytes = b"", **kw: object) -> object:
        req = pb.PutRequest(namespace_id=nsid, keys=pack_keys(fresh[:2]), sizes=[N, N], **kw)
        payload = b"".join(data) + np.array(digests, "<u8").tobytes() + extra
        return _put(s, req, payload, CHECKSUMS_AFTER)

    def stored(s: socket.socket) -> list[bool]:
        return _stored(s, nsid, fresh[:2])

    with _connect(node, b"tok-a") as s:
        with pytest.raises(ChecksumMismatchError):
            put(s, [sums[0], sums[1] ^ 1])
        assert stored(s) == [False, False]
        with pytest.raises(PayloadSizeError):
            put(s, sums, extra=b"\0" * 8)  # a third checksum for two blocks
        with pytest.raises(InvalidArgumentError):
            put(s, sums, checksums=sums)  # both in the body and after it
        assert stored(s) == [False, False]  # each refusal left the link in step
        assert put(s, sums) == [True, True]
        assert stored(s) == [True, True]
    with _connect(node, b"tok-a") as s:
        body = pb.KeysRequest(namespace_id=nsid, keys=pack_keys(keys)).SerializeToString()
        s.sendall(frame(CODES["Exists"], body, 0, CHECKSUMS_AFTER) + body)
        assert _closed(s)
    _alice_intact(node, keys, blocks)


def test_an_engine_puts_trailing_checksums_are_checked(node: NodeProcess) -> None:
    """A put whose request rides the data port while the node's engine pulls
    its blocks from the client's region: checksums that follow the request
    must match what landed (one wrong stores nothing of the batch), a
    trailer of the wrong length, or a payload of blocks beside the regions,
    is refused with the link in step, and the right ones store bytes that
    read back exact."""
    from kvstore.wire import region_to_pb
    from transfer import make_engine

    nsid, keys, blocks = _alice(node)
    with Client.connect(node.url, namespace=ALICE, token="tok-a") as a:
        fresh = a.keys(list(range(4000, 4064)))[:3]
    data = np.random.default_rng(11).integers(0, 256, 3 * N, dtype=np.uint8)
    sums = [checksum(torch.from_numpy(data[i * N : (i + 1) * N])) for i in range(3)]
    engine = make_engine("tcp")
    try:
        region = engine.register(torch.from_numpy(data))
        grant = engine.grant(region, read=True, ttl=60)
        ref = region_to_pb(grant)
        refs = pb.BlockRefs(regions=[ref], region_index=[0] * 3, offsets=[0, N, 2 * N])

        def put(s: socket.socket, tail: bytes) -> list[bool]:
            req = pb.PutRequest(namespace_id=nsid, keys=pack_keys(fresh), sizes=[N] * 3, refs=refs)
            return _put(s, req, tail, CHECKSUMS_AFTER)

        def stored(s: socket.socket) -> list[bool]:
            return _stored(s, nsid, fresh)

        with _connect(node, b"tok-a") as s:
            with pytest.raises(ChecksumMismatchError):
                put(s, np.array([sums[0], sums[1], sums[2] ^ 4], "<u8").tobytes())
            assert stored(s) == [False] * 3
            with pytest.raises(PayloadSizeError):
                put(s, np.array(sums[:2], "<u8").tobytes())  # two checksums for three blocks
            with pytest.raises(PayloadSizeError):
                put(s, data.tobytes() + np.array(sums, "<u8").tobytes())  # blocks and regions
            own = pb.Region(endpoint=str(node.summary["transfer"]), region_id=1, nbytes=3 * N)
            own.key = "00" * 16
            with pytest.raises(PermissionDeniedError, match="not this node"):  # its own memory
                req = pb.PutRequest(
                    namespace_id=nsid,
                    keys=pack_keys(fresh),
                    sizes=[N] * 3,
                    refs=pb.BlockRefs(regions=[own], region_index=[0] * 3, offsets=[0, N, 2 * N]),
                )
                _put(s, req, np.array(sums, "<u8").tobytes(), CHECKSUMS_AFTER)
            assert stored(s) == [False] * 3  # each refusal left the link in step
        with _connect(node, b"tok-b") as s, pytest.raises(PermissionDeniedError):
            put(s, np.array(sums, "<u8").tobytes())  # bob, into alice's namespace
        with _connect(node, b"tok-a") as s:
            assert stored(s) == [False] * 3
            assert put(s, np.array(sums, "<u8").tobytes()) == [True] * 3
    finally:
        engine.close()
    with Client.connect(node.url, namespace=ALICE, token="tok-a") as a:
        outs = [torch.zeros(N, dtype=torch.uint8) for _ in range(3)]
        assert a.get_blocks(fresh, outs) == [True] * 3
        assert torch.equal(torch.cat(outs), torch.from_numpy(data))
    _alice_intact(node, keys, blocks)


@pytest.mark.parametrize(
    "head",
    [
        frame(CODES["Put"], b"", 1 << 40),  # a terabyte payload: over stream_max
        frame(CODES["Get"], b"\0" * 0)[:-12] + (1 << 31).to_bytes(4, "little") + bytes(8),
        frame(99, b""),  # no such method
        b"KVDP\x07" + bytes(15),  # another version
    ],
    ids=["huge-payload", "huge-body", "unknown-method", "version"],
)
def test_frames_out_of_bounds_drop_the_link_not_the_node(node: NodeProcess, head: bytes) -> None:
    nsid, keys, blocks = _alice(node)
    with _connect(node, b"tok-a") as s:
        s.sendall(head)
        assert _closed(s)
    with _connect(node, b"tok-a") as s:  # the node still serves
        raw, _ = _request(s, "Exists", pb.KeysRequest(namespace_id=nsid, keys=pack_keys(keys)))
        assert unpack_flags(pb.ExistsReply.FromString(bytes(raw)).found) == [True] * 4
    _alice_intact(node, keys, blocks)


def test_a_client_sees_the_nodes_typed_errors(node: NodeProcess) -> None:
    with Client.connect(node.url, namespace=ALICE, token="tok-a") as a:
        store = a.store
        assert store._data is not None  # type: ignore[attr-defined]
        keys = a.keys(list(range(2000, 2032)))
        with pytest.raises(PayloadSizeError):  # raised by the node, rebuilt here
            store.put(keys[:1], [torch.zeros(N - 1, dtype=torch.uint8)], ns_tag=ALICE.tag)
        assert a.exists(keys[:1]) == [False]


FUZZ = settings(
    max_examples=int(os.environ.get("KVSTORE_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(
    code=st.sampled_from([*CODES.values(), 0, 6, 255]),
    flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 255)), max_size=8),
    cut=st.integers(0, 4096),
    payload=st.integers(0, 3 * N),
)
def test_mutated_requests_from_another_tenant_never_get_a_byte(
    node: NodeProcess, code: int, flips: list[tuple[int, int]], cut: int, payload: int
) -> None:
    """Bob sends Alice's get (her namespace id, her keys), mutated: bytes
    flipped, cut short, under any method code, with any payload. The node
    answers an error or drops the link; none of Alice's bytes ever come back."""
    nsid, keys, blocks = _ALICE_ONCE.setdefault("alice", _alice(node))
    body = bytearray(
        pb.GetRequest(namespace_id=nsid, keys=pack_keys(keys), sizes=[N] * 4).SerializeToString()
    )
    for at, x in flips:
        body[at % len(body)] ^= x
    body = body[: max(1, min(cut, len(body)))] if cut < len(body) else body
    secrets = [b.numpy().tobytes()[:64] for b in blocks]
    with _connect(node, b"tok-b") as s:
        s.settimeout(10)
        try:
            s.sendall(frame(code, bytes(body), payload) + bytes(body) + b"\xee" * payload)
            got = read_frame(s, 1 << 26)
            data = s.recv(got[2], socket.MSG_WAITALL) if got is not None and got[2] else b""
        except (OSError, ProtocolError):
            got, data = None, b""
        if got is not None:
            assert got[0] in (OK, ERROR)
            assert not any(secret in bytes(got[1]) + data for secret in secrets)
            if got[0] == OK:  # only a request that never named alice's blocks succeeds
                assert not data
    with _connect(node, b"tok-a") as s:  # the node still serves
        raw, _ = _request(s, "Exists", pb.KeysRequest(namespace_id=nsid, keys=pack_keys(keys)))
        assert unpack_flags(pb.ExistsReply.FromString(bytes(raw)).found) == [True] * 4


_ALICE_ONCE: dict[str, tuple[bytes, list[bytes], list[torch.Tensor]]] = {}


def test_request_bodies_come_out_of_the_nodes_scratch_budget() -> None:
    """A body is held in memory from ``server.scratch_memory``: one larger
    than the budget is refused and read past (the link stays in step), so
    connections sending large bodies at once cannot grow the node past it."""
    env = {"KVSTORE_SERVER_TENANT_TOKENS": "alice=tok-a", "KVSTORE_SERVER_SCRATCH_MEMORY": "1MiB"}
    with running_node(None, "--token", "admin", env=env) as n:
        nsid, keys, blocks = _alice(n)
        big = pb.LookupRequest(namespace_id=nsid, tokens=bytes(2 << 20))  # a 2 MiB body
        with _connect(n, b"tok-a") as s:
            with pytest.raises(InvalidArgumentError, match="scratch"):
                _request(s, "Lookup", big)
            raw, _ = _request(s, "Exists", pb.KeysRequest(namespace_id=nsid, keys=pack_keys(keys)))
            assert unpack_flags(pb.ExistsReply.FromString(bytes(raw)).found) == [True] * 4
            small = pb.LookupRequest(namespace_id=nsid, tokens=bytes(256 << 10))
            raw, _ = _request(s, "Lookup", small)  # within the budget: answered
            assert pb.LookupReply.FromString(bytes(raw)).hit_blocks == 0
        _alice_intact(n, keys, blocks)


def test_a_flooded_data_port_costs_speed_not_calls() -> None:
    """Connections that never say HELLO fill the node's data port (4 allowed
    here); a client's calls that find no connection go over gRPC instead,
    and every one of them answers with the right bytes."""
    env = {"KVSTORE_SERVER_TENANT_TOKENS": "alice=tok-a", "KVSTORE_TRANSFER_MAX_CONNECTIONS": "4"}
    errors: list[BaseException] = []
    with (
        running_node(None, "--token", "admin", env=env) as n,
        Client.connect(n.url, namespace=ALICE, token="tok-a") as a,  # holds one connection
    ):

        def work(t: int) -> None:
            try:
                first = 10_000 * (t + 1)
                keys = a.keys(list(range(first, first + 4 * 16)))
                g = torch.Generator().manual_seed(t)
                data = [torch.randint(0, 256, (N,), dtype=torch.uint8, generator=g)] * 4
                assert a.put_blocks(keys, data) == [True] * 4
                out = [torch.zeros(N, dtype=torch.uint8) for _ in range(4)]
                assert a.get_blocks(keys, out) == [True] * 4
                assert all(torch.equal(o, d) for o, d in zip(out, data, strict=True))
                assert a.lookup(list(range(first, first + 64))) == 64
            except BaseException as e:  # surfaced below
                errors.append(e)

        flood = [socket.create_connection(_addr(n), timeout=10) for _ in range(3)]
        try:
            threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
        finally:
            for s in flood:
                s.close()
        assert not errors, errors[0]
        assert a.store.port_refusals > 0  # type: ignore[attr-defined]
