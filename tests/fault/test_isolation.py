"""Tenants attacking a real node: the transfer port, descriptors that name the
node's own memory, keys sent into another tenant's namespace, and headers
forged inside a payload to steer crash recovery. Each attack is made as a
client on the node's host could make it, and each test checks what matters:
no byte of another tenant is read, written or forged."""

from __future__ import annotations

import os
import socket
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from client import Client, KVLayout, Namespace
from kvstore.checksum import checksum
from kvstore.errors import KVStoreError, RegionError
from kvstore.proto import kvstore_pb2 as pb
from kvstore.tiers.segment import ScanReport, load_secret, scan
from kvstore.wire import pack_keys
from tests.node import NodeProcess, running_node
from transfer.protocol import HEADER, Kind, Op, Status, new_entries, pack_header

SMALL = KVLayout(num_layers=1, num_kv_heads=4, head_dim=64, block_size=16, dtype="uint8")  # 8 KiB
BIG = KVLayout(num_layers=4, num_kv_heads=4, head_dim=64, block_size=16, dtype="uint8")  # 32 KiB
TOKENS = "alice=tok-a,bob=tok-b"
ALICE = Namespace("llama", SMALL, tenant="alice")
BOB = Namespace("llama", BIG, tenant="bob")


def _blocks(n: int, nbytes: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g) for _ in range(n)]


@contextmanager
def _node(ssd: Path | None, *flags: str) -> Iterator[NodeProcess]:
    env = {"KVSTORE_SERVER_TENANT_TOKENS": TOKENS}
    with running_node(ssd, "--token", "admin", *flags, env=env) as node:
        yield node


def _alice_blocks(node: NodeProcess) -> tuple[list[bytes], list[torch.Tensor]]:
    """Alice stores 4 blocks; returns their keys and bytes."""
    blocks = _blocks(4, SMALL.block_nbytes, seed=1)
    with Client.connect(node.url, namespace=ALICE, token="tok-a") as a:
        keys = a.keys(list(range(64)))
        assert a.put_blocks(keys, blocks) == [True] * 4
    return keys, blocks


def _alice_reads(node: NodeProcess, keys: list[bytes], blocks: list[torch.Tensor]) -> None:
    """Alice's inline reads (no transfer engine) get exactly her bytes back."""
    with Client.connect(node.url, namespace=ALICE, token="tok-a", transfer="none") as a:
        outs = [torch.zeros_like(b) for b in blocks]
        assert a.get_blocks(keys, outs) == [True] * len(keys)
        for got, want in zip(outs, blocks, strict=True):
            assert torch.equal(got, want), "alice's block changed"


def _exchange(addr: tuple[str, int], entries: np.ndarray, payload: bytes = b"") -> np.ndarray:
    """One raw KVTE request on the transfer port; the statuses it answered."""
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(pack_header(Kind.REQUEST, len(entries)) + entries.tobytes() + payload)
        head = s.recv(HEADER.size, socket.MSG_WAITALL)
        assert len(head) == HEADER.size, "the node dropped a well-formed request"
        statuses = s.recv(len(entries), socket.MSG_WAITALL)
        return np.frombuffer(statuses, np.uint8)


def test_the_transfer_port_serves_no_memory_without_a_grant(tmp_path: Path) -> None:
    with _node(None) as node:
        keys, blocks = _alice_blocks(node)
        host, port = str(node.summary["transfer"]).removeprefix("tcp://").rsplit(":", 1)
        pool = 64 << 20
        # every region id a node could have, with no key, a zero key and a random key
        entries = new_entries(3 * 8)
        for i, (rid, key) in enumerate(
            (rid, key) for rid in range(1, 9) for key in [(0, 0), (1, 2), (1 << 63, 7)]
        ):
            entries[i] = (Op.READ, 0, 0, rid, 0, pool, *key)
        got = _exchange((host, int(port)), entries)
        assert set(got.tolist()) == {Status.UNKNOWN_REGION}, "the pool was readable"
        # writes too: their payload is drained, never lands
        entries = new_entries(8)
        for i, rid in enumerate(range(1, 9)):
            entries[i] = (Op.WRITE, 0, 0, rid, 0, 4096, 0, 0)
        got = _exchange((host, int(port)), entries, b"\xee" * 4096 * 8)
        assert set(got.tolist()) == {Status.UNKNOWN_REGION}
        _alice_reads(node, keys, blocks)
        stats = Client.connect(node.url, namespace=ALICE, token="tok-a").stats()
        assert stats.checksum_failures == 0


