"""LMCache's remote storage tier over a kvstore node (a remote storage plugin).

LMCache loads it from its own config (lmcache==0.5.6)::

    remote_storage_plugins: ["kvstore"]
    extra_config:
      remote_storage_plugin.kvstore.module_path: client.engines.lmcache
      remote_storage_plugin.kvstore.class_name: KVStoreRemoteConnector
      remote_storage_plugin.kvstore.url: kvstore://127.0.0.1:50061
    remote_serde: naive

Besides ``url`` the plugin takes ``token`` (default: ``$KVSTORE_TOKEN``) and
``tenant``; what a chunk looks like it takes from LMCache's own metadata (the
full chunk's shapes, dtypes and memory format).

A chunk is one kvstore block, named by LMCache's key string (model, world
size, worker, chunk hash, dtype, tags), so TP ranks and tagged requests never
share a block and MLA's worker-0 sharing works as LMCache arranges it. Full
chunks live in a namespace whose block is a full chunk and move without a
copy. A prompt's last chunk may be shorter (``save_unfull_chunk``): it is
stored in a second namespace, padded to a full chunk behind a header holding
its length, and copied once each way. Only LMCache's ``naive`` serde and
whole-chunk (not layerwise) storage are served: both change a chunk's bytes
per object, which a fixed-size block cannot hold.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from client.client import Client
from kvstore.errors import ConfigError, KVStoreError
from kvstore.keys import BlockKey, Namespace, named_key
from kvstore.layout import KVLayout

try:
    from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector
except ImportError:  # LMCache is not installed: the class stands alone

    class RemoteConnector:  # type: ignore[no-redef]
        def __init__(self, config: Any, metadata: Any) -> None:
            raise ConfigError("KVStoreRemoteConnector needs lmcache (pip install lmcache)")


log = logging.getLogger(__name__)
T = TypeVar("T")

_TAIL = struct.Struct("<4sI8x")  # magic, payload bytes; a short chunk's header
_TAIL_MAGIC = b"KVlc"


def _plugin_options(config: Any) -> dict[str, Any]:
    """This plugin's ``remote_storage_plugin.NAME.*`` options: LMCache builds
    the connector from its class alone, so the name is found by the class."""
    extra = dict(config.extra_config or {})
    for name in config.remote_storage_plugins or ():
        prefix = f"remote_storage_plugin.{name}."
        if extra.get(prefix + "class_name") == KVStoreRemoteConnector.__name__:
            return {k[len(prefix) :]: v for k, v in extra.items() if k.startswith(prefix)}
    raise ConfigError(
        "KVStoreRemoteConnector: no remote_storage_plugins entry names it; add "
        '"kvstore" to remote_storage_plugins and remote_storage_plugin.kvstore.class_name: '
        "KVStoreRemoteConnector to extra_config"
    )


class KVStoreRemoteConnector(RemoteConnector):  # type: ignore[misc]
    def __init__(
        self, loop: asyncio.AbstractEventLoop, local_cpu_backend: Any, config: Any
    ) -> None:
        options = _plugin_options(config)
        if "url" not in options:
            raise ConfigError(
                "KVStoreRemoteConnector needs remote_storage_plugin.kvstore.url in "
                "extra_config (kvstore://host:port of a node)"
            )
        if config.use_layerwise:
            raise ConfigError(
                "KVStoreRemoteConnector stores whole chunks; set use_layerwise: false"
            )
        if (config.remote_serde or "naive") != "naive":
            raise ConfigError(
                f"KVStoreRemoteConnector needs remote_serde: naive, got {config.remote_serde!r} "
                "(a compressed chunk has no fixed size)"
            )
        super().__init__(local_cpu_backend.config, local_cpu_backend.metadata)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        md = local_cpu_backend.metadata
        shapes = ",".join("x".join(map(str, s)) for s in self.meta_shapes)
        dtypes = ",".join(str(d).removeprefix("torch.") for d in self.meta_dtypes)
        model = f"lmcache:{md.model_name}:{self.meta_fmt.name}:{shapes}:{dtypes}"
        tenant = str(options.get("tenant", "default"))
        full = self.full_chunk_size_bytes
        self._full = Client.connect(
            str(options["url"]),
            namespace=Namespace(model, KVLayout.opaque(full, what="LMCache chunks"), tenant),
            token=options.get("token"),
        )
        tail = KVLayout.opaque(full + _TAIL.size, what="LMCache chunks")
        self._tail = self._full.with_namespace(Namespace(model + ":tail", tail, tenant))
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvstore-lmcache")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking client calls run off LMCache's event loop."""
        return await self.loop.run_in_executor(self._pool, fn, *args)

    @staticmethod
    def _payload(obj: Any) -> torch.Tensor:
        """The chunk's bytes as a flat uint8 view (no copy)."""
        raw: torch.Tensor = obj.raw_data
        return raw[: obj.get_size()].view(torch.uint8)

    # -- exists ------------------------------------------------------------------

    def _count(self, keys: Sequence[Any]) -> int:
        """Leading chunks stored: full chunks in one round trip, then the
        one short chunk that may end a prompt."""
        if not keys:
            return 0
        blocks = [named_key(k.to_string()) for k in keys]
        n = self._full.store.lookup(blocks, ns_tag=self._full.namespace.tag)
        if n < len(blocks) and self._tail.exists([blocks[n]])[0]:
            n += 1
        return n

    def exists_sync(self, key: Any) -> bool:
        try:
            return self._count([key]) == 1
        except KVStoreError as e:
            log.warning("kvstore exists failed: %s", e)
            return False

    async def exists(self, key: Any) -> bool:
        return await self._run(self.exists_sync, key)

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[Any]) -> int:
        try:
            return self._count(keys)
        except KVStoreError as e:
            log.warning("kvstore lookup failed: %s", e)
            return 0

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(
        self, lookup_id: str, keys: list[Any], pin: bool = False
    ) -> int:
        return await self._run(self.batched_contains, keys)

    # -- get ---------------------------------------------------------------------

    def _get_sync(self, keys: Sequence[Any], prefix: bool) -> list[Any]:
        """Each key's chunk in a fresh LMCache memory object (None where
        missing, or after the first miss when ``prefix``)."""
        out: list[Any] = [None] * len(keys)
        objs = []
        for _ in keys:
            obj = self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes, self.meta_fmt)
            if obj is None:  # LMCache's buffer is full: fetch what fits
                break
            objs.append(obj)
        blocks = [named_key(k.to_string()) for k in keys[: len(objs)]]
        try:
            found = self._full.get_blocks(blocks, [self._payload(o) for o in objs])
            for i, ok in enumerate(found):
                if ok:
                    out[i], objs[i] = objs[i], None
            missed = [i for i, ok in enumerate(found) if not ok]
            if prefix:
                missed = missed[:1]
            if missed:
                tails = self._get_tails([blocks[i] for i in missed], [objs[i] for i in missed])
                for i, ok in zip(missed, tails, strict=True):
                    if ok:
                        out[i], objs[i] = objs[i], None
        finally:
            for o in objs:
                if o is not None:
                    o.ref_count_down()
        if prefix:
            n = next((i for i, o in enumerate(out) if o is None), len(out))
            for o in out[n:]:
                if o is not None:
                    o.ref_count_down()
            out[n:] = [None] * (len(out) - n)
        return out

    def _get_tails(self, blocks: list[BlockKey], objs: list[Any]) -> list[bool]:
        """Short chunks into ``objs``, each narrowed to its length; True where found."""
        size = self.full_chunk_size_bytes + _TAIL.size
        bounce = torch.empty((len(blocks), size), dtype=torch.uint8)
        found = self._tail.get_blocks(blocks, list(bounce))
        for i, ok in enumerate(found):
            if not ok:
                continue
            magic, n = _TAIL.unpack_from(bounce[i, : _TAIL.size].numpy().tobytes())
            if magic != _TAIL_MAGIC or not 0 < n < self.full_chunk_size_bytes:
                log.warning("kvstore: a short LMCache chunk has a bad header; treated as a miss")
                found[i] = False
                continue
            self._payload(objs[i])[:n].copy_(bounce[i, _TAIL.size : _TAIL.size + n])
            self.reshape_partial_chunk(objs[i], n)
        return found

    async def get(self, key: Any) -> Any:
        return (await self.batched_get([key]))[0]

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list[Any]) -> list[Any]:
        try:
            return await self._run(self._get_sync, keys, False)
        except KVStoreError as e:
            log.warning("kvstore get failed: %s", e)
            return [None] * len(keys)

    def support_batched_get_non_blocking(self) -> bool:
        return True

    async def batched_get_non_blocking(self, lookup_id: str, keys: list[Any]) -> list[Any]:
        """The leading chunks found, in one round trip for full chunks."""
        try:
            out = await self._run(self._get_sync, keys, True)
        except KVStoreError as e:
            log.warning("kvstore get failed: %s", e)
            return []
        return [o for o in out if o is not None]

    # -- put ---------------------------------------------------------------------

    def _put_sync(self, keys: Sequence[Any], objs: Sequence[Any]) -> None:
        full, short = [], []
        for key, obj in zip(keys, objs, strict=True):
            n = obj.get_size()
            if obj.get_memory_format() != self.meta_fmt or list(obj.get_dtypes()) != list(
                self.meta_dtypes
            ):
                raise ConfigError(
                    f"LMCache chunk {key.to_string()} is {obj.get_memory_format().name} "
                    f"{obj.get_dtypes()}, the engine's chunks are {self.meta_fmt.name} "
                    f"{self.meta_dtypes}"
                )
            if n == self.full_chunk_size_bytes:
                full.append((named_key(key.to_string()), obj))
            elif 0 < n < self.full_chunk_size_bytes and n % self.single_token_size == 0:
                short.append((named_key(key.to_string()), obj))
            else:
                raise ConfigError(
                    f"LMCache chunk {key.to_string()} holds {n} bytes; a chunk of this "
                    f"engine is at most {self.full_chunk_size_bytes} in whole tokens of "
                    f"{self.single_token_size}"
                )
        if full:
            self._full.put_blocks([b for b, _ in full], [self._payload(o) for _, o in full])
        if short:
            size = self.full_chunk_size_bytes + _TAIL.size
            bounce = torch.zeros((len(short), size), dtype=torch.uint8)
            for row, (_, obj) in zip(bounce, short, strict=True):
                n = obj.get_size()
                header = bytearray(_TAIL.pack(_TAIL_MAGIC, n))
                row[: _TAIL.size] = torch.frombuffer(header, dtype=torch.uint8)
                row[_TAIL.size : _TAIL.size + n].copy_(self._payload(obj))
            self._tail.put_blocks([b for b, _ in short], list(bounce))

    async def put(self, key: Any, memory_obj: Any) -> None:
        await self.batched_put([key], [memory_obj])

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list[Any], memory_objs: list[Any]) -> None:
        try:
            await self._run(self._put_sync, keys, memory_objs)
        except Exception as e:  # LMCache's batched put drops errors unseen
            log.error("kvstore put of %d LMCache chunks failed: %s", len(keys), e)
            raise

    # -- the rest ----------------------------------------------------------------

    def remove_sync(self, key: Any) -> bool:
        block = [named_key(key.to_string())]
        return bool(self._full.delete(block) + self._tail.delete(block))

    async def list(self) -> list[str]:
        """Empty: blocks are named by a hash of LMCache's key, which a node
        cannot turn back into the key (LMCache's Redis and Mooncake
        connectors do not list either)."""
        return []

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._tail.close()
        self._full.close()

    def __repr__(self) -> str:
        return f"<KVStoreRemoteConnector {self._full.namespace.name}>"
