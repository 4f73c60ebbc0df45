"""The ``ucx`` backend: UCXX tag messages, so UCX picks the fabric (CMA shared
memory and TCP here; InfiniBand/RoCE or NVLink where a host has them).

The Python bindings of UCXX expose tag send/receive but not one-sided RMA, so
each batch is a short conversation. Every message carries a 64-bit tag
``kind | connection | batch | entry`` and payloads go straight between the
two sides' registered buffers:

    initiator                                     peer
    REQUEST  header + entries          ->         check and pin the regions
             <- STATUS  one byte per entry        post receives for good WRITEs
    payloads of good WRITEs            ->         send good READs
             <- READ payloads
             <- DONE    final statuses            unpin

Endpoints are made from worker addresses with UCX error handling off: that is
what lets UCX use CMA zero-copy shared memory on one host (with error handling
on it falls back to TCP at a fifth of the speed). Without error handling a
dead peer raises nothing, so every wait is bounded by the engine's timeout.
The rendezvous scheme is ``put_zcopy``: with the default, large messages stall
under the blocking progress thread.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kvstore.errors import BackendUnavailableError, PeerError, TransferTimeoutError
from transfer.base import Transfer, TransferEngine
from transfer.config import TransferConfig
from transfer.plan import encode, one_lane
from transfer.protocol import (
    ENTRY,
    HEADER,
    MAX_ENTRIES,
    Kind,
    Op,
    ProtocolError,
    Status,
    pack_header,
    unpack_header,
)

# UCXX sets UCX variables this UCX build does not know; keep it from warning about them.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

try:
    import ucxx._lib.libucxx as ucx_api
    from ucxx._lib.arr import Array
except ImportError as e:  # pragma: no cover - depends on the host
    raise BackendUnavailableError(
        f"the ucx transfer backend needs UCXX ({e}); install it with "
        "`pip install ucxx-cu12`, or pick the tcp or shm backend"
    ) from None

__all__ = ["Array", "UcxEngine", "make_worker", "ucx_api", "wait_all"]

UCX_OPTIONS = {"RNDV_SCHEME": "put_zcopy"}
CONN = struct.Struct("<II")  # connection id, batch number: follows the header
REQ, STATUS, DATA, DONE = 1, 2, 3, 4  # tag kinds
KIND_MASK = ucx_api.UCXXTagMask(0xFF << 56)
MAX_MESSAGE = HEADER.size + CONN.size + MAX_ENTRIES * ENTRY.itemsize + 4096


def tag(kind: int, conn: int, seq: int = 0, idx: int = 0) -> Any:
    return ucx_api.UCXXTag(kind << 56 | (conn & 0xFFFFFF) << 32 | (seq & 0xFFFF) << 16 | idx)


# How long the accept loop polls fast after a message or a grant: long
# enough to span the gaps between one initiator's back-to-back batches, short
# enough that it is not spinning beside the data port's calls (small
# batches) that follow: at 1 s those ran 10-15% slower on a ucx node than on
# a tcp one.
HOT_SECONDS = 0.05
SPIN_SECONDS = 200e-6  # how long a wait yields before it sleeps
# Past the hot spell the accept loop polls every IDLE_DELAY while this engine
# has a live grant (a peer may come for it), every PARKED_DELAY while it has
# none (only a peer holding a stale grant would write: it is refused that
# much later). A node's engine only initiates, so it parks: at 1 ms its
# 1,000 wake-ups a second took the GIL from the node's serving threads, and
# 16 KiB calls on a ucx node ran ~5% behind a tcp one.
IDLE_DELAY = 1e-3
PARKED_DELAY = 0.05


def make_worker() -> tuple[Any, Any]:
    """A UCX context and worker with our options, progressed by UCXX's own thread."""
    ctx = ucx_api.UCXContext(
        config_dict=UCX_OPTIONS, feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP)
    )
    worker = ucx_api.UCXWorker(ctx)
    worker.start_progress_thread(polling_mode=False)
    return ctx, worker


def _spin(reqs: Sequence[Any]) -> None:
    """Yield for up to ``SPIN_SECONDS`` while ``reqs`` complete: a sleep
    costs ~80 us here, a yield drops the GIL and the core for a moment."""
    start = time.monotonic()
    while time.monotonic() - start < SPIN_SECONDS:
        if all(r.completed for r in reqs):
            return
        os.sched_yield()