def _pool_ref(endpoint: str, nbytes: int) -> pb.BlockRefs:
    region = pb.Region(endpoint=endpoint, region_id=1, nbytes=64 << 20, key="00" * 16)
    return pb.BlockRefs(regions=[region], region_index=[0], offsets=[0])


@pytest.mark.parametrize("alias", [False, True])
def test_a_node_never_moves_its_own_memory_for_a_client(tmp_path: Path, alias: bool) -> None:
    with _node(None) as node:
        keys, blocks = _alice_blocks(node)
        endpoint = str(node.summary["transfer"])
        if alias:  # the same port by another name: the node's engine still grants nothing
            endpoint = "tcp://localhost:" + endpoint.rsplit(":", 1)[1]
        bob_ns = Namespace("llama", SMALL, tenant="bob")
        with Client.connect(node.url, namespace=bob_ns, token="tok-b") as b:
            store = b.store
            nsid = store._nsid(bob_ns.tag)  # type: ignore[attr-defined]
            n = SMALL.block_nbytes
            put = pb.PutRequest(
                namespace_id=nsid, keys=pack_keys(keys[:1]), sizes=[n], refs=_pool_ref(endpoint, n)
            )
            with pytest.raises(KVStoreError):
                store.call("Put", put)  # type: ignore[attr-defined]
            assert b.exists(keys[:1]) == [False], "bob's namespace got a block from the pool"
            # bob's own block, written out into the node's pool as a "destination"
            own = b.keys(list(range(1000, 1016)))
            assert b.put_blocks(own, _blocks(1, n, seed=9)) == [True]
            get = pb.GetRequest(
                namespace_id=nsid,
                keys=pack_keys(own),
                sizes=[n],
                dest=_pool_ref(endpoint, n),
            )
            with pytest.raises(KVStoreError):
                store.call("Get", get)  # type: ignore[attr-defined]
        _alice_reads(node, keys, blocks)


def test_keys_are_scoped_by_namespace_no_oracle_no_squatting(tmp_path: Path) -> None:
    with _node(tmp_path / "ssd") as node:
        keys, blocks = _alice_blocks(node)  # alice holds k0..k3
        bob_ns = Namespace("llama", SMALL, tenant="bob")
        with Client.connect(node.url, namespace=bob_ns, token="tok-b") as b:
            mine = _blocks(6, SMALL.block_nbytes, seed=2)
            # bob sends alice's keys (he can compute them) and two of his own choice:
            # every one is new in his namespace, so the answer says nothing of alice's
            squat = [os.urandom(16), os.urandom(16)]
            assert b.put_blocks(keys + squat, mine) == [True] * 6
            outs = [torch.zeros_like(m) for m in mine]
            assert b.get_blocks(keys + squat, outs) == [True] * 6
            assert all(torch.equal(o, m) for o, m in zip(outs, mine, strict=True))
        _alice_reads(node, keys, blocks)  # untouched by bob's equal keys
        with Client.connect(node.url, namespace=ALICE, token="tok-a") as a:
            # a key bob wrote first is still free for alice
            theirs = _blocks(2, SMALL.block_nbytes, seed=3)
            assert a.put_blocks(squat, theirs) == [True, True]
            outs = [torch.zeros_like(t) for t in theirs]
            assert a.get_blocks(squat, outs) == [True, True]
            assert all(torch.equal(o, t) for o, t in zip(outs, theirs, strict=True))
    # and the same holds after a restart rebuilt the index from SSD
    with _node(tmp_path / "ssd") as node:
        _alice_reads(node, keys, blocks)


def _v1_header(key: bytes, tag: int, body: bytes) -> bytes:
    """A header in the old, unkeyed format (CRC-32): what an attacker can forge."""
    fields = struct.pack(
        "<IBBHII16s16sQI", 0x3142564B, 1, 0, 0, len(body), len(body), key, bytes(16),
        checksum(body), tag,
    )  # fmt: skip
    return fields + struct.pack("<I", zlib.crc32(fields))


