"""The ``local`` backend: both regions in this process, moved by one memcpy each.

It is the baseline the other backends are measured against, and what an
embedded store uses when the engine and the store share a process. Peers are
engines in the same process, found by id; the copy runs under the peer's
lease, so the same checks guard it as a remote request.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

import numpy as np

from kvstore.errors import PeerError
from transfer.base import Transfer, TransferEngine
from transfer.config import TransferConfig
from transfer.plan import encode, one_lane
from transfer.protocol import Op

_engines: weakref.WeakValueDictionary[str, LocalEngine] = weakref.WeakValueDictionary()
_ids = itertools.count(1)


class LocalEngine(TransferEngine):
    backend = "local"

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        self.endpoint = f"local://{next(_ids)}"
        _engines[self.endpoint] = self

    def _execute(self, endpoint: str, items: Sequence[Transfer]) -> np.ndarray:
        peer = _engines.get(endpoint)
        if peer is None or peer.closed:
            raise PeerError(endpoint, "no open local engine by that id")
        pieces = one_lane(items)
        entries = encode(pieces)
        with peer.regions.lease(entries) as views:
            for p, remote in zip(pieces, views, strict=True):
                if remote is not None:
                    src, dst = (remote, p.local) if p.op == Op.READ else (p.local, remote)
                    np.copyto(dst, src)
        return entries["status"].copy()

    def _shutdown(self) -> None:
        _engines.pop(self.endpoint, None)
