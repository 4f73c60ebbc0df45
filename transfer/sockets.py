"""Socket plumbing shared by the tcp and shm backends: zero-copy send and
receive of buffer lists, a threaded listener, and a pool of idle connections.

Bytes go out with ``sendmsg`` over the caller's views (one syscall for many
buffers) and come in with ``recv_into`` straight into region memory; nothing
on this path builds a ``bytes`` object per transfer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
import socket
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from kvstore.errors import PeerError, TransferTimeoutError
from transfer.base import TransferEngine
from transfer.config import TransferConfig
from transfer.protocol import HEADER, Kind, ProtocolError, new_entries, unpack_header

log = logging.getLogger(__name__)

IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)
SOCK_BUF = 8 << 20
# Bytes one receive call may take. A call copying megabytes holds the socket
# while the sender's segments queue behind it (the kernel's backlog): 4 MiB
# over loopback took 1.3-1.4 ms in whole-buffer calls, 0.8 ms in 128 KiB ones.
RECV_CHUNK = 128 << 10
# Bytes a send call takes when the caller works between pieces: 128 KiB
# pieces ran at half the speed of whole sends there, 1 MiB ones at full.
SEND_PIECE = 1 << 20
Buffer = np.ndarray | bytes | memoryview
Received = Callable[[int], None]  # told the bytes received so far
Sent = Callable[[int], None]  # told the bytes sent so far


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)


def as_memoryview(buf: np.ndarray | bytes | bytearray | memoryview) -> memoryview:
    return (buf.data if isinstance(buf, np.ndarray) else memoryview(buf)).cast("B")


def _window(pending: list[memoryview], i: int, limit: int) -> list[memoryview]:
    """The buffers from ``pending[i]`` on that one call moves: at most
    ``IOV_MAX`` of them and ``limit`` bytes (the last one cut to fit)."""
    iov: list[memoryview] = []
    for v in pending[i : i + IOV_MAX]:
        if len(v) >= limit:
            iov.append(v[:limit])
            break
        iov.append(v)
        limit -= len(v)
    return iov


def _advance(pending: list[memoryview], i: int, moved: int) -> int:
    """Past ``moved`` bytes from ``pending[i]`` on; the first unfinished index."""
    while i < len(pending) and moved >= len(pending[i]):
        moved -= len(pending[i])
        i += 1
    if moved:
        pending[i] = pending[i][moved:]
    return i


def send_all(sock: socket.socket, bufs: Sequence[Buffer], progress: Sent | None = None) -> None:
    """Send every buffer in order with as few ``sendmsg`` calls as the kernel
    allows. With ``progress`` the bytes go in pieces of ``SEND_PIECE``, and
    it is told the bytes sent so far after each (work on what has gone
    out, a checksum, then runs while the peer receives it)."""
    pending = [as_memoryview(b) for b in bufs if len(b)]
    limit = SEND_PIECE if progress is not None else 1 << 62
    i = sent_all = 0
    while i < len(pending):
        sent = sock.sendmsg(_window(pending, i, limit))
        sent_all += sent
        i = _advance(pending, i, sent)
        if progress is not None:
            progress(sent_all)


def recv_into(sock: socket.socket, buf: np.ndarray | memoryview | bytearray) -> None:
    """Fill ``buf`` completely from the socket; EOF before that is a dead peer."""
    view = as_memoryview(buf)
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, RECV_CHUNK))
        if k == 0:
            raise ConnectionResetError(f"connection closed after {got} of {n} bytes")
        got += k


def recv_into_all(
    sock: socket.socket,
    bufs: Sequence[np.ndarray | memoryview],
    progress: Received | None = None,
) -> None:
    """Fill every buffer in order with as few ``recvmsg_into`` calls as the
    kernel allows (a batch of small blocks costs a few syscalls, not one
    each), each call taking at most ``RECV_CHUNK`` bytes. ``progress`` is
    told the bytes received so far after each call: work on what has arrived
    (a checksum) then runs while the sender's next bytes are on their way."""
    pending = [as_memoryview(b) for b in bufs if len(b)]
    i = got = 0
    while i < len(pending):
        k = sock.recvmsg_into(_window(pending, i, RECV_CHUNK))[0]
        if k == 0:
            raise ConnectionResetError(f"connection closed, {len(pending) - i} buffers unfilled")
        got += k
        i = _advance(pending, i, k)
        if progress is not None:
            progress(got)


