"""What a client needs from a store: the in-process ``TieredStore`` and the
gRPC ``RemoteStore`` both provide it, so engine code does not change with
the transport."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from kvstore.buffers import Payload
from kvstore.cluster.directory import Holder
from kvstore.errors import InvalidArgumentError
from kvstore.keys import BlockKey, Namespace
from kvstore.stats import StoreStats

T = TypeVar("T")


def opened(namespaces: Mapping[int, T], ns_tag: int | None, what: str) -> T:
    """What a remote or cluster store keeps of an opened namespace: every
    call of theirs names one (an embedded store also serves the default)."""
    if ns_tag is None or ns_tag not in namespaces:
        raise InvalidArgumentError(f"a {what} store needs an opened namespace for every call")
    return namespaces[ns_tag]


class BlockStore(Protocol):
    def open_namespace(self, namespace: Namespace) -> None: ...

    def put(
        self,
        keys: Sequence[BlockKey],
        payloads: Sequence[Payload],
        parents: Sequence[BlockKey | None] | None = None,
        *,
        ns_tag: int = 0,
        compress: bool | None = None,
    ) -> list[bool]: ...

    def get_into(
        self,
        keys: Sequence[BlockKey],
        dsts: Sequence[Payload],
        *,
        prefix: bool = True,
        ns_tag: int | None = None,
    ) -> list[bool]: ...

    def lookup(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> int: ...

    def exists(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> list[bool]: ...

    def delete(self, keys: Sequence[BlockKey], *, ns_tag: int | None = None) -> int: ...

    def alloc(self, nbytes: int) -> torch.Tensor: ...

    def stats(self) -> StoreStats: ...

    def close(self) -> None: ...


@runtime_checkable
class TokenLookup(Protocol):
    """A store that keys a prompt itself (a node, in C), so a lookup sends
    the tokens instead of building and sending a key per block."""

    def lookup_tokens(
        self, tokens: np.ndarray, *, start: BlockKey | None = None, ns_tag: int | None = None
    ) -> int: ...


@runtime_checkable
class Locator(Protocol):
    """A store that can say which nodes hold a prompt's leading blocks and
    in which tier: the question a KV-aware router asks before it picks a
    worker (a node, or a cluster's directory). It takes tokens, not keys: a
    node keys them in the caller's namespace, so no tenant can ask about
    another's blocks."""

    def holders(
        self, tokens: np.ndarray, *, salt: bytes = b"", ns_tag: int | None = None
    ) -> list[Holder]: ...