def _v2_header(key: bytes, tag: int, body: bytes) -> bytes:
    """The current layout with a MAC under a key the attacker guessed (zeros)."""
    import hashlib

    fields = struct.pack(
        "<IBBHII16s16sQI", 0x3242564B, 2, 0, 0, len(body), len(body), key, bytes(16),
        checksum(body), tag,
    ).ljust(112, b"\0")  # fmt: skip
    mac = hashlib.blake2b(fields, digest_size=16, key=bytes(32), person=b"kvstore-seg-v2")
    return fields + mac.digest()


def _forged_payload(target: bytes) -> tuple[bytes, bytes]:
    """Bob's 32 KiB payload: forged records for alice's key at 64-byte-aligned
    offsets (old and current header shapes), each followed by its body."""
    forged = bytes(_blocks(1, SMALL.block_nbytes, seed=66)[0].numpy())
    out = bytearray(BIG.block_nbytes)
    v2 = _v2_header(target, ALICE.tag, forged)
    out[: len(v2) + len(forged)] = v2 + forged
    at = 16384
    v1 = _v1_header(target, ALICE.tag, forged)
    out[at : at + len(v1) + len(forged)] = v1 + forged
    return bytes(out), forged


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_recovery_never_adopts_a_header_forged_inside_a_payload(
    tmp_path: Path, damage: str
) -> None:
    ssd = tmp_path / "ssd"
    with _node(ssd) as node:
        with Client.connect(node.url, namespace=ALICE, token="tok-a") as a:
            target = a.keys(list(range(16)))[0]  # a prefix alice will look for
        payload, forged = _forged_payload(target)
        with Client.connect(node.url, namespace=BOB, token="tok-b") as b:
            bkey = b.keys(list(range(16)))[0]
            assert b.put_blocks([bkey], [torch.frombuffer(bytearray(payload), dtype=torch.uint8)])
    # the node stopped cleanly and wrote bob's block to SSD; now damage it
    secret = load_secret(ssd)
    hit = 0
    for seg in sorted(ssd.glob("seg-*.log")):
        fd = os.open(seg, os.O_RDWR)
        try:
            for rec in list(scan(fd, os.fstat(fd).st_size, ScanReport(), secret)):
                if rec.key == bkey:
                    hit += 1
                    if damage == "flip":
                        at = rec.offset + 9
                        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 1]), at)
                    else:  # just past the forged records
                        os.ftruncate(fd, rec.payload_offset + 16384 + 128 + len(forged))
        finally:
            os.close(fd)
    assert hit == 1
    with _node(ssd) as node, Client.connect(node.url, namespace=ALICE, token="tok-a") as a:
        out = torch.zeros(SMALL.block_nbytes, dtype=torch.uint8)
        assert a.get_blocks([target], [out]) == [False], "recovery adopted a forged record"
        assert a.exists([target]) == [False]


def test_malformed_grpc_descriptors_get_errors_not_bytes(tmp_path: Path) -> None:
    """Descriptors with no key, a bad key, or an id past u32 are refused up front."""
    with _node(None) as node, Client.connect(node.url, namespace=ALICE, token="tok-a") as a:
        store = a.store
        nsid = store._nsid(ALICE.tag)  # type: ignore[attr-defined]
        n = SMALL.block_nbytes
        for region in [
            pb.Region(endpoint="tcp://127.0.0.1:1", region_id=1, nbytes=n),
            pb.Region(endpoint="tcp://127.0.0.1:1", region_id=1, nbytes=n, key="x" * 32),
            pb.Region(endpoint="tcp://127.0.0.1:1", region_id=1 << 40, nbytes=n, key="ab" * 16),
        ]:
            refs = pb.BlockRefs(regions=[region], region_index=[0], offsets=[0])
            req = pb.PutRequest(
                namespace_id=nsid, keys=pack_keys([os.urandom(16)]), sizes=[n], refs=refs
            )
            with pytest.raises(RegionError, match=r"descriptor|grant id"):
                store.call("Put", req)  # type: ignore[attr-defined]