def discard_views(n: int, scratch: np.ndarray) -> list[np.ndarray]:
    """Views of ``scratch`` that soak up ``n`` bytes (a refused write's payload)."""
    return [scratch[: min(scratch.nbytes, n - at)] for at in range(0, n, scratch.nbytes)]


def recv_header(sock: socket.socket, size: int = HEADER.size) -> bytearray | None:
    """A frame header (``size`` bytes: this protocol's by default), or None
    on a clean close between frames."""
    raw = bytearray(size)
    k = sock.recv_into(raw)
    if k == 0:
        return None
    if k < len(raw):
        recv_into(sock, memoryview(raw)[k:])
    return raw


def recv_request(
    sock: socket.socket, kind: Kind, timeout: float, idle: float
) -> tuple[np.ndarray, int] | None:
    """The next request's entries and tag, or None when the peer closed
    between frames or stayed silent for ``idle`` seconds.

    Idle pooled connections are normal, for a while; once a frame has
    started, every read is bounded by ``timeout``.
    """
    sock.settimeout(idle)
    try:
        raw = recv_header(sock)
    except TimeoutError:
        return None  # idle too long: the initiator's pool would have retired it
    if raw is None:
        return None
    sock.settimeout(timeout)
    _, count, tag = unpack_header(raw, kind)
    entries = new_entries(count)
    recv_into(sock, entries)
    return entries, tag


def recv_statuses(sock: socket.socket, endpoint: str, n: int) -> np.ndarray:
    """The peer's REPLY to a request of ``n`` entries: one status byte each."""
    raw = recv_header(sock)
    if raw is None:
        raise PeerError(endpoint, "closed the connection before replying")
    _, count, _ = unpack_header(raw, Kind.REPLY)
    if count != n:
        raise ProtocolError(f"reply has {count} statuses for {n} entries")
    statuses = np.empty(n, np.uint8)
    recv_into(sock, statuses)
    return statuses


@contextlib.contextmanager
def peer_errors(endpoint: str, timeout: float) -> Iterator[None]:
    """Turn socket failures into the engine's typed errors."""
    try:
        yield
    except TimeoutError:
        raise TransferTimeoutError(endpoint, f"no answer within {timeout} s") from None
    except ProtocolError as e:
        raise PeerError(endpoint, f"protocol error: {e}") from None
    except OSError as e:
        raise PeerError(endpoint, f"{type(e).__name__}: {e}") from None


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.split("://", 1)[1].rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise PeerError(endpoint, "endpoint has no port") from None


