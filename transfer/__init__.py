"""Transfer engine (DESIGN item 5): register memory, move batches over shm, TCP, UCX.

    engine = make_engine("tcp")                 # or "shm", "ucx", "local", "tcp://0.0.0.0:7000"
    region = engine.alloc(64 << 20)             # or engine.register(tensor / array / buffer)
    desc = engine.grant(region, read=True)      # the capability: one range, one direction
    send desc.to_dict() to that peer; it builds Transfer(Op.READ, its_region, desc, n)
    engine.transfer([...])                      # one batch, per-transfer status, typed errors

Backends are imported on first use, so a host without ``ucxx`` runs every
other backend and gets a clear ``BackendUnavailableError`` for ``ucx``.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvstore.errors import BackendUnavailableError
from transfer.base import Batch, BatchResult, Region, RegionDesc, Transfer, TransferEngine
from transfer.config import BACKEND_NAMES, TransferConfig
from transfer.protocol import Op, Status

_MODULES = {"local": "LocalEngine", "shm": "ShmEngine", "tcp": "TcpEngine", "ucx": "UcxEngine"}


def engine_class(backend: str) -> type[TransferEngine]:
    if backend not in _MODULES:
        raise BackendUnavailableError(
            f"unknown transfer backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}"
        )
    cls: type[TransferEngine] = getattr(
        importlib.import_module(f"transfer.{backend}"), _MODULES[backend]
    )
    return cls


def make_engine(config: TransferConfig | str = "tcp", **overrides: Any) -> TransferEngine:
    """An engine, listening, from a config or a URL such as ``tcp://127.0.0.1:0``."""
    if isinstance(config, str):
        config = TransferConfig.from_url(config, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    return engine_class(config.backend)(config)


def available_backends() -> dict[str, str | None]:
    """Backend name -> None if it can run here, else the reason it cannot."""
    out: dict[str, str | None] = {}
    for name in BACKEND_NAMES:
        try:
            engine_class(name)
            out[name] = None
        except BackendUnavailableError as e:
            out[name] = str(e)
    return out


__all__ = [
    "Batch",
    "BatchResult",
    "Op",
    "Region",
    "RegionDesc",
    "Status",
    "Transfer",
    "TransferConfig",
    "TransferEngine",
    "available_backends",
    "engine_class",
    "make_engine",
]
