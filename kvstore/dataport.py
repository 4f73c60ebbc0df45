"""The data port: a node's Put, Get, Lookup, Exists and Delete in one round
trip on a kept-open TCP connection, payload and all.

An empty gRPC call costs about 0.5 ms here, a plain socket round trip
30 us (``../shared/MACHINE-FACTS.md``); a get over gRPC and a transfer engine
is two conversations (the call, then the engine's). For the batches engines
ask for most (a prompt's blocks of 16-64 KiB) those fixed costs were most of
the time, so a batch up to ``stream_max`` bytes rides this port instead: the
request frame carries the blocks of a put, the reply frame those of a get,
straight between the node's DRAM pool and the caller's buffers.

    frame   = magic "KVDP" | version u8 | code u8 | flags u16 | body u32 | payload u64
    request : code = a method (HELLO, PUT, GET, ...), body = its protobuf request
              (HELLO: the token), payload = a put's blocks back to back in key order;
              a Put with flag CHECKSUMS_AFTER ends its payload with each block's
              XXH3 (u64 little-endian, key order), taken as the blocks went out,
              in place of the request's ``checksums``; no other flag is defined
    reply   : code = OK, body = the protobuf reply, payload = a get's found
              blocks in key order; or code = ERROR, body = JSON {type, code,
              detail, stored}, no payload

A connection starts with HELLO and the token a gRPC call carries in its
``authorization`` header; the node answers OK, or an ``AuthError`` and
closes. Every later request runs the same handler as its gRPC twin, with the
tenants that token grants, so the port grants nothing gRPC does not.
"""

from __future__ import annotations

import json
import select
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from kvstore.checksum import ArrivalDigests
from kvstore.errors import (
    DataPortRefusedError,
    KVStoreError,
    PeerError,
    StoreFullError,
    TransferTimeoutError,
    from_status,
)
from kvstore.rpc import with_busy_retries
from kvstore.wire import METHODS
from transfer.protocol import ProtocolError
from transfer.sockets import (
    Buffer,
    ConnectionPool,
    Received,
    recv_header,
    recv_into,
    recv_into_all,
    send_all,
)

MAGIC = b"KVDP"
VERSION = 1
FRAME = struct.Struct("<4sBBHIQ")
HELLO = 0
OK, ERROR = 0, 1
CHECKSUMS_AFTER = 1  # the frame flag of a Put whose checksums trail its blocks
DIGEST = np.dtype("<u8")  # one trailing checksum
# request codes; HELLO is 0
CODES = {"Put": 1, "Get": 2, "Lookup": 3, "Exists": 4, "Delete": 5}
NAMES = {code: name for name, code in CODES.items()}
IDLE_TIMEOUT = 60.0  # the node drops a connection silent this long between frames
HELLO_TIMEOUT = 10.0  # ... and one that has not said HELLO by then
CONNECT_TIMEOUT = 3.0  # a node that does not accept by then is down (gRPC fails faster)
LIVENESS_S = 2  # a link silent this long under a call is dead (see keep_alive)


