"""What inference engines import: the client and the types that describe their KV."""

from client.client import Client
from kvstore.config import DramConfig, SsdConfig, StoreConfig
from kvstore.keys import Namespace
from kvstore.layout import KVLayout

__all__ = ["Client", "DramConfig", "KVLayout", "Namespace", "SsdConfig", "StoreConfig"]
