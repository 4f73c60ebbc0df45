"""LMCache 0.5.6's remote tier, loaded the way LMCache loads a remote
storage plugin: ``CreateConnector("plugin://kvstore", ...)`` and LMCache's
own ``RemoteBackend`` over it, with real ``LocalCPUBackend`` memory objects,
against a real node."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.connector import CreateConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
from lmcache.v1.storage_backend.remote_backend import RemoteBackend

from kvstore.errors import ConfigError
from tests.node import NodeProcess, running_node

CHUNK, LAYERS, HEADS, HEAD_DIM = 16, 2, 2, 8


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    with running_node(None) as n:
        yield n


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """LMCache runs its connectors on an event loop of its own thread."""
    lp = asyncio.new_event_loop()
    t = threading.Thread(target=lp.run_forever, daemon=True)
    t.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    t.join()


def _config(url: str | None, **overrides: Any) -> Any:
    extra = {
        "remote_storage_plugin.kvstore.module_path": "client.engines.lmcache",
        "remote_storage_plugin.kvstore.class_name": "KVStoreRemoteConnector",
    }
    if url:
        extra["remote_storage_plugin.kvstore.url"] = url
    settings: dict[str, Any] = {
        "chunk_size": CHUNK, "local_cpu": False, "max_local_cpu_size": 0.05,
        "remote_storage_plugins": ["kvstore"], "remote_serde": "naive",
        "save_unfull_chunk": True, "extra_config": extra,
    }  # fmt: skip
    settings.update(overrides)
    return LMCacheEngineConfig.from_defaults(**settings)


def _metadata(*, worker: int = 0, world: int = 1, mla: bool = False) -> LMCacheMetadata:
    shape = (LAYERS, 1 if mla else 2, CHUNK, 1 if mla else HEADS, HEAD_DIM)
    return LMCacheMetadata(
        model_name="Qwen/tiny", world_size=world, local_world_size=world, worker_id=worker,
        local_worker_id=worker, kv_dtype=torch.bfloat16, kv_shape=shape, use_mla=mla,
        chunk_size=CHUNK,
    )  # fmt: skip


class Engine:
    """One LMCache worker's remote tier: its CPU buffer and RemoteBackend."""

    def __init__(self, url: str, loop: asyncio.AbstractEventLoop, **kw: Any) -> None:
        self.config = _config(url)
        self.metadata = _metadata(**kw)
        self.cpu = LocalCPUBackend(self.config, self.metadata)
        md = self.metadata
        self.remote = RemoteBackend(self.config, md, loop, self.cpu, plugin_name="kvstore")
        assert self.remote.connection is not None, "LMCache did not build the kvstore connector"

    def key(self, chunk_hash: int, **tags: str) -> CacheEngineKey:
        md = self.metadata
        configs = {f"lmcache.tag.{k}": v for k, v in tags.items()} or None
        return CacheEngineKey(
            md.model_name, md.world_size, md.worker_id, chunk_hash, torch.bfloat16, configs
        )

    def chunk(self, seed: int, tokens: int = CHUNK) -> Any:
        shape = list(self.metadata.get_shapes()[0])
        shape[2] = tokens
        fmt = MemoryFormat.KV_MLA_FMT if self.metadata.use_mla else MemoryFormat.KV_2LTD
        obj = self.cpu.allocate([torch.Size(shape)], [torch.bfloat16], fmt)
        g = torch.Generator().manual_seed(seed)
        obj.tensor.copy_(torch.randn(shape, generator=g).to(torch.bfloat16))
        return obj

    def put(self, keys: list[CacheEngineKey], objs: list[Any]) -> None:
        """LMCache's batched put, waited for through its completion callback."""
        done: list[CacheEngineKey] = []
        finished = threading.Event()

        def on_complete(key: CacheEngineKey) -> None:
            done.append(key)
            if len(done) == len(keys):
                finished.set()

        self.remote.batched_submit_put_task(keys, objs, on_complete_callback=on_complete)
        assert finished.wait(10), "puts did not finish"

    def close(self) -> None:
        self.remote.close()


def _equal(a: Any, b: Any) -> bool:
    return a.get_shape() == b.get_shape() and torch.equal(a.tensor, b.tensor)


