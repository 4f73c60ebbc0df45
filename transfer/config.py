"""The transfer engine's one config object, and the URL form that names it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kvstore.errors import ConfigError

BACKEND_NAMES = ("local", "shm", "tcp", "ucx")
MiB = 1 << 20


@dataclass(frozen=True)
class TransferConfig:
    """How an engine listens and how hard it pushes.

    ``host`` is where the listener binds and what descriptors advertise; it is
    127.0.0.1 unless set, so nothing is exposed by accident. ``timeout`` bounds
    every wait on a peer: a dead or stalled peer fails its part of a batch
    within it. Large batches to one peer are cut into pieces of at least
    ``stream_min_bytes`` and spread over up to ``streams`` connections.
    The listener holds at most ``max_connections`` peers at once and drops
    one that stays silent between requests for ``idle_timeout`` seconds
    (pooled connections are retired before that), so idle sockets cannot
    exhaust its descriptors or threads.
    """

    backend: str = "tcp"
    host: str = "127.0.0.1"
    port: int = 0
    timeout: float = 10.0
    streams: int = 4
    stream_min_bytes: int = 8 * MiB
    workers: int = 8
    idle_timeout: float = 60.0
    max_connections: int = 256

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_NAMES:
            choices = ", ".join(BACKEND_NAMES)
            raise ConfigError(f"unknown transfer backend {self.backend!r}; choose one of {choices}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"transfer port {self.port} is not in 0..65535")
        for name in ("timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"transfer {name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("streams", "stream_min_bytes", "workers", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"transfer {name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> TransferConfig:
        """``tcp://0.0.0.0:7000``, ``shm``, ``ucx://127.0.0.1``, ``local`` -> config."""
        parts = urlsplit(url if "://" in url else f"{url}://")
        fields: dict[str, Any] = {"backend": parts.scheme}
        try:
            if parts.hostname:
                fields["host"] = parts.hostname
            if parts.port is not None:
                fields["port"] = parts.port
        except ValueError as e:
            raise ConfigError(f"bad transfer URL {url!r}: {e}") from None
        return cls(**{**fields, **overrides})

    def replace(self, **changes: Any) -> TransferConfig:
        return dataclasses.replace(self, **changes)
