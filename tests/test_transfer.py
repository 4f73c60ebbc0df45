"""Transfer engine: every backend against a peer in another process (``local``:
another engine in this one), with content checked byte for byte."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstore.errors import BackendUnavailableError, ClosedError, RegionError, TransferError
from transfer import (
    Op,
    RegionDesc,
    Status,
    Transfer,
    TransferEngine,
    available_backends,
    make_engine,
)
from transfer.base import coalesce
from transfer.memory import SHM_DIR, SHM_PREFIX
from transfer.protocol import Kind, new_entries, pack_header
from transfer.regions import RegionTable

sys.path.insert(0, str(Path(__file__).parent))
from xfer_peer import grant_all, pattern, served_regions

MiB = 1 << 20
SIZES = [1, 7, 4096, 65537, MiB + 3, 64 * MiB]
REMOTE = ["shm", "tcp", "ucx"]
TIMEOUT = 3.0


def _skip_unavailable(backend: str) -> None:
    reason = available_backends()[backend]
    if reason is not None:
        pytest.skip(reason)


class Peer:
    """The other side: ``tests/xfer_peer.py`` in a subprocess."""

    def __init__(self, backend: str, sizes: list[int]) -> None:
        script = Path(__file__).with_name("xfer_peer.py")
        env = {**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n"}
        self.proc = subprocess.Popen(
            [sys.executable, str(script), backend, *map(str, sizes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "peer did not start"
        self.descs = [RegionDesc.from_dict(d) for d in json.loads(line)["regions"]]

    def cmd(self, *args: object) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(map(str, args)) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class LocalPeer:
    """The ``local`` backend's other side: a second engine in this process."""

    def __init__(self, sizes: list[int]) -> None:
        self.engine = make_engine("local", timeout=TIMEOUT)
        self.regions = served_regions(self.engine, sizes)
        self.descs = grant_all(self.engine, self.regions)

    def cmd(self, *args: object) -> str:
        op, i = str(args[0]), int(str(args[1]))
        if op == "hash":
            return hashlib.sha256(self.regions[i].view).hexdigest()
        if op == "fill":
            self.regions[i].view[:] = pattern(int(str(args[2])), self.regions[i].nbytes)
            return "ok"
        self.engine.unregister(self.regions[i])
        return "ok"

    def close(self) -> None:
        self.engine.close()


@pytest.fixture(params=["local", *REMOTE])
def backend(request: pytest.FixtureRequest) -> str:
    _skip_unavailable(request.param)
    return str(request.param)


@pytest.fixture
def engine(backend: str) -> Iterator[TransferEngine]:
    e = make_engine(backend, timeout=TIMEOUT)
    yield e
    e.close()


def start_peer(backend: str, sizes: list[int]) -> Peer | LocalPeer:
    return LocalPeer(sizes) if backend == "local" else Peer(backend, sizes)


@pytest.fixture
def peer(backend: str) -> Iterator[Peer | LocalPeer]:
    p = start_peer(backend, SIZES)
    yield p
    p.close()


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(a).hexdigest()


def test_mixed_sizes_read_and_write_byte_exact(engine: TransferEngine, peer: Peer) -> None:
    locals_ = [engine.alloc(n) for n in SIZES]
    reads = [Transfer(Op.READ, r, d, r.nbytes) for r, d in zip(locals_, peer.descs, strict=False)]
    result = engine.transfer(reads)
    assert result.ok and result.nbytes == sum(SIZES)
    for i, r in enumerate(locals_):
        assert np.array_equal(r.view, pattern(i, r.nbytes)), f"region {i} differs"

    # write new content, at an offset into the middle of the big region too
    for i, r in enumerate(locals_):
        r.view[:] = pattern(100 + i, r.nbytes)
    writes = [Transfer(Op.WRITE, r, d, r.nbytes) for r, d in zip(locals_, peer.descs, strict=False)]
    engine.transfer(writes)
    for i, r in enumerate(locals_):
        assert peer.cmd("hash", i) == sha(r.view), f"peer region {i} differs after write"

    big, desc = locals_[-1], peer.descs[len(SIZES) - 1]
    engine.transfer([Transfer(Op.WRITE, locals_[3], desc, 65537, remote_offset=5 * MiB + 1)])
    expect = big.view.copy()
    expect[5 * MiB + 1 : 5 * MiB + 1 + 65537] = locals_[3].view
    assert peer.cmd("hash", len(SIZES) - 1) == sha(expect)


