"""SGLang HiCache's storage tier (L3) over a kvstore node.

SGLang loads it through its ``dynamic`` backend::

    python -m sglang.launch_server ... --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "kvstore",
            "module_path": "client.engines.sglang", "class_name": "KVStoreHiCache",
            "url": "kvstore://127.0.0.1:50061"}'

HiCache names a page by a hash string and hands over its bytes as a host
tensor; a page is one kvstore block of a namespace whose block is the page's
byte size (learnt from the first page seen, one namespace per size). Key
spaces follow SGLang's sharding: one per TP rank, one shared by every rank
for MLA (whose KV is replicated), and PP stages apart; host pools of two
layouts (whose flat pages order bytes differently) apart too. Besides ``url`` the
extra config takes ``token`` and ``tenant``.

Only the key/value calls are served (``get``/``set``/``batch_get``/
``batch_set``/``exists``/``batch_exists``, the last in one round trip);
the zero-copy ``batch_get_v1``/``batch_set_v1`` over the registered host pool
are not yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from client.client import Client
from kvstore.errors import ConfigError, KVStoreError
from kvstore.keys import Namespace, named_key
from kvstore.layout import KVLayout

try:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage
except ImportError:  # SGLang is not installed: the class stands alone

    class HiCacheStorage:  # type: ignore[no-redef]
        pass


class KVStoreHiCache(HiCacheStorage):  # type: ignore[misc]
    def __init__(self, storage_config: Any, kwargs: dict[str, Any] | None = None) -> None:
        extra = dict(storage_config.extra_config or {})
        if "url" not in extra:
            raise ConfigError(
                "KVStoreHiCache needs url in --hicache-storage-backend-extra-config "
                "(kvstore://host:port of a node)"
            )
        c = storage_config
        shard = "mla" if c.is_mla_model else f"tp{c.tp_rank}of{c.tp_size}"
        if c.pp_size > 1:
            shard += f"-pp{c.pp_rank}of{c.pp_size}"
        if getattr(c, "attn_cp_size", 1) > 1:
            shard += f"-cp{c.attn_cp_rank}of{c.attn_cp_size}"
        self._model = f"sglang:{c.model_name or 'model'}:{shard}"
        self._tenant = str(extra.get("tenant", "default"))
        self._url, self._token = str(extra["url"]), extra.get("token")
        # A flat page's byte order is the host pool's layout (SGLang's
        # get_data_page flattens a page view of it), so pools of two layouts
        # keep apart: the config knows page_first or not; the pool, exactly.
        self._layout = "page_first" if c.is_page_first_layout else "layer_first"
        self._clients: dict[int, Client] = {}  # page bytes -> client of that namespace

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """The host pool tells the page size before any page moves, so a
        reader that never wrote still finds what others stored."""
        self.mem_pool_host = mem_pool_host
        layout = str(getattr(mem_pool_host, "layout", self._layout))
        if layout != self._layout:
            self.close()
            self._layout = layout
        page = mem_pool_host.get_dummy_flat_data_page()
        self._client(page.numel() * page.element_size())

    def _client(self, nbytes: int) -> Client:
        c = self._clients.get(nbytes)
        if c is None:
            model = f"{self._model}:{self._layout}"
            ns = Namespace(model, KVLayout.opaque(nbytes, what="HiCache pages"), self._tenant)
            first = next(iter(self._clients.values()), None)
            if first is None:
                c = Client.connect(self._url, namespace=ns, token=self._token)
            else:
                c = first.with_namespace(ns)
            self._clients[nbytes] = c
        return c

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8)

    # -- single pages ----------------------------------------------------------

    def get(
        self, key: str, target_location: Any = None, target_sizes: Any = None
    ) -> torch.Tensor | None:
        out = self.batch_get([key], [target_location])
        return out[0]

    def set(
        self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None
    ) -> bool:
        return self.batch_set([key], [value])

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # -- batches ---------------------------------------------------------------

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[torch.Tensor | None]:
        """Fill each target (a host tensor of the page's size); None where missing."""
        if target_locations is None:
            raise ConfigError("KVStoreHiCache.batch_get needs the target tensors")
        targets: Sequence[torch.Tensor] = target_locations
        out: list[torch.Tensor | None] = [None] * len(keys)
        by_size: dict[int, list[int]] = {}
        for i, t in enumerate(targets):
            by_size.setdefault(t.numel() * t.element_size(), []).append(i)
        for nbytes, idx in by_size.items():
            flats = [self._flat(targets[i]) for i in idx]
            found = self._client(nbytes).get_blocks([named_key(keys[i]) for i in idx], flats)
            for i, ok in zip(idx, found, strict=True):
                if ok:
                    out[i] = targets[i]
        return out

    def batch_set(
        self, keys: list[str], values: Any = None, target_locations: Any = None,
        target_sizes: Any = None,
    ) -> bool:  # fmt: skip
        """Store each page (False if any could not be stored: HiCache retries)."""
        pages: Sequence[torch.Tensor] = values if values is not None else target_locations
        if pages is None:
            raise ConfigError("KVStoreHiCache.batch_set needs the page tensors")
        by_size: dict[int, list[int]] = {}
        for i, t in enumerate(pages):
            by_size.setdefault(t.numel() * t.element_size(), []).append(i)
        try:
            for nbytes, idx in by_size.items():
                payloads = [self._flat(pages[i].contiguous()) for i in idx]
                self._client(nbytes).put_blocks([named_key(keys[i]) for i in idx], payloads)
        except KVStoreError:
            return False
        return True

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """How many leading pages are stored, in one round trip (per page
        size known: from the host pool, or from pages seen)."""
        if not self._clients:
            return 0
        blocks = [named_key(k) for k in keys]
        return max(c.store.lookup(blocks, ns_tag=c.namespace.tag) for c in self._clients.values())

    def clear(self) -> None:
        """Not supported: a shared store is not cleared by one engine."""

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
