"""The node's side of the data port (protocol in ``kvstore.dataport``).

Each connection is a thread of a ``SocketServer`` (bounded in number, as the
transfer engine's are). Its HELLO names a token, which the gRPC service's
``Authorizer`` turns into tenants once; each request then runs the service's
own handler with them, counted and timed as a gRPC call is. A put's blocks
are received straight into the pool extents its plan reserved, a get's sent
straight from the pinned pool. A request the node refuses before reading
its payload is answered at once and its payload then read past (at most
``stream_max`` bytes, counted as ``refused``), so the connection stays
usable; a client that sees the answer while still sending stops and drops
the link instead. Bytes that are not this protocol drop the link.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from kvstore.checksum import ArrivalDigests
from kvstore.dataport import (
    CHECKSUMS_AFTER,
    DIGEST,
    ERROR,
    HELLO,
    HELLO_TIMEOUT,
    IDLE_TIMEOUT,
    NAMES,
    OK,
    error_body,
    frame,
    read_body,
    read_frame,
    read_head,
)
from kvstore.errors import (
    ChecksumMismatchError,
    InvalidArgumentError,
    KVStoreError,
    PayloadSizeError,
)
from kvstore.keys import KEY_BYTES
from kvstore.node.auth import Tenants
from kvstore.node.service import Fill, KVStoreService, Source
from kvstore.store import PutPlan
from kvstore.wire import AUTH_HEADER, METHODS
from transfer.protocol import ProtocolError
from transfer.sockets import Received, SocketServer, discard_views, recv_into_all, send_all

log = logging.getLogger(__name__)

VIA = "dataport"  # the transfer_bytes label of payloads that moved here
READ_PAST = "refused"  # ... and of the bytes of refused requests, read past
DRAIN_CHUNK = 256 << 10  # bytes read past at a time (a refused request's)


class _Payload:
    """Bytes of one request still on the socket (its body, its payload)."""

    def __init__(self, sock: socket.socket, nbytes: int) -> None:
        self.sock = sock
        self.left = nbytes

    def read(self) -> bytearray:
        n, self.left = self.left, 0
        return read_body(self.sock, n)

    def receive(self, views: list[np.ndarray], progress: Received | None = None) -> None:
        """Into ``views``, which hold exactly what is left (``_receiver`` checked)."""
        self.left = 0  # from here a failure leaves the link out of step: it drops
        recv_into_all(self.sock, views, progress)

    def drain(self, counted: Received) -> None:
        """Read past what is left; ``counted`` is told the bytes read, also
        when the client gives up part way (it then closes the link)."""
        if self.left:
            scratch = np.empty(min(self.left, DRAIN_CHUNK), np.uint8)
            views, self.left, done = discard_views(self.left, scratch), 0, 0

            def seen(received: int) -> None:
                nonlocal done
                done = received

            try:
                recv_into_all(self.sock, views, seen)
            finally:
                counted(done)


class DataPortServer:
    """Listens on ``host:port`` and serves each connection in its own thread
    until it closes, goes silent or speaks out of protocol."""

    def __init__(self, service: KVStoreService, host: str, port: int, max_conns: int) -> None:
        self._svc = service
        self._stream_max = service.config.server.stream_max
        self._max_body = service.config.server.max_message
        self._timeout = service.config.transfer.timeout
        self._server = SocketServer(host, port, self._serve, "kvstore-data", max_conns)
        self.port = self._server.port

    def close(self, timeout: float = 5.0) -> None:
        self._server.close(timeout)

    # -- one connection ---------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(HELLO_TIMEOUT)
        got = read_frame(sock, 4096)
        if got is None:
            return
        code, body, payload = got
        if code != HELLO or payload:
            raise ProtocolError("a data-port connection must start with HELLO")
        try:
            tenants = self._svc.auth.tenants_of([(AUTH_HEADER, f"Bearer {body.decode()}")])
        except (KVStoreError, UnicodeDecodeError) as e:
            err = e if isinstance(e, KVStoreError) else InvalidArgumentError("token is not UTF-8")
            raw = error_body(err)
            send_all(sock, [frame(ERROR, raw), raw])
            return
        send_all(sock, [frame(OK, b"")])
        while True:
            sock.settimeout(IDLE_TIMEOUT)
            try:
                head = read_head(sock, self._max_body)
            except TimeoutError:
                return  # silent too long: the client's pool retires it before this
            if head is None:
                return
            sock.settimeout(self._timeout)
            code, body_len, nbytes, flags = head
            name = NAMES.get(code)
            if name is None:
                raise ProtocolError(f"unknown data-port request code {code}")
            if flags and (name != "Put" or flags != CHECKSUMS_AFTER):
                raise ProtocolError(f"frame flags {flags:#x} on a {name}")
            trailer = bool(flags)
            # a trailer holds a checksum per key, and each key takes 16 body bytes
            limit = self._stream_max + (body_len // KEY_BYTES * DIGEST.itemsize if trailer else 0)
            if nbytes > limit:
                raise ProtocolError(f"a {nbytes}-byte payload; this node takes {self._stream_max}")
            self._call(
                sock, name, _Payload(sock, body_len), _Payload(sock, nbytes), tenants, trailer
            )

    def _call(
        self,
        sock: socket.socket,
        name: str,
        body: _Payload,
        payload: _Payload,
        tenants: Tenants,
        trailer: bool,
    ) -> None:
        """One request. Its body is read into memory from the node's scratch
        budget (``server.scratch_memory``, shared with every call), so many
        connections sending large bodies at once cannot grow the node past
        it; the payload goes straight to where the handler puts it."""
        svc, m = self._svc, METHODS[name]
        svc.counts.call(name)
        t0 = time.perf_counter()
        sent = False

        def send(reply: Any, views: list[np.ndarray]) -> None:
            nonlocal sent
            raw = reply.SerializeToString()
            sent = True
            send_all(sock, [frame(OK, raw, sum(v.nbytes for v in views)), raw, *views])

        try:
            with svc.scratch.hold(body.left, f"a data-port {name} request"):
                try:
                    request = m.request.FromString(bytes(body.read()))
                except DecodeError as e:
                    raise InvalidArgumentError(f"malformed {m.request.__name__}: {e}") from None
            if name == "Get":
                svc.get_sent(request, tenants, send, VIA)
            elif name == "Put":
                if trailer and request.checksums:
                    raise InvalidArgumentError(
                        "a put's checksums go in its body or after it, not both"
                    )
                if request.WhichOneof("payload") == "refs":  # the engine pulls the blocks
                    pull, via = svc.pulled(request)
                    source: Source = functools.partial(_pulled, pull, payload, trailer=trailer)
                else:
                    source, via = functools.partial(_receiver, payload, trailer=trailer), VIA
                send(svc.put(request, tenants, source, via), [])
            else:
                if payload.left:
                    raise InvalidArgumentError(f"{name} takes no payload")
                send(getattr(svc, name)(request, tenants), [])
        except KVStoreError as e:
            svc.counts.failed(name, e.grpc_code)
            if sent:  # the client has its whole reply; a second frame would be out of step
                log.warning("data port: %s failed after its reply was sent: %s", name, e)
                return
            # refused before its bytes were read: the answer first (a client
            # still sending stops and drops the link), then read past them
            err = error_body(e)
            send_all(sock, [frame(ERROR, err), err])
            read_past = functools.partial(svc.counts.moved, "in", READ_PAST)
            body.drain(read_past)
            payload.drain(read_past)
        except (OSError, ProtocolError) as e:  # the client stalled, left or spoke garbage
            svc.counts.failed(
                name, "DEADLINE_EXCEEDED" if isinstance(e, TimeoutError) else "UNAVAILABLE"
            )
            raise  # the link is out of step: the server drops it
        except Exception:
            svc.counts.failed(name, "INTERNAL")
            raise  # logged by the server; the connection drops
        finally:
            svc.counts.observe(name, time.perf_counter() - t0)


def _receiver(payload: _Payload, sizes: list[int], trailer: bool) -> Fill:
    """A put's Fill: the payload received into the plan's buffers, each
    block checksummed as it lands (while the client's next bytes travel);
    with ``trailer`` the client's checksums follow the blocks, and a block
    that does not match them stores nothing."""
    tail = np.empty(len(sizes) if trailer else 0, DIGEST)
    if payload.left != sum(sizes) + tail.nbytes:
        raise PayloadSizeError(sum(sizes) + tail.nbytes, payload.left, what="data-port payload")

    def fill(plan: PutPlan) -> list[int]:
        views, spare = _put_views(plan, sizes)
        hashed = ArrivalDigests(views, sizes, spare)
        payload.receive([*views, tail], hashed)
        digests = [hashed.digests[w.index] for w in plan.writes]
        if trailer:
            _check_trailer(plan, digests, tail)
        return digests

    return fill


def _pulled(pull: Source, payload: _Payload, sizes: list[int], trailer: bool) -> Fill:
    """A put's Fill whose request came here but whose blocks the engine
    pulls from the client's regions (``pull``); with ``trailer`` the
    client's checksums follow the request, taken while the node pulled, and
    a block that does not match them stores nothing."""
    tail = np.empty(len(sizes) if trailer else 0, DIGEST)
    if payload.left != tail.nbytes:
        raise PayloadSizeError(tail.nbytes, payload.left, what="data-port payload of an engine put")
    fill = pull(sizes)

    def pulled(plan: PutPlan) -> list[int] | None:
        digests = fill(plan)
        if trailer:
            payload.receive([tail])
            assert digests is not None  # the pull hashes what landed
            _check_trailer(plan, digests, tail)
        return digests

    return pulled


def _check_trailer(plan: PutPlan, digests: list[int], tail: np.ndarray) -> None:
    """Each write's checksum as it landed against the client's (``tail``)."""
    sent = tail.tolist()
    bad = [w.index for w, d in zip(plan.writes, digests, strict=True) if d != sent[w.index]]
    if bad:
        raise ChecksumMismatchError(bad)


def _put_views(plan: PutPlan, sizes: list[int]) -> tuple[list[np.ndarray], set[int]]:
    """Where a put's blocks land, in key order, as few buffers as they lie
    in: a run of writes back to back in one host buffer (fresh pool chunks
    of one size) is one view; a block the plan does not store (the indices
    returned) lands in a scratch view that soaks it up."""
    writes = plan.writes
    by_index = None if len(writes) == len(sizes) else {w.index: w for w in writes}
    hosts: dict[int, np.ndarray] = {}
    spare: np.ndarray | None = None
    views, unstored = [], set()
    host = None
    start = end = 0
    for i, n in enumerate(sizes):
        w = writes[i] if by_index is None else by_index.get(i)
        if w is not None:
            at = w.host_offset
            whole = hosts.get(id(w.host))
            if whole is None:
                whole = hosts[id(w.host)] = w.host.numpy()
            if whole is host and at == end:
                end += n
                continue
            if host is not None:
                views.append(host[start:end])
            host, start, end = whole, at, at + n
            continue
        if host is not None:
            views.append(host[start:end])
            host = None
        if spare is None or spare.nbytes < n:
            spare = np.empty(max(sizes), np.uint8)
        views.append(spare[:n])
        unstored.add(i)
    if host is not None:
        views.append(host[start:end])
    return views, unstored