def test_adjacent_blocks_move_as_one_transfer(engine: TransferEngine, peer: Peer) -> None:
    """Blocks back to back on both sides are one wire entry (``coalesce``),
    yet each keeps its own status, and a refused run fails every block in it."""
    big = peer.descs[len(SIZES) - 1]  # 64 MiB
    local = engine.alloc(4 * MiB)
    size = 16 << 10
    reads = [Transfer(Op.READ, local, big, size, i * size, 3 * MiB + i * size) for i in range(256)]
    merged, counts = coalesce(reads)
    assert [(t.length, t.local_offset, t.remote_offset) for t in merged] == [(4 * MiB, 0, 3 * MiB)]
    assert counts == [256]
    result = engine.transfer(reads)
    assert result.statuses == (Status.OK,) * 256 and result.nbytes == 4 * MiB
    assert np.array_equal(local.view, pattern(len(SIZES) - 1, 64 * MiB)[3 * MiB : 7 * MiB])

    # a gap, another grant or the other direction starts a new run
    gap = Transfer(Op.READ, local, big, size, 2 * size, 3 * MiB + 3 * size)
    other = Transfer(Op.READ, local, peer.descs[3], size, 3 * size, 0)
    write = Transfer(Op.WRITE, local, big, size, 4 * size, 3 * MiB + 4 * size)
    assert coalesce([*reads[:2], gap, other, write])[1] == [2, 1, 1, 1]

    # a run that ends past its grant is refused whole; the block beside it is not
    small = peer.descs[3]  # 65537 bytes
    over = [Transfer(Op.READ, local, small, 32768, i * 32768, i * 32768) for i in range(3)]
    alone = Transfer(Op.READ, local, peer.descs[2], 4096, 3 * MiB)
    with pytest.raises(RegionError, match="remote bytes"):
        engine.submit(over)  # checked locally against the descriptor, before anything moves
    forged = RegionDesc(
        small.endpoint, small.region_id, 3 * 32768, small.key, small.shm_name, small.shm_offset
    )
    over = [Transfer(Op.READ, local, forged, 32768, i * 32768, i * 32768) for i in range(3)]
    result = engine.submit([*over, alone]).wait()
    assert result.statuses == (Status.OUT_OF_BOUNDS,) * 3 + (Status.OK,)
    assert np.array_equal(local.view[3 * MiB : 3 * MiB + 4096], pattern(2, 4096))


