"""The systems ``bench.compare`` runs side by side, one adapter per file.

Every adapter moves objects of one size between a buffer of its own choosing
(registered memory where the system has the notion) and the system, by
batches of keys. The harness owns timing, verification and the table.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kvstore.keys import Namespace


class Peer(Protocol):
    name: str  # as printed, e.g. "kvstore tcp", "mooncake tcp", "redis"

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer the system moves fastest from and into."""
        ...

    def put(self, keys: list[bytes], src: torch.Tensor, size: int) -> None:
        """Store ``src[i*size:(i+1)*size]`` under ``keys[i]``; raise if any fails."""
        ...

    def get(self, keys: list[bytes], dst: torch.Tensor, size: int) -> None:
        """Fill ``dst[i*size:(i+1)*size]`` from ``keys[i]``; raise if any is missing."""
        ...

    def prefix_hits(self, tokens: list[int], ns: Namespace, size: int) -> int:
        """How many leading blocks of the prompt ``tokens`` (objects of
        ``size``, keyed in ``ns``) are stored, keyed as the system's own
        client would: kvstore's sends the tokens, the others key with
        ``block_keys`` and check the keys."""
        ...

    def delete(self, keys: list[bytes], size: int) -> None: ...

    def close(self) -> None: ...


class PeerUnavailable(RuntimeError):
    """A peer that cannot start here; the message says why and how to fix it."""