def keep_alive(sock: socket.socket) -> None:
    """Fail a call to a node behind a cut link in about ``LIVENESS_S``, as
    gRPC's keepalive does, not at its deadline: probe an idle link every
    second, and give up on bytes left unacknowledged that long."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (
        (socket.TCP_KEEPIDLE, 1),
        (socket.TCP_KEEPINTVL, 1),
        (socket.TCP_KEEPCNT, LIVENESS_S),
        (socket.TCP_USER_TIMEOUT, LIVENESS_S * 1000),
    ):
        sock.setsockopt(socket.IPPROTO_TCP, opt, value)


def frame(code: int, body: bytes, payload: int = 0, flags: int = 0) -> bytes:
    return FRAME.pack(MAGIC, VERSION, code, flags, len(body), payload)


def read_head(sock: socket.socket, max_body: int) -> tuple[int, int, int, int] | None:
    """The next frame's code, body length, payload length (both left on the
    socket) and flags, or None on a clean close between frames."""
    head = recv_header(sock, FRAME.size)
    if head is None:
        return None
    magic, version, code, flags, body_len, payload = FRAME.unpack(head)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"not a kvstore data-port frame (magic {bytes(magic)!r} v{version})")
    if body_len > max_body:
        raise ProtocolError(f"a {body_len}-byte frame body; at most {max_body}")
    return code, body_len, payload, flags


def read_body(sock: socket.socket, n: int) -> bytearray:
    body = bytearray(n)
    if n:
        recv_into(sock, body)
    return body


def read_frame(sock: socket.socket, max_body: int) -> tuple[int, bytearray, int] | None:
    """The next frame's code, body and payload length (the payload itself is
    left on the socket), or None on a clean close between frames."""
    head = read_head(sock, max_body)
    if head is None:
        return None
    code, body_len, payload, flags = head
    if flags:
        raise ProtocolError(f"frame flags {flags:#x} where none are defined")
    return code, read_body(sock, body_len), payload


def error_body(e: KVStoreError) -> bytes:
    stored = getattr(e, "stored", None)
    return json.dumps(
        {
            "type": type(e).__name__,
            "code": e.grpc_code,
            "detail": str(e),
            "stored": stored if isinstance(stored, int) else 0,
        }
    ).encode()


def error_from(body: bytes | bytearray) -> KVStoreError:
    """The error the node sent, as the class it raised (as ``kvstore.rpc`` does for gRPC)."""
    try:
        d = json.loads(bytes(body))
        err = from_status(str(d["type"]), str(d["code"]), str(d["detail"]))
    except (ValueError, KeyError, TypeError):
        raise ProtocolError("an error frame that is not JSON") from None
    if isinstance(err, StoreFullError):
        err.stored = int(d.get("stored", 0))
    return err


# reply -> where its payload goes, in order, and what to tell as it arrives
Landing = Callable[[Any], tuple[Sequence[np.ndarray], Received | None]]


@dataclass(frozen=True)
class PutBlocks:
    """A put's payload, sent after its request (so the node reserves room,
    or starts pulling, while the client builds its views or hashes).

    ``sizes``: the blocks' sizes. ``build`` lays out the blocks riding on
    this socket (buffers in order, each holding whole blocks); with
    ``checksummed`` each is hashed once its piece is in the kernel and the
    checksums follow the blocks (``CHECKSUMS_AFTER``). Without ``build`` the
    blocks move by the engine (the request names the client's regions) and
    ``checksums``, if given, takes their checksums while the node pulls
    them: they alone follow the request."""

    sizes: Sequence[int]
    build: Callable[[], Sequence[np.ndarray]] | None
    checksummed: bool = False
    checksums: Callable[[], list[int]] | None = None

    @property
    def trailer(self) -> bool:
        return self.checksummed or self.checksums is not None

    @property
    def wire_bytes(self) -> int:
        blocks = sum(self.sizes) if self.build is not None else 0
        return blocks + (len(self.sizes) * DIGEST.itemsize if self.trailer else 0)


class _Answered(Exception):
    """The node answered while a put's payload was still going out."""


class _Sender:
    """Sends one put's payload, built on first use and kept for a repeat on
    a new connection; with a trailer, each block is hashed once the piece
    holding it has been handed to the kernel, so the hashing runs while the
    node receives. Between pieces it looks for an answer: the node answers
    mid-payload only to refuse the request (a full store, a wrong namespace),
    and then the rest of up to ``stream_max`` bytes need not cross."""

    def __init__(self, put: PutBlocks) -> None:
        self._put = put
        self._bufs: Sequence[np.ndarray] | None = None
        self._digests: list[int] | None = None

    def send(self, sock: socket.socket) -> bool:
        """True once the whole payload is sent; False where the node answered first."""
        put = self._put
        if put.build is None:  # the engine moves the blocks; their checksums alone go here
            if put.checksums is not None and self._digests is None:
                self._digests = put.checksums()
        else:
            if self._bufs is None:
                self._bufs = put.build()
            hashed = None
            if put.checksummed and self._digests is None:
                hashed = ArrivalDigests(self._bufs, put.sizes)
            total = sum(b.nbytes for b in self._bufs)

            def progress(sent: int) -> None:
                if hashed is not None:
                    hashed(sent)
                if sent < total and select.select([sock], [], [], 0)[0]:
                    raise _Answered

            try:
                send_all(sock, self._bufs, progress)
            except _Answered:
                return False
            if hashed is not None:
                self._digests = hashed.digests  # whole: the send went through
        if self._digests is not None:
            send_all(sock, [np.array(self._digests, DIGEST)])
        return True


class DataPortClient:
    """Calls on one node's data port over a pool of authenticated connections.

    Thread-safe: each call takes a connection of its own. A call on a pooled
    connection the node has meanwhile dropped is made once more on a new one
    (every method here may be repeated: a put of the same key stores the same
    bytes)."""

    def __init__(self, host: str, port: int, *, token: str, timeout: float, max_body: int) -> None:
        self.endpoint = f"tcp://{host}:{port}"
        self._token = token.encode()
        self._max_body = max_body
        self._pool = ConnectionPool(
            timeout, IDLE_TIMEOUT / 2, greet=self._hello, connect_timeout=CONNECT_TIMEOUT
        )

    def connect(self) -> None:
        """Open (and pool) one connection now: the port is reachable and takes
        the token, or this raises what a call would."""
        try:
            sock, _ = self._pool.take(self.endpoint)
        except PeerError as e:
            raise DataPortRefusedError(self.endpoint, str(e)) from None
        self._pool.put(self.endpoint, sock)

    def _hello(self, sock: socket.socket) -> None:
        keep_alive(sock)
        send_all(sock, [frame(HELLO, self._token), self._token])
        self._answer(sock)

    def call(
        self,
        method: str,
        request: Any,
        land: Landing | None = None,
        *,
        put: PutBlocks | None = None,
    ) -> Any:
        """``method``'s reply; ``land``: given the reply, the buffers a get's
        blocks are received into; ``put``: a put's blocks, sent after the
        request."""
        body = request.SerializeToString()
        nbytes = 0 if put is None else put.wire_bytes
        flags = CHECKSUMS_AFTER if put is not None and put.trailer else 0
        out = [frame(CODES[method], body, nbytes, flags), body]
        sender = None if put is None else _Sender(put)
        return with_busy_retries(lambda: self._call(method, out, land, sender))

    def _call(
        self, method: str, out: list[Buffer], land: Landing | None, sender: _Sender | None
    ) -> Any:
        for attempt in (0, 1):
            try:
                sock, reused = self._pool.take(self.endpoint)
            except PeerError as e:  # no connection: nothing was sent
                raise DataPortRefusedError(self.endpoint, str(e)) from None
            whole = True  # the request went out whole (else the node waits for the rest)
            try:
                send_all(sock, out)  # alone: the node starts on it while the payload follows
                if sender is not None:
                    whole = sender.send(sock)
                body, payload = self._answer(sock)
                if not whole:
                    raise ProtocolError("an OK answer before the request's payload was sent")
            except KVStoreError:  # a whole error frame
                if whole:  # the link is still in step
                    self._pool.put(self.endpoint, sock)
                else:
                    sock.close()
                raise
            except (OSError, ProtocolError) as e:
                sock.close()
                if reused and attempt == 0 and not isinstance(e, TimeoutError):
                    continue  # the node dropped an idle connection: once more, on a new one
                raise self._failed(e) from None
            except BaseException:
                sock.close()
                raise
            try:
                reply = METHODS[method].reply.FromString(bytes(body))
                if payload:
                    bufs, progress = land(reply) if land is not None else ((), None)
                    views = list(bufs)
                    if sum(v.nbytes for v in views) != payload:
                        raise ProtocolError(f"a {payload}-byte payload for the reply's blocks")
                    recv_into_all(sock, views, progress)
            except (OSError, ProtocolError, DecodeError) as e:
                sock.close()
                raise self._failed(e) from None
            except BaseException:
                sock.close()
                raise
            self._pool.put(self.endpoint, sock)
            return reply
        raise AssertionError("not reached")

    def _failed(self, e: Exception) -> PeerError:
        if isinstance(e, TimeoutError):
            return TransferTimeoutError(self.endpoint, "no answer in time")
        return PeerError(self.endpoint, f"{type(e).__name__}: {e}")

    def _answer(self, sock: socket.socket) -> tuple[bytearray, int]:
        """An OK frame's body and payload length; an ERROR frame raises its error."""
        got = read_frame(sock, self._max_body)
        if got is None:
            raise ConnectionResetError("the node closed the connection")
        code, body, payload = got
        if code == ERROR:
            if payload:
                raise ProtocolError("an error frame with a payload")
            raise error_from(body)
        if code != OK:
            raise ProtocolError(f"reply code {code}")
        return body, payload

    def close(self) -> None:
        self._pool.close()