def test_fuzzed_descriptors_never_move_another_tenants_bytes(tmp_path: Path) -> None:
    """Bob sends Puts and Gets whose descriptors hypothesis draws: the node's
    own endpoint (and an alias of it), his own engine, garbage; region ids the
    node has or not; his grant's key, random keys, none; any offset and size.
    Whatever the node answers, no block of Bob's holds anything but bytes of
    his own region, his region never receives a byte of Alice's, and Alice's
    blocks stay exactly hers."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from transfer import make_engine

    n = SMALL.block_nbytes
    bob_ns = Namespace("llama", SMALL, tenant="bob")
    with _node(None) as node, Client.connect(node.url, namespace=bob_ns, token="tok-b") as b:
        keys, blocks = _alice_blocks(node)
        node_ep = str(node.summary["transfer"])
        alias_ep = "tcp://localhost:" + node_ep.rsplit(":", 1)[1]
        engine = make_engine("tcp")
        mine = np.random.default_rng(5).integers(0, 256, 8 * n, dtype=np.uint8)
        region = engine.register(torch.from_numpy(mine))
        grant = engine.grant(region, read=True, write=True, ttl=600)
        store = b.store
        nsid = store._nsid(bob_ns.tag)  # type: ignore[attr-defined]
        bob_keys = b.keys(list(range(2000, 2000 + 16 * 6)))
        stored: dict[bytes, bytes] = {}  # what bob's puts may have stored, by key
        outcomes: dict[str, int] = {}
        # the right value often enough that calls get through, then the wrong ones
        sizes = [n, n, n, n, n - 1, 0, 1 << 40]
        lengths = [8 * n, 8 * n, 64 << 20, n, 1 << 63]

        @settings(
            max_examples=int(os.environ.get("KVSTORE_FUZZ_EXAMPLES", "150")),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            # the same draws every run: with random ones, now and then a run
            # drew no put that gets through, and the coverage check below failed
            derandomize=True,
        )
        @given(data=st.data())
        def fuzz(data: st.DataObject) -> None:
            mine_ep = engine.endpoint
            endpoint = data.draw(
                st.sampled_from([mine_ep, mine_ep, node_ep, alias_ep, "tcp://x:1"])
            )
            rid = data.draw(st.sampled_from([grant.region_id] * 3 + [0, 1, 2, (1 << 32) - 1]))
            wrong = ["00" * 16, os.urandom(16).hex(), ""]
            key = data.draw(st.sampled_from([grant.key] * 3 + wrong))
            length = data.draw(st.sampled_from(lengths))
            offset = data.draw(st.sampled_from([0, n, 7 * n, 8 * n, 3]))
            ref = pb.Region(endpoint=endpoint, region_id=rid, nbytes=length, key=key)
            refs = pb.BlockRefs(regions=[ref], region_index=[0], offsets=[offset])
            k = bob_keys[data.draw(st.integers(0, len(bob_keys) - 1))]
            size = data.draw(st.sampled_from(sizes))
            put = data.draw(st.booleans())
            req: pb.PutRequest | pb.GetRequest
            if put:
                req = pb.PutRequest(namespace_id=nsid, keys=pack_keys([k]), sizes=[size], refs=refs)
            else:
                req = pb.GetRequest(namespace_id=nsid, keys=pack_keys([k]), sizes=[size], dest=refs)
            source = region.view[offset : offset + n].tobytes()  # before a get changes it
            try:
                store.call("Put" if put else "Get", req)  # type: ignore[attr-defined]
            except KVStoreError as e:
                outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
                return
            outcomes["Put" if put else "Get"] = outcomes.get("Put" if put else "Get", 0) + 1
            if put:  # the first put of a key that succeeds is what it holds
                stored.setdefault(k, source)

        try:
            fuzz()
            assert outcomes.get("Put") and outcomes.get("Get"), outcomes  # real paths were hit
            assert outcomes.get("PermissionDeniedError"), outcomes  # the node named itself
            got = b.exists(bob_keys)
            for k, present in zip(bob_keys, got, strict=True):
                if present:
                    out = torch.zeros(n, dtype=torch.uint8)
                    assert b.get_blocks([k], [out]) == [True]
                    assert out.numpy().tobytes() == stored.get(k), "bob's block is not his bytes"
            seen = region.view.tobytes()
            for blk in blocks:
                assert blk.numpy().tobytes()[:64] not in seen, "alice's bytes reached bob"
        finally:
            engine.revoke(grant)
            engine.close()
        _alice_reads(node, keys, blocks)
