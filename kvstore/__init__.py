"""kvstore: a tiered KV-cache block store for disaggregated LLM inference.

Names are imported lazily, so that ``kvstore.errors`` (which the transfer
engine shares) can be imported without pulling in the store and torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvstore.config import DramConfig, SsdConfig, StoreConfig
    from kvstore.keys import BlockKey, Namespace, block_keys
    from kvstore.layout import KVLayout
    from kvstore.store import TieredStore

_EXPORTS = {
    "BlockKey": "kvstore.keys",
    "DramConfig": "kvstore.config",
    "KVLayout": "kvstore.layout",
    "Namespace": "kvstore.keys",
    "SsdConfig": "kvstore.config",
    "StoreConfig": "kvstore.config",
    "TieredStore": "kvstore.store",
    "block_keys": "kvstore.keys",
}
__all__ = [
    "BlockKey",
    "DramConfig",
    "KVLayout",
    "Namespace",
    "SsdConfig",
    "StoreConfig",
    "TieredStore",
    "block_keys",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
