"""kvstore: a tiered KV-cache block store for disaggregated LLM inference."""

from kvstore.config import DramConfig, SsdConfig, StoreConfig
from kvstore.keys import BlockKey, Namespace, block_keys
from kvstore.layout import KVLayout
from kvstore.store import TieredStore

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