class ConnectionPool:
    """Idle connections per peer, so a batch does not pay a TCP handshake.

    A connection idle for ``max_idle`` seconds is closed rather than reused:
    peers drop silent connections (``TransferConfig.idle_timeout``), and this
    side retires them first so a batch never lands on one the peer dropped.
    """

    def __init__(
        self,
        timeout: float,
        max_idle: float,
        per_peer: int = 8,
        greet: Callable[[socket.socket], None] | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        """``greet``: run on each new connection before its first use (a
        handshake); a failure there closes it and propagates.
        ``connect_timeout``: how long a connect may take (default ``timeout``)."""
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self.max_idle = max_idle
        self.per_peer = per_peer
        self._greet = greet
        self._idle: dict[str, list[tuple[float, socket.socket]]] = {}
        self._lock = threading.Lock()

    def get(self, endpoint: str) -> socket.socket:
        return self.take(endpoint)[0]

    def take(self, endpoint: str) -> tuple[socket.socket, bool]:
        """A connection, and whether it was idle in the pool (a reused one may
        have been dropped by the peer meanwhile; a new one was not)."""
        stale: list[socket.socket] = []
        with self._lock:
            idle = self._idle.get(endpoint)
            fresh = time.monotonic() - self.max_idle
            while idle:
                since, sock = idle.pop()
                if since >= fresh:
                    break
                stale.append(sock)
            else:
                sock = None
        for s in stale:
            s.close()
        if sock is not None:
            return sock, True
        with peer_errors(endpoint, self.connect_timeout):
            sock = socket.create_connection(split_endpoint(endpoint), timeout=self.connect_timeout)
        sock.settimeout(self.timeout)
        tune(sock)
        if self._greet is not None:
            try:
                with peer_errors(endpoint, self.timeout):
                    self._greet(sock)
            except BaseException:
                sock.close()
                raise
        return sock, False

    def put(self, endpoint: str, sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(endpoint, [])
            if len(idle) < self.per_peer:
                idle.append((time.monotonic(), sock))
                return
        sock.close()

    @contextlib.contextmanager
    def connection(self, endpoint: str) -> Iterator[socket.socket]:
        """A connection that goes back to the pool only if the exchange finished cleanly."""
        sock = self.get(endpoint)
        try:
            with peer_errors(endpoint, self.timeout):
                yield sock
        except BaseException:
            sock.close()
            raise
        self.put(endpoint, sock)

    def close(self) -> None:
        with self._lock:
            for idle in self._idle.values():
                for _, sock in idle:
                    sock.close()
            self._idle.clear()


class SocketServer:
    """Accepts connections on one port and runs ``handle(sock)`` for each in a thread.

    ``handle`` returns when the peer closes; any exception drops that one
    connection and is logged, the server keeps serving. Past ``max_conns``
    live connections (and never more than a quarter of the process's open-file
    limit, so peers cannot starve the rest of the process of descriptors) a
    new one is closed at once; running out of descriptors (EMFILE) pauses
    accepting briefly, it never ends the loop.
    """

    def __init__(
        self,
        host: str,
        port: int,
        handle: Callable[[socket.socket], Any],
        name: str,
        max_conns: int = 256,
    ):
        self._handle = handle
        self._name = name
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._max_conns = max_conns if soft == resource.RLIM_INFINITY else min(max_conns, soft // 4)
        self.refused = 0  # connections closed at once: over max_conns
        self._listener = socket.create_server((host, port), backlog=128)
        self.host, self.port = self._listener.getsockname()[:2]
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name=f"{name}-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError as e:
                if self._closed or e.errno in (errno.EBADF, errno.EINVAL):
                    return  # listener closed
                # out of descriptors or memory, or a peer gave up mid-handshake:
                # wait for connections to close, then go on serving
                log.warning("%s: accept failed (%s); retrying", self._name, e)
                time.sleep(0.05)
                continue
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                if len(self._conns) >= self._max_conns:
                    self.refused += 1
                    sock.close()
                    continue
                tune(sock)
                t = threading.Thread(target=self._serve, args=(sock,), name=self._name, daemon=True)
                self._conns.add(sock)
                self._threads.add(t)
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._handle(sock)
        except (OSError, ProtocolError) as e:
            if not self._closed:
                log.info("%s: dropped a connection: %s", self._name, e)
        except Exception:
            log.exception("%s: connection handler failed", self._name)
        finally:
            sock.close()
            with self._lock:
                self._conns.discard(sock)
                self._threads.discard(threading.current_thread())

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._closed = True
            conns, threads = list(self._conns), list(self._threads)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(timeout)
        for t in threads:
            t.join(timeout)


class SocketEngine(TransferEngine):
    """An engine whose peers reach it through a ``SocketServer`` (tcp, shm)."""

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        self._server = SocketServer(
            config.host, config.port, self._serve, f"{self.backend}-peer", config.max_connections
        )
        self.endpoint = f"{self.backend}://{config.host}:{self._server.port}"
        self._conns = ConnectionPool(config.timeout, config.idle_timeout / 2)

    @abstractmethod
    def _serve(self, sock: socket.socket) -> None:
        """Answer one connection's frames until the peer closes it."""

    def _shutdown(self) -> None:
        self._server.close()
        self._conns.close()