def wait_all(
    reqs: Sequence[Any],
    deadline: float,
    closed: threading.Event | None = None,
    max_delay: float = 5e-5,
) -> None:
    """Block until every request completes; the progress thread does the work.

    Polls with a backoff capped at ``max_delay`` (50 us inside a batch):
    UCXX offers Python no completion callback without an event loop.
    """
    _spin(reqs)
    delay = 1e-6
    while not all(r.completed for r in reqs):
        if time.monotonic() > deadline or (closed is not None and closed.is_set()):
            raise TimeoutError
        time.sleep(delay)
        delay = min(delay * 2, max_delay)
    for r in reqs:
        r.check_error()


class _Peer:
    """This engine's connection to another engine: an endpoint and an id it knows us by."""

    def __init__(self, ep: Any, conn: int) -> None:
        self.ep = ep
        self.conn = conn
        self.seq = itertools.count()


class UcxEngine(TransferEngine):
    backend = "ucx"

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        self._ctx, self._worker = make_worker()
        self.endpoint = "ucx://" + self._worker.address.tobytes().hex()
        self._peers: dict[str, _Peer] = {}  # endpoint -> our connection to it
        self._clients: dict[int, Any] = {}  # connection id -> endpoint back to that initiator
        self._peers_lock = threading.Lock()
        self._stop = threading.Event()
        self._granted = threading.Event()  # wakes a parked accept loop
        self._stuck: list[Any] = []  # requests abandoned at a timeout, kept alive with their memory
        self._handlers = ThreadPoolExecutor(config.workers, thread_name_prefix="xfer-ucx-peer")
        self._loop = threading.Thread(target=self._serve, name="xfer-ucx-accept", daemon=True)
        self._loop.start()

    def _on_grant(self) -> None:
        self._granted.set()  # a peer will come: the accept loop polls fast again

    # -- initiator --------------------------------------------------------------
    def _connect(self, endpoint: str) -> _Peer:
        with self._peers_lock:
            peer = self._peers.get(endpoint)
            if peer is not None:
                return peer
            try:
                address = ucx_api.UCXAddress.create_from_buffer(bytes.fromhex(endpoint[6:]))
                ep = ucx_api.UCXEndpoint.create_from_worker_address(self._worker, address, False)
            except (ValueError, ucx_api.UCXError) as e:
                raise PeerError(endpoint, f"cannot reach: {e}") from None
            peer = _Peer(ep, int.from_bytes(os.urandom(3), "little"))
            mine = self._worker.address.tobytes()
            hello = np.frombuffer(
                pack_header(Kind.HELLO, len(mine)) + CONN.pack(peer.conn, 0) + mine, np.uint8
            ).copy()
            self._wait([peer.ep.tag_send(Array(hello), tag(REQ, peer.conn))], endpoint)
            self._peers[endpoint] = peer
            return peer

    def _drop(self, endpoint: str) -> None:
        with self._peers_lock:
            peer = self._peers.pop(endpoint, None)
        if peer is not None:
            with contextlib.suppress(Exception):
                peer.ep.close()

    def _wait(self, reqs: Sequence[Any], endpoint: str) -> None:
        try:
            wait_all(reqs, time.monotonic() + self.config.timeout, self._stop)
        except TimeoutError:
            self._stuck.append(reqs)
            self._drop(endpoint)
            raise TransferTimeoutError(
                endpoint, f"no answer within {self.config.timeout} s"
            ) from None
        except ucx_api.UCXError as e:
            self._drop(endpoint)
            raise PeerError(endpoint, f"UCX: {e}") from None

    def _execute(self, endpoint: str, items: Sequence[Transfer]) -> np.ndarray:
        peer = self._connect(endpoint)
        seq = next(peer.seq) & 0xFFFF
        pieces = one_lane(items)
        entries = encode(pieces)
        head = pack_header(Kind.REQUEST, len(entries)) + CONN.pack(peer.conn, seq)
        request = np.concatenate([np.frombuffer(head, np.uint8), entries.view(np.uint8)])
        statuses = np.empty(len(entries), np.uint8)
        final = np.empty(len(entries), np.uint8)
        got_status = self._worker.tag_recv(Array(statuses), tag(STATUS, peer.conn, seq))
        got_done = self._worker.tag_recv(Array(final), tag(DONE, peer.conn, seq))
        sent = peer.ep.tag_send(Array(request), tag(REQ, peer.conn, seq))
        try:
            self._wait([sent, got_status], endpoint)
        except PeerError:
            self._stuck.append((got_done, final))  # still posted: keep its buffer alive
            raise
        reqs = [got_done]
        for i, p in enumerate(pieces):
            if statuses[i] != Status.OK or not p.local.nbytes:
                continue
            t = tag(DATA, peer.conn, seq, i)
            if p.op == Op.READ:
                reqs.append(self._worker.tag_recv(Array(p.local), t))
            else:
                reqs.append(peer.ep.tag_send(Array(p.local), t))
        self._wait(reqs, endpoint)
        return final

    # -- peer -------------------------------------------------------------------
    def _serve(self) -> None:
        """Receive REQUEST/HELLO messages from any initiator and hand them out."""
        buf = np.empty(MAX_MESSAGE, np.uint8)
        while not self._stop.is_set():
            req = self._worker.tag_recv(Array(buf), tag(REQ, 0), KIND_MASK)
            try:
                self._next_message(req)
            except TimeoutError:
                return  # closing
            except ucx_api.UCXError:
                continue  # a truncated or cancelled message: drop it
            try:
                kind, count, _ = unpack_header(buf[: HEADER.size].tobytes())
                conn, seq = CONN.unpack_from(buf.data, HEADER.size)
            except (ProtocolError, struct.error):
                continue
            body = HEADER.size + CONN.size
            if kind == Kind.HELLO:
                self._hello(conn, buf[body : body + count].tobytes())
            elif kind == Kind.REQUEST:
                entries = buf[body : body + count * ENTRY.itemsize].copy().view(ENTRY)
                self._handlers.submit(self._answer, conn, seq, entries)

    def _next_message(self, req: Any) -> None:
        """Wait for the accept loop's receive: fast for ``HOT_SECONDS`` after
        a message or a grant, then every ``IDLE_DELAY`` or, with no grant
        live, every ``PARKED_DELAY``; a grant wakes it at once. TimeoutError
        once the engine closes."""
        _spin([req])
        hot_until, delay = time.monotonic() + HOT_SECONDS, 1e-6
        while not req.completed:
            if self._stop.is_set():
                raise TimeoutError
            if self._granted.wait(delay):
                self._granted.clear()
                hot_until, delay = time.monotonic() + HOT_SECONDS, 1e-6
                continue
            if time.monotonic() < hot_until:
                cap = 5e-5
            else:
                cap = IDLE_DELAY if self.regions.live_grants() else PARKED_DELAY
            delay = min(delay * 2, cap)
        req.check_error()

    def _hello(self, conn: int, address: bytes) -> None:
        try:
            addr = ucx_api.UCXAddress.create_from_buffer(address)
            ep = ucx_api.UCXEndpoint.create_from_worker_address(self._worker, addr, False)
        except (ValueError, ucx_api.UCXError):
            return
        with self._peers_lock:
            old = self._clients.get(conn)
            self._clients[conn] = ep
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()

    def _answer(self, conn: int, seq: int, entries: np.ndarray) -> None:
        ep = self._clients.get(conn)
        if ep is None:
            return  # no HELLO: nowhere to reply
        stack = contextlib.ExitStack()
        views = stack.enter_context(self.regions.lease(entries))
        reqs = []
        for i, (e, view) in enumerate(zip(entries, views, strict=True)):
            if view is None or not view.nbytes:
                continue
            t = tag(DATA, conn, seq, i)
            if e["op"] == Op.WRITE:
                reqs.append(self._worker.tag_recv(Array(view), t))
        statuses = entries["status"].copy()
        reqs.append(ep.tag_send(Array(statuses), tag(STATUS, conn, seq)))
        for i, (e, view) in enumerate(zip(entries, views, strict=True)):
            if view is not None and view.nbytes and e["op"] == Op.READ:
                reqs.append(ep.tag_send(Array(view), tag(DATA, conn, seq, i)))
        try:
            wait_all(reqs, time.monotonic() + self.config.timeout, self._stop)
        except (TimeoutError, ucx_api.UCXError):
            # The initiator vanished. Posted receives may still land in the
            # regions, so they stay leased (unregister refuses) rather than
            # being handed back while UCX can write into them.
            self._stuck.append((stack, reqs))
            return
        stack.close()
        done = np.ascontiguousarray(statuses)
        with contextlib.suppress(ucx_api.UCXError, TimeoutError):
            wait_all([ep.tag_send(Array(done), tag(DONE, conn, seq))], time.monotonic() + 1)

    # -- lifetime ---------------------------------------------------------------
    def _shutdown(self) -> None:
        self._stop.set()
        self._granted.set()
        self._loop.join(self.config.timeout)
        self._handlers.shutdown(wait=True, cancel_futures=True)
        with self._peers_lock:
            eps = [p.ep for p in self._peers.values()] + list(self._clients.values())
            self._peers.clear()
            self._clients.clear()
        for ep in eps:
            with contextlib.suppress(Exception):
                ep.close()
        with contextlib.suppress(Exception):
            self._worker.cancel_inflight_requests()
        self._worker.stop_progress_thread()