def test_chunks_round_trip_through_lmcache_remote_backend(
    node: NodeProcess, loop: asyncio.AbstractEventLoop
) -> None:
    writer, reader = Engine(node.url, loop), Engine(node.url, loop)
    try:
        keys = [writer.key(0x1000 + i) for i in range(5)]
        objs = [writer.chunk(i) for i in range(4)]
        writer.put(keys[:2] + keys[3:4], [objs[0], objs[1], objs[3]])
        assert reader.remote.contains(keys[0]) and not reader.remote.contains(keys[2])
        assert reader.remote.batched_contains(keys) == 2  # chunk 2 is missing: the prefix ends
        count = asyncio.run_coroutine_threadsafe(
            reader.remote.batched_async_contains("req-1", keys), loop
        ).result(10)
        assert count == 2
        got = reader.remote.batched_get_blocking(keys[:4])
        assert [g is not None for g in got] == [True, True, False, True]
        for i in (0, 1, 3):
            assert _equal(got[i], objs[i])
        one = reader.remote.get_blocking(keys[1])
        assert one is not None and _equal(one, objs[1])
        assert reader.remote.get_blocking(keys[4]) is None
        leading = asyncio.run_coroutine_threadsafe(
            reader.remote.batched_get_non_blocking("req-1", keys), loop
        ).result(10)
        assert len(leading) == 2 and all(_equal(g, o) for g, o in zip(leading, objs, strict=False))
        assert reader.remote.remove(keys[0]) and not reader.remote.contains(keys[0])
    finally:
        writer.close()
        reader.close()


def test_a_prompts_short_last_chunk_comes_back_with_its_length(
    node: NodeProcess, loop: asyncio.AbstractEventLoop
) -> None:
    writer, reader = Engine(node.url, loop), Engine(node.url, loop)
    try:
        keys = [writer.key(0x2000), writer.key(0x2001)]
        objs = [writer.chunk(10), writer.chunk(11, tokens=5)]
        writer.put(keys, objs)
        assert reader.remote.batched_contains(keys) == 2
        got = reader.remote.batched_get_blocking(keys)
        assert got[1] is not None and got[1].get_num_tokens() == 5
        assert _equal(got[0], objs[0]) and _equal(got[1], objs[1])
    finally:
        writer.close()
        reader.close()


def test_workers_and_tags_have_their_own_chunks_and_mla_workers_share_worker0s(
    node: NodeProcess, loop: asyncio.AbstractEventLoop
) -> None:
    tp0, tp1 = Engine(node.url, loop, world=2), Engine(node.url, loop, worker=1, world=2)
    mla0 = Engine(node.url, loop, world=2, mla=True)
    mla1 = Engine(node.url, loop, worker=1, world=2, mla=True)
    try:
        tp0.put([tp0.key(0x3000)], [tp0.chunk(20)])
        assert not tp1.remote.contains(tp1.key(0x3000))
        assert not tp0.remote.contains(tp0.key(0x3000, adapter="a"))
        tp0.put([tp0.key(0x3000, adapter="a")], [tp0.chunk(21)])
        tagged = tp0.remote.get_blocking(tp0.key(0x3000, adapter="a"))
        plain = tp0.remote.get_blocking(tp0.key(0x3000))
        assert tagged is not None and plain is not None
        assert not torch.equal(tagged.tensor, plain.tensor)

        latent = mla0.chunk(22)
        mla0.put([mla0.key(0x3100)], [latent])
        got = mla1.remote.get_blocking(mla1.key(0x3100))  # LMCache reads worker 0's chunk
        assert got is not None and _equal(got, latent)
    finally:
        for e in (tp0, tp1, mla0, mla1):
            e.close()


def test_create_connector_builds_it_and_bad_config_is_refused(
    node: NodeProcess, loop: asyncio.AbstractEventLoop
) -> None:
    md = _metadata()
    cpu = LocalCPUBackend(_config(node.url), md)
    conn = CreateConnector("plugin://kvstore", loop, cpu, _config(node.url), md)
    try:
        assert "KVStoreRemoteConnector" in repr(conn.getWrappedConnector())
    finally:
        asyncio.run_coroutine_threadsafe(conn.close(), loop).result(10)
    with pytest.raises(ConfigError, match="url"):
        CreateConnector("plugin://kvstore", loop, cpu, _config(None), md)
    with pytest.raises(ConfigError, match="remote_serde: naive"):
        cachegen = _config(node.url, remote_serde="cachegen")
        CreateConnector("plugin://kvstore", loop, cpu, cachegen, md)


def test_a_chunk_of_another_shape_is_refused_and_nothing_is_stored(
    node: NodeProcess, loop: asyncio.AbstractEventLoop
) -> None:
    engine = Engine(node.url, loop)
    try:
        key = engine.key(0x4000)
        odd_shape = torch.Size([2, LAYERS, 3, HEADS * HEAD_DIM + 1])  # not whole tokens
        odd = engine.cpu.allocate([odd_shape], [torch.bfloat16])
        failed = engine.remote.put_failed_count
        with pytest.raises(ConfigError, match="holds"):
            engine.remote.submit_put_task(key, odd).result(10)
        for _ in range(100):  # LMCache counts the failure in the future's callback
            if engine.remote.put_failed_count > failed:
                break
            threading.Event().wait(0.01)
        assert engine.remote.put_failed_count == failed + 1
        assert not engine.remote.contains(key)
        odd.ref_count_down()
    finally:
        engine.close()
