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

from transfer.base import Transfer
from transfer.config import TransferConfig
from transfer.plan import Piece, encode, plan_lanes
from transfer.protocol import (
    MAX_DISCARD,
    Kind,
    Op,
    ProtocolError,
    Status,
    pack_header,
)
from transfer.sockets import (
    SocketEngine,
    discard_views,
    recv_into_all,
    recv_request,
    recv_statuses,
    send_all,
)

SCRATCH = 1 << 20  # where refused write payloads are drained
# plain ints: per-piece loops compare with these (an IntEnum member lookup costs more)
OK, READ, WRITE = int(Status.OK), int(Op.READ), int(Op.WRITE)


class TcpEngine(SocketEngine):
    backend = "tcp"

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        self._lanes = ThreadPoolExecutor(config.streams * 2, thread_name_prefix="xfer-tcp-lane")

    # -- initiator --------------------------------------------------------------
    def _execute(self, endpoint: str, items: Sequence[Transfer]) -> np.ndarray:
        lanes = plan_lanes(items, self.config.streams, self.config.stream_min_bytes)
        futures = [self._lanes.submit(self._exchange, endpoint, lane) for lane in lanes[1:]]
        results = [self._exchange(endpoint, lanes[0])]
        results += [f.result() for f in futures]  # each bounded by the socket timeout
        codes = np.zeros(len(items), np.uint8)
        for lane, statuses in zip(lanes, results, strict=True):
            for piece, status in zip(lane, statuses.tolist(), strict=True):
                if status != OK and codes[piece.item] == OK:
                    codes[piece.item] = status
        return codes

    def _exchange(self, endpoint: str, pieces: list[Piece]) -> np.ndarray:
        n = len(pieces)
        entries = encode(pieces)
        writes = [p.local for p in pieces if p.op == Op.WRITE]
        with self._conns.connection(endpoint) as sock:
            send_all(sock, [pack_header(Kind.REQUEST, n), entries, *writes])
            statuses = recv_statuses(sock, endpoint, n)
            ok = statuses.tolist()
            reads = [p.local for p, s in zip(pieces, ok, strict=True) if p.op == READ and s == OK]
            recv_into_all(sock, reads)
        return statuses

    # -- peer -------------------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        scratch = np.empty(SCRATCH, np.uint8)
        while (
            request := recv_request(
                sock, Kind.REQUEST, self.config.timeout, self.config.idle_timeout
            )
        ) is not None:
            entries, tag = request
            with self.regions.lease(entries) as views:
                reads, writes = [], []
                ops, lengths = entries["op"].tolist(), entries["length"].tolist()
                for op, length, view in zip(ops, lengths, views, strict=True):
                    if op == WRITE:
                        if view is not None:
                            writes.append(view)
                        elif length <= MAX_DISCARD:
                            writes += discard_views(length, scratch)
                        else:
                            raise ProtocolError(f"refused write of {length} bytes")
                    elif view is not None:
                        reads.append(view)
                recv_into_all(sock, writes)
                reply = pack_header(Kind.REPLY, len(entries), tag)
                send_all(sock, [reply, entries["status"].copy(), *reads])

    def _shutdown(self) -> None:
        super()._shutdown()
        self._lanes.shutdown(wait=True, cancel_futures=True)
