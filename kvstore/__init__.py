"""kvstore: a tiered KV-cache block store for disaggregated LLM inference.

The package itself exports nothing, so that importing a leaf such as
``kvstore.errors`` (which the transfer engine and the native extension
share) runs no store code and imports no torch. Engines import ``client``;
the store is ``kvstore.store.TieredStore``; the node is ``kvstore.node``.
"""
