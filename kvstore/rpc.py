"""A gRPC connection to a node: typed calls that fail with ``kvstore.errors``.

Shared by the remote client and the operator commands (``kvstore stat``...),
so both see the same errors the node raised.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc

from kvstore.config import DEFAULT_PORT
from kvstore.errors import ConfigError, KVStoreError, NodeBusyError, StoreFullError, from_status
from kvstore.wire import (
    AUTH_HEADER,
    CLIENT_KEEPALIVE,
    ERROR_TYPE_HEADER,
    METHODS,
    STORED_HEADER,
)

DEFAULT_URL = f"kvstore://127.0.0.1:{DEFAULT_PORT}"
BUSY_RETRIES = 5  # a NodeBusyError is retried after 25, 50, ... 400 ms
BUSY_BACKOFF = 0.025
T = TypeVar("T")


def parse_url(url: str) -> str:
    """``kvstore://host:port`` -> ``host:port`` (gRPC's target form)."""
    parts = urlsplit(url if "://" in url else f"kvstore://{url}")
    try:
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"bad node URL {url!r}: {e}") from None
    if parts.scheme != "kvstore" or not parts.hostname or port is None:
        raise ConfigError(f"node URL must look like kvstore://host:port, got {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


def with_busy_retries(call: Callable[[], T]) -> T:
    """``call()``, asked again a few times, backing off, while the node says
    it is busy (``NodeBusyError``)."""
    for attempt in range(BUSY_RETRIES):
        try:
            return call()
        except NodeBusyError:
            time.sleep(BUSY_BACKOFF * 2**attempt)
    return call()


class Connection:
    """``token`` None reads ``KVSTORE_TOKEN``; every call is bounded by ``timeout``."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 60.0) -> None:
        self.url = url
        self.target = parse_url(url)
        token = os.environ.get("KVSTORE_TOKEN", "") if token is None else token
        self.token = token  # the data port's HELLO carries it too
        self._metadata = ((AUTH_HEADER, f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            self.target,
            options=[
                ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1),
                *CLIENT_KEEPALIVE,
            ],
        )
        self._stubs = {
            m.name: (self._channel.unary_stream if m.streaming else self._channel.unary_unary)(
                m.path,
                request_serializer=m.request.SerializeToString,
                response_deserializer=m.reply.FromString,
            )
            for m in METHODS.values()
        }

    def call(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        """One unary RPC; a failure raises the class the node raised (a busy
        node is asked again a few times, backing off, before that)."""

        def once() -> Any:
            try:
                return self._stubs[method](
                    request, metadata=self._metadata, timeout=timeout or self.timeout
                )
            except grpc.RpcError as e:
                raise self._error(e) from None

        return with_busy_retries(once)

    def stream(self, method: str, request: Any) -> Iterator[Any]:
        """The replies of a server-streaming RPC, as they arrive."""
        try:
            yield from self._stubs[method](request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def _error(self, e: grpc.RpcError) -> KVStoreError:
        code = e.code().name if hasattr(e, "code") else "UNKNOWN"
        detail = str(e.details()) if hasattr(e, "details") else str(e)
        md: dict[str, Any] = {}
        if hasattr(e, "trailing_metadata"):
            md = {m.key: m.value for m in e.trailing_metadata() or ()}
        if code == "UNAVAILABLE" and ERROR_TYPE_HEADER not in md:
            detail = f"cannot reach {self.url}: {detail}"
        err = from_status(str(md.get(ERROR_TYPE_HEADER, "")), code, detail)
        if isinstance(err, StoreFullError):
            err.stored = int(md.get(STORED_HEADER, 0))
        return err

    def close(self) -> None:
        self._channel.close()
