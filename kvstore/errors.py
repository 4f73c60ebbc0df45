"""Typed errors of the store.

Each error names the gRPC status code it maps to (as a string, so this module
needs no gRPC import), and carries the context a caller needs to act on it.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base of every error the store raises on purpose."""

    grpc_code = "INTERNAL"


class InvalidArgumentError(KVStoreError, ValueError):
    """The caller passed something malformed; nothing was changed."""

    grpc_code = "INVALID_ARGUMENT"


class PayloadSizeError(InvalidArgumentError):
    """A payload's byte size does not match what its layout requires."""

    def __init__(self, expected: int, got: int, *, what: str = "payload") -> None:
        super().__init__(f"{what} is {got} bytes, expected {expected}")
        self.expected = expected
        self.got = got


class LayoutError(InvalidArgumentError):
    """A KV layout is unknown, inconsistent, or does not match a tensor."""


class TokenError(InvalidArgumentError):
    """Token ids that cannot be keyed (negative, too large, not 1-D integers)."""


class StoreFullError(KVStoreError):
    """No tier can take the block and nothing is evictable (everything pinned)."""

    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, nbytes: int, detail: str) -> None:
        super().__init__(f"no room for a {nbytes}-byte block: {detail}")
        self.nbytes = nbytes
        self.stored = 0  # leading blocks of the batch that did go in


class ReplyTooLargeError(KVStoreError):
    """An answer would not fit in one gRPC message (ask for fewer blocks, or
    use the streaming BatchGet)."""

    grpc_code = "RESOURCE_EXHAUSTED"


class ListenError(KVStoreError):
    """The node cannot listen where it was told (the address is in use, or
    not this host's)."""

    grpc_code = "UNAVAILABLE"

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(f"{address}: {detail}")
        self.address = address


class StorageError(KVStoreError):
    """The SSD tier cannot use its data dir (not writable, locked, disk full)."""

    grpc_code = "UNAVAILABLE"

    def __init__(self, path: object, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path


class NodeBusyError(KVStoreError):
    """Every data-call slot of the node is taken (slow or stalled peers);
    nothing was done. Clients retry it with a short backoff."""

    grpc_code = "RESOURCE_EXHAUSTED"


class DiskFullError(StorageError, StoreFullError):
    """The SSD tier's disk ran out of space; the record was not written."""

    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, path: object, nbytes: int) -> None:
        # both parents' __init__ take other arguments: set what each would
        KVStoreError.__init__(self, f"{path}: disk full writing a {nbytes}-byte record")
        self.path = path
        self.nbytes = nbytes
        self.stored = 0


class ChecksumMismatchError(KVStoreError):
    """Bytes that arrived do not hash to what the sender said; nothing was stored."""

    grpc_code = "DATA_LOSS"

    def __init__(self, indices: list[int]) -> None:
        shown = ", ".join(map(str, indices[:8])) + (" ..." if len(indices) > 8 else "")
        super().__init__(f"{len(indices)} block(s) arrived damaged (batch positions {shown})")
        self.indices = indices


class NotFoundError(KVStoreError, LookupError):
    """A named thing (a namespace) is unknown to the node."""

    grpc_code = "NOT_FOUND"


class AuthError(KVStoreError):
    """The call carried no token, or a wrong one."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDeniedError(KVStoreError):
    """The token is valid but not for this tenant's namespaces."""

    grpc_code = "PERMISSION_DENIED"


class ConfigError(InvalidArgumentError):
    """A configuration value (flag, env var, TOML key) is invalid."""


class ClosedError(KVStoreError):
    """The store was closed; open a new one."""

    grpc_code = "FAILED_PRECONDITION"


class TransferError(KVStoreError):
    """A transfer-engine batch, or part of one, did not complete."""

    grpc_code = "UNAVAILABLE"


class RegionError(TransferError, InvalidArgumentError):
    """A transfer names memory outside a registered region, or an unknown one.

    Raised before any byte moves when the local side is wrong; reported per
    transfer when the peer refused the remote side.
    """

    grpc_code = "OUT_OF_RANGE"


class PeerError(TransferError):
    """The peer closed, crashed or spoke out of protocol; the batch failed."""

    def __init__(self, endpoint: str, detail: str) -> None:
        shown = endpoint if len(endpoint) <= 48 else endpoint[:40] + "..."  # ucx addresses are long
        super().__init__(f"peer {shown}: {detail}")
        self.endpoint = endpoint


class TransferTimeoutError(PeerError):
    """The peer did not answer within the engine's timeout."""

    grpc_code = "DEADLINE_EXCEEDED"


class DataPortRefusedError(PeerError):
    """The node's data port took no new connection (down, full, or not
    reachable from here): the call was not sent, so it may go over gRPC."""


class BackendUnavailableError(TransferError):
    """A transfer backend cannot run here (a missing package, an unsupported host)."""

    grpc_code = "FAILED_PRECONDITION"


class RemoteError(KVStoreError):
    """A node answered with a gRPC status no kvstore error names (or it could
    not be reached); ``code`` is the status's name."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.grpc_code = code


def from_status(type_name: str, code: str, detail: str) -> KVStoreError:
    """The error a node raised, rebuilt on the client from its status.

    The node names the class in the call's trailing metadata; the message is
    kept as the node wrote it and constructor-only attributes get neutral
    values, so ``except StoreFullError`` works the same local or remote.
    """
    cls = globals().get(type_name)
    if not (isinstance(cls, type) and issubclass(cls, KVStoreError)) or cls.grpc_code != code:
        return RemoteError(code, detail)
    err = cls.__new__(cls)
    Exception.__init__(err, detail)
    for attr in _constructor_attrs(cls) & _REBUILT_DEFAULTS.keys():
        setattr(err, attr, _REBUILT_DEFAULTS[attr])
    return err


_REBUILT_DEFAULTS: dict[str, object] = {
    "expected": -1,
    "got": -1,
    "nbytes": -1,
    "stored": 0,
    "path": None,
    "indices": [],
    "endpoint": "",
    "url": "",
}


def _constructor_attrs(cls: type) -> set[str]:
    """Names the class's own constructors take or set."""
    names: set[str] = set()
    for klass in cls.__mro__:
        code = getattr(klass.__dict__.get("__init__"), "__code__", None)
        if code is not None:
            names.update(code.co_varnames, code.co_names)
    return names


class DirectoryUnavailableError(KVStoreError):
    """The cluster directory (Redis) cannot be reached; callers degrade to
    misses rather than fail."""

    grpc_code = "UNAVAILABLE"

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cluster directory {url} unreachable: {reason}")
        self.url = url
