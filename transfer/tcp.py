"""The ``tcp`` backend: any host, one framed request/reply per connection per batch.

    initiator -> peer   header, entries, then the payload of every WRITE
    peer -> initiator   header, one status byte per entry, then the payload of every good READ

The initiator finishes sending before it reads and the peer finishes reading
before it replies, so neither side can block the other on a full socket
buffer. Large batches are cut into pieces and spread over several pooled
connections, which run in parallel.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvstore.errors import PeerError
from transfer.base import Transfer
from transfer.config import TransferConfig
from transfer.plan import Piece, encode, plan_lanes
from transfer.protocol import (
    MAX_DISCARD,
    Kind,
    Op,
    ProtocolError,
    Status,
    new_entries,
    pack_header,
    unpack_header,
)
from transfer.sockets import SocketEngine, drain, recv_header, recv_into, send_all


class TcpEngine(SocketEngine):
    backend = "tcp"

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        self._lanes = ThreadPoolExecutor(config.streams * 2, thread_name_prefix="xfer-tcp-lane")
        self._scratch_size = 1 << 20

    # -- initiator --------------------------------------------------------------
    def _execute(self, endpoint: str, items: Sequence[Transfer]) -> np.ndarray:
        lanes = plan_lanes(items, self.config.streams, self.config.stream_min_bytes)
        futures = [self._lanes.submit(self._exchange, endpoint, lane) for lane in lanes[1:]]
        results = [self._exchange(endpoint, lanes[0])]
        results += [f.result() for f in futures]  # each bounded by the socket timeout
        codes = np.zeros(len(items), np.uint8)
        for lane, statuses in zip(lanes, results, strict=True):
            for piece, status in zip(lane, statuses, strict=True):
                if status != Status.OK and codes[piece.item] == Status.OK:
                    codes[piece.item] = status
        return codes

    def _exchange(self, endpoint: str, pieces: list[Piece]) -> np.ndarray:
        n = len(pieces)
        entries = encode(pieces)
        writes = [p.local for p in pieces if p.op == Op.WRITE]
        statuses = np.empty(n, np.uint8)
        with self._conns.connection(endpoint) as sock:
            send_all(sock, [pack_header(Kind.REQUEST, n), entries, *writes])
            raw = recv_header(sock)
            if raw is None:
                raise PeerError(endpoint, "closed the connection before replying")
            _, count, _ = unpack_header(raw, Kind.REPLY)
            if count != n:
                raise ProtocolError(f"reply has {count} statuses for {n} entries")
            recv_into(sock, statuses)
            for p, status in zip(pieces, statuses, strict=True):
                if p.op == Op.READ and status == Status.OK:
                    recv_into(sock, p.local)
        return statuses

    # -- peer -------------------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        scratch = np.empty(self._scratch_size, np.uint8)
        while True:
            sock.settimeout(None)  # idle between batches: wait as long as the peer likes
            raw = recv_header(sock)
            if raw is None:
                return
            sock.settimeout(self.config.timeout)
            _, count, tag = unpack_header(raw, Kind.REQUEST)
            entries = new_entries(count)
            recv_into(sock, entries)
            with self.regions.lease(entries) as views:
                reads = []
                for e, view in zip(entries, views, strict=True):
                    if e["op"] == Op.WRITE:
                        if view is not None:
                            recv_into(sock, view)
                        elif int(e["length"]) <= MAX_DISCARD:
                            drain(sock, int(e["length"]), scratch)
                        else:
                            raise ProtocolError(f"refused write of {int(e['length'])} bytes")
                    elif view is not None:
                        reads.append(view)
                send_all(
                    sock, [pack_header(Kind.REPLY, count, tag), entries["status"].copy(), *reads]
                )

    def _shutdown(self) -> None:
        super()._shutdown()
        self._lanes.shutdown(wait=True, cancel_futures=True)