def test_registers_tensors_and_reads_into_them(engine: TransferEngine, peer: Peer) -> None:
    dst = torch.zeros(MiB + 3, dtype=torch.uint8)
    region = engine.register(dst)
    engine.transfer([Transfer(Op.READ, region, peer.descs[4], MiB + 3)])
    assert np.array_equal(dst.numpy(), pattern(4, MiB + 3))
    bf16 = torch.zeros(4096 // 2, dtype=torch.bfloat16)  # numpy has no bfloat16: viewed as bytes
    engine.transfer([Transfer(Op.READ, engine.register(bf16), peer.descs[2], 4096)])
    assert np.array_equal(bf16.view(torch.uint8).numpy(), pattern(2, 4096))


def test_peer_refuses_bad_descriptors_and_keeps_serving(engine: TransferEngine, peer: Peer) -> None:
    local = engine.alloc(MiB)
    local.view[:] = 9
    d = peer.descs[4]  # MiB + 3 bytes
    before = peer.cmd("hash", 4)
    forged = RegionDesc(d.endpoint, d.region_id, 10 * MiB, d.key, d.shm_name, d.shm_offset)
    unknown = RegionDesc(d.endpoint, 4242, MiB, d.key, d.shm_name, d.shm_offset)
    read_only = peer.descs[-1]
    batch = [
        Transfer(Op.WRITE, local, forged, MiB, remote_offset=MiB),  # out of bounds
        Transfer(Op.WRITE, local, unknown, MiB),
        Transfer(Op.WRITE, local, read_only, 4),
        Transfer(Op.READ, local, peer.descs[3], 65537),  # good, beside the bad ones
    ]
    result = engine.submit(batch).wait()
    assert result.statuses[:3] == (Status.OUT_OF_BOUNDS, Status.UNKNOWN_REGION, Status.FORBIDDEN)
    assert result.statuses[3] == Status.OK
    assert np.array_equal(local.view[:65537], pattern(3, 65537))
    assert peer.cmd("hash", 4) == before, "a refused write changed peer memory"
    with pytest.raises(RegionError, match="out_of_bounds"):
        result.raise_for_status()

    assert peer.cmd("unregister", 4) == "ok"
    gone = engine.submit([Transfer(Op.READ, local, d, 16)]).wait()
    assert gone.statuses == (Status.UNKNOWN_REGION,)
    engine.transfer([Transfer(Op.READ, local, peer.descs[2], 4096)])  # still serving
    assert np.array_equal(local.view[:4096], pattern(2, 4096))


def test_local_mistakes_raise_before_anything_moves(engine: TransferEngine, peer: Peer) -> None:
    local = engine.alloc(4096)
    d = peer.descs[2]
    with pytest.raises(RegionError, match="local bytes"):
        engine.submit([Transfer(Op.READ, local, d, 4096, local_offset=1)])
    with pytest.raises(RegionError, match="remote bytes"):
        engine.submit([Transfer(Op.READ, local, d, 4096, remote_offset=1)])
    with pytest.raises(RegionError, match="read-only"):
        engine.submit([Transfer(Op.READ, engine.register(b"x" * 8), d, 8)])
    other = "tcp" if engine.backend != "tcp" else "shm"
    wrong = RegionDesc(f"{other}://127.0.0.1:1", 1, 8, d.key)
    with pytest.raises(RegionError, match="belongs to the"):
        engine.submit([Transfer(Op.READ, local, wrong, 8)])
    engine.unregister(local)
    with pytest.raises(RegionError, match="not registered"):
        engine.submit([Transfer(Op.READ, local, d, 8)])


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGSTOP ``proc`` and wait until every one of its threads is stopped: a
    stop is delivered asynchronously, and a thread still running could answer."""
    proc.send_signal(signal.SIGSTOP)
    tasks = Path(f"/proc/{proc.pid}/task")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()]
        if all(s in "tT" for s in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"peer {proc.pid} did not stop: {states}")


def _wait_failed(engine: TransferEngine, transfers: list[Transfer]) -> tuple[float, set[Status]]:
    t0 = time.monotonic()
    result = engine.submit(transfers).wait(TIMEOUT * 3)
    return time.monotonic() - t0, set(result.statuses)


@pytest.mark.parametrize("backend", REMOTE, indirect=True)
def test_killed_peer_fails_the_batch_in_time(engine: TransferEngine, backend: str) -> None:
    peer = Peer(backend, [64 * MiB])
    try:
        local = engine.alloc(64 * MiB)
        big = [Transfer(Op.READ, local, peer.descs[0], 64 * MiB) for _ in range(48)]
        engine.transfer(big[:1])  # connected and working
        batch = engine.submit(big)
        time.sleep(0.05)
        peer.proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        result = batch.wait(TIMEOUT * 3)
        assert time.monotonic() - t0 < TIMEOUT + 2
        assert not result.ok
        assert set(result.statuses) <= {Status.OK, Status.PEER_FAILED, Status.TIMED_OUT}
        with pytest.raises(TransferError):
            result.raise_for_status()
    finally:
        peer.close()
    fresh = Peer(backend, [4096])  # the engine stays usable
    try:
        engine.transfer([Transfer(Op.READ, local, fresh.descs[0], 4096)])
        assert np.array_equal(local.view[:4096], pattern(0, 4096))
    finally:
        fresh.close()


@pytest.mark.parametrize("backend", REMOTE, indirect=True)
def test_stalled_peer_times_out(engine: TransferEngine, backend: str) -> None:
    peer = Peer(backend, [MiB])
    try:
        local = engine.alloc(MiB)
        engine.transfer([Transfer(Op.READ, local, peer.descs[0], MiB)])
        _stop(peer.proc)
        elapsed, statuses = _wait_failed(engine, [Transfer(Op.READ, local, peer.descs[0], MiB)])
        assert statuses == {Status.TIMED_OUT}
        assert TIMEOUT * 0.9 < elapsed < TIMEOUT + 2
    finally:
        peer.proc.send_signal(signal.SIGCONT)
        peer.close()


def test_close_leaves_no_threads_sockets_or_shm(backend: str) -> None:
    before_threads = {t.name for t in threading.enumerate()}
    before_shm = set(SHM_DIR.glob(SHM_PREFIX + f"{os.getpid()}-*"))
    a, b = make_engine(backend, timeout=TIMEOUT), make_engine(backend, timeout=TIMEOUT)
    src, dst = a.alloc(MiB), b.alloc(MiB)
    b.transfer([Transfer(Op.READ, dst, a.grant(src, read=True), MiB)])
    a.close()
    b.close()
    time.sleep(0.1)
    left = {t.name for t in threading.enumerate() if t.name.startswith("xfer")} - before_threads
    assert not left, f"threads left running: {left}"
    assert set(SHM_DIR.glob(SHM_PREFIX + f"{os.getpid()}-*")) == before_shm
    with pytest.raises(ClosedError):
        a.alloc(8)


def test_shm_needs_shared_memory_on_the_serving_side() -> None:
    peer = Peer("shm", [4096])
    engine = make_engine("shm", timeout=TIMEOUT)
    try:
        private = engine.register(np.zeros(4096, np.uint8))  # fine as the local side
        engine.transfer([Transfer(Op.READ, private, peer.descs[0], 4096)])
        assert np.array_equal(private.view, pattern(0, 4096))
        desc = engine.grant(private, read=True)
        assert desc.shm_name == "" and engine.grant(engine.alloc(4096), read=True).shm_name
        # ...but a peer cannot map it: the owner refuses it as not shared
        other = make_engine("shm", timeout=TIMEOUT)
        got = other.submit([Transfer(Op.READ, other.alloc(8), desc, 8)]).wait()
        assert got.statuses == (Status.NOT_SHARED,)
        other.close()
    finally:
        engine.close()
        peer.close()


def _dropped(s: socket.socket) -> bool:
    """The peer closed the link without replying."""
    s.settimeout(TIMEOUT)
    try:
        return s.recv(64) == b""
    except ConnectionResetError:
        return True


def test_tcp_peer_survives_garbage_and_oversized_frames() -> None:
    engine = make_engine("tcp", timeout=TIMEOUT)
    try:
        region = engine.alloc(4096)
        region.view[:] = 1
        host, port = engine.endpoint.split("://")[1].split(":")
        frames = [
            b"GET / HTTP/1.1\r\n\r\n",
            pack_header(Kind.REQUEST, 1 << 30),  # too many entries
            pack_header(Kind.REPLY, 0),  # wrong kind
            pack_header(Kind.REQUEST, 1)[:-3],  # truncated, then close
        ]
        for frame in frames:
            with socket.create_connection((host, int(port))) as s:
                s.sendall(frame)
                with contextlib.suppress(OSError):  # it may have dropped us already
                    s.shutdown(socket.SHUT_WR)
                assert _dropped(s), f"no drop after {frame!r}"
        # a huge refused write is not drained: the link drops, memory untouched
        desc = engine.grant(region, read=True, write=True)
        entries = new_entries(1)
        entries[0] = (Op.WRITE, 0, 0, desc.region_id, 4000, 1 << 40, *desc.key_words)
        with socket.create_connection((host, int(port))) as s:
            s.sendall(pack_header(Kind.REQUEST, 1) + entries.tobytes() + b"\0" * 4096)
            assert _dropped(s)
        assert (region.view == 1).all()
        other = make_engine("tcp", timeout=TIMEOUT)  # and it still serves
        dst = other.alloc(4096)
        other.transfer([Transfer(Op.READ, dst, desc, 4096)])
        assert (dst.view == 1).all()
        other.close()
    finally:
        engine.close()


def test_region_table_unregister_waits_for_leases() -> None:
    table = RegionTable()
    rid = table.add(np.zeros(64, np.uint8), None)
    g = table.grant(rid, 0, 64, frozenset({Op.READ}), None)
    entries = new_entries(1)
    key = int.from_bytes(g.key[:8], "little"), int.from_bytes(g.key[8:], "little")
    entries[0] = (Op.READ, 0, 0, g.id, 0, 64, *key)
    with table.lease(entries) as views:
        assert views[0] is not None and entries[0]["status"] == Status.OK
        with pytest.raises(RegionError, match="in use"):
            table.remove(rid, timeout=0.05)
    table.remove(rid, timeout=0.05)
    assert table.get(rid) is None


def test_descriptors_are_plain_data_and_checked() -> None:
    d = RegionDesc("tcp://127.0.0.1:5000", 3, 4096, "ab" * 16)
    assert RegionDesc.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    for bad in [
        {},
        {"endpoint": "x", "region_id": 1, "nbytes": 1},
        {**d.to_dict(), "nbytes": -1},
        {**d.to_dict(), "key": ""},  # no capability
        {**d.to_dict(), "key": "zz" * 16},
        {**d.to_dict(), "region_id": 1 << 32},
    ]:
        with pytest.raises(RegionError):
            RegionDesc.from_dict(bad)
    with pytest.raises(RegionError, match="bare file name"):
        RegionDesc.from_dict({**d.to_dict(), "shm_name": "../etc/passwd"})


def test_ucx_missing_is_a_clear_error_and_the_rest_works() -> None:
    code = (
        "import sys; sys.modules['ucxx'] = None\n"
        "from transfer import available_backends, make_engine\n"
        "print(available_backends()['ucx'])\n"
        "make_engine('tcp').close(); make_engine('shm').close()\n"
        "make_engine('ucx')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install ucxx-cu12" in out.stdout
    assert "BackendUnavailableError" in out.stderr and "pip install ucxx-cu12" in out.stderr


def _wakeups(thread: threading.Thread) -> int:
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        return sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)


def test_a_ucx_engine_without_grants_parks_yet_answers_and_wakes_on_a_grant() -> None:
    """With no live grant the accept loop polls every 50 ms, not every
    1 ms (its wake-ups took the GIL from a node's serving threads), yet a
    stale grant's request is still refused, not left to time out, and a new
    grant is served."""
    _skip_unavailable("ucx")
    from transfer.ucx import HOT_SECONDS, UcxEngine

    owner, reader = make_engine("ucx", timeout=TIMEOUT), make_engine("ucx", timeout=TIMEOUT)
    try:
        assert isinstance(owner, UcxEngine)
        src = owner.register(np.arange(4096, dtype=np.uint8))
        dst = reader.register(np.zeros(4096, np.uint8))
        desc = owner.grant(src, read=True)
        reader.transfer([Transfer(Op.READ, dst, desc, 4096)])
        assert np.array_equal(dst.view, src.view)
        owner.revoke(desc)
        time.sleep(HOT_SECONDS * 2)  # past the hot spell, with no grant live
        before = _wakeups(owner._loop)
        time.sleep(0.5)
        assert _wakeups(owner._loop) - before < 60  # ~10 at 50 ms; ~500 at 1 ms
        with pytest.raises(RegionError):  # refused, within a poll, not a timeout
            reader.transfer([Transfer(Op.READ, dst, desc, 4096)])
        dst.view[:] = 0
        again = owner.grant(src, read=True)
        reader.transfer([Transfer(Op.READ, dst, again, 4096)])
        assert np.array_equal(dst.view, src.view)
    finally:
        reader.close()
        owner.close()


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(Exception, match="unknown transfer backend"):
        make_engine("carrier-pigeon")
    assert BackendUnavailableError.grpc_code == "FAILED_PRECONDITION"


def test_receive_in_bounded_calls_tells_progress_and_hashes_blocks_as_they_land() -> None:
    """``recv_into_all`` over a real socket: every buffer filled byte-exact,
    no call taking more than ``RECV_CHUNK``, progress rising to the total,
    and ``ArrivalDigests`` (fed by it) equal to each block's own checksum,
    with the blocks it was told to skip left at 0."""
    from kvstore.checksum import ArrivalDigests, checksum
    from transfer.sockets import RECV_CHUNK, recv_into_all

    sizes = [1, 4096, 16384, 3 * RECV_CHUNK + 7, 16384, 5] * 3
    data = np.random.default_rng(3).integers(0, 256, sum(sizes), dtype=np.uint8)
    a, b = socket.socketpair()
    sender = threading.Thread(target=a.sendall, args=(data.data,))
    sender.start()
    try:
        bufs, at = [], 0
        for n in sizes:
            bufs.append(np.zeros(n, np.uint8))
            at += n
        seen: list[int] = []
        hashed = ArrivalDigests(bufs, skip={2})

        def progress(received: int) -> None:
            seen.append(received)
            hashed(received)

        recv_into_all(b, bufs, progress)
    finally:
        sender.join(10)
        a.close()
        b.close()
    assert np.array_equal(np.concatenate(bufs), data)
    steps = np.diff([0, *seen])
    assert seen[-1] == data.nbytes and (steps > 0).all() and steps.max() <= RECV_CHUNK
    want = [0 if i == 2 else checksum(buf) for i, buf in enumerate(bufs)]
    assert hashed.digests == want


def test_arrival_digests_over_runs_of_blocks_match_each_blocks_checksum() -> None:
    """Blocks landing in buffers that each hold a run of them (a put's
    adjacent pool chunks) are hashed one by one as the bytes so far cover
    them, equal to each block's own checksum, skipped ones 0."""
    from kvstore.checksum import ArrivalDigests, checksum

    sizes = [7, 4096, 1, 16384, 5, 300, 2, 9000]
    data = np.random.default_rng(8).integers(0, 256, sum(sizes), dtype=np.uint8)
    cuts = [0, 3, 4, 8]  # buffers: blocks 0-2, block 3, blocks 4-7
    ends = np.cumsum([0, *sizes]).tolist()
    bufs = [data[ends[a] : ends[b]] for a, b in itertools.pairwise(cuts)]
    hashed = ArrivalDigests(bufs, sizes, skip={1, 6})
    for received in (0, 10, ends[3], ends[3] + 1, ends[5] - 1, ends[5], data.nbytes):
        hashed(received)
        assert len(hashed.digests) == sum(1 for e in ends[1:] if e <= received)
    want = [0 if i in (1, 6) else checksum(data[ends[i] : ends[i + 1]]) for i in range(8)]
    assert hashed.digests == want
