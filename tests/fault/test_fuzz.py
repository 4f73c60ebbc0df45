"""Fuzzing the two parsers that take bytes from outside: the SSD segment
scanner (random and mutated segment files) and the transfer engine's framing
(random and mutated requests on its socket). Neither may crash, hang, leak a
connection, or hand out a byte that was not written. The gRPC service has its
own fuzz test (tests/test_service.py).

``KVSTORE_FUZZ_EXAMPLES`` sets the examples per target (CI: 150; run longer
on demand, e.g. 20000)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.checksum import checksum
from kvstore.config import SsdConfig
from kvstore.keys import scoped
from kvstore.tiers.ssd import SsdTier
from transfer import Op, RegionDesc, Transfer, make_engine
from transfer.protocol import Kind, new_entries, pack_header

EXAMPLES = int(os.environ.get("KVSTORE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
MiB = 1 << 20


def _payload(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randint(0, 256, (1000 + 37 * i,), dtype=torch.uint8, generator=g)


def _key(i: int) -> bytes:
    return scoped(0, i.to_bytes(16, "little"))


def _tier(path: Path) -> SsdTier:
    return SsdTier(SsdConfig(path=path, capacity=64 * MiB, segment_size=4 * MiB))


def _segment_bytes() -> bytes:
    """One real segment file holding 24 blocks of known payloads."""
    with tempfile.TemporaryDirectory() as d:
        tier = _tier(Path(d))
        for i in range(24):
            p = _payload(i)
            tier.put(_key(i), p, checksum(p), parent=_key(i - 1) if i else None)
        tier.close()
        (seg,) = Path(d).glob("seg-*.log")
        return seg.read_bytes()


SEGMENT = _segment_bytes()


def _mutated(data: st.DataObject, base: bytes) -> bytes:
    raw = bytearray(base)
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["flip", "cut", "splice", "zero"]))
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del raw[at : at + data.draw(st.integers(1, 4096))]
        elif kind == "splice":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=256))
        else:
            end = at + data.draw(st.integers(1, 512))
            raw[at:end] = bytes(len(raw[at:end]))
    return bytes(raw)


@FUZZ
@given(data=st.data())
def test_a_damaged_or_random_segment_never_yields_wrong_bytes(data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        raw = _mutated(data, SEGMENT)
    else:
        raw = data.draw(st.binary(max_size=8192))
    d = Path(tempfile.mkdtemp(prefix="kvstore-fuzz-"))
    try:
        (d / "seg-00000000.log").write_bytes(raw)
        tier = _tier(d)  # recovery scans the file: must not raise
        try:
            for rec in list(tier.records()):
                i = int.from_bytes(rec.key, "little")
                want = _payload(i) if rec.scoped == _key(i) and i < 24 else None
                dst = torch.empty(rec.raw_len, dtype=torch.uint8)
                if tier.get_into(rec.scoped, dst):
                    assert want is not None and torch.equal(dst, want), f"record {i} read wrong"
        finally:
            tier.close()
    finally:
        shutil.rmtree(d)


class _Server:
    """A tcp engine serving one read-only region of a known pattern."""

    def __init__(self) -> None:
        self.engine = make_engine("tcp")
        self.pattern = np.random.default_rng(3).integers(0, 256, 1 << 16, dtype=np.uint8)
        self.region = self.engine.register(self.pattern.tobytes())
        self.desc = self.engine.grant(self.region, read=True)
        host, port = self.engine.endpoint.removeprefix("tcp://").rsplit(":", 1)
        self.addr = (host, int(port))

    def check_serving(self, reader) -> None:  # type: ignore[no-untyped-def]
        local = reader.alloc(self.pattern.nbytes)
        reader.transfer([Transfer(Op.READ, local, self.desc, self.pattern.nbytes)])
        assert np.array_equal(local.view, self.pattern)


def _valid_request(desc: RegionDesc) -> bytes:
    entries = new_entries(2)
    entries["op"] = [int(Op.READ), int(Op.WRITE)]
    entries["region"] = desc.region_id
    entries["key0"], entries["key1"] = desc.key_words
    entries["offset"] = [0, 64]
    entries["length"] = [64, 64]
    return bytes(pack_header(Kind.REQUEST, 2)) + entries.tobytes() + bytes(64)


def _send(addr: tuple[str, int], raw: bytes) -> None:
    with socket.create_connection(addr, timeout=2) as s:
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(0.5)
            while s.recv(65536):
                pass
        except OSError:
            pass  # the engine may drop us mid-send: that is its answer to garbage


def test_random_bytes_on_the_transfer_socket_change_nothing() -> None:
    server = _Server()
    reader = make_engine("tcp")
    valid = _valid_request(server.desc)
    before = threading.active_count()

    @FUZZ
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        if data.draw(st.booleans()):
            _send(server.addr, _mutated(data, valid))
        else:
            _send(server.addr, data.draw(st.binary(max_size=4096)))

    try:
        fuzz()
        server.check_serving(reader)  # still serving, and the region is untouched
        assert server.region.view.tobytes() == server.pattern.tobytes()
        deadline = time.monotonic() + 10  # every fuzz connection was dropped, none lingers
        while threading.active_count() > before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before + 2
    finally:
        reader.close()
        server.engine.close()
