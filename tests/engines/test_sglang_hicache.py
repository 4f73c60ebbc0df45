"""SGLang 0.5.23's HiCache storage tier, loaded the way SGLang loads it:
``StorageBackendFactory.create_backend("dynamic", ...)`` with the extra
config of ``--hicache-storage-backend-extra-config``, over a real node."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from tests.node import NodeProcess, running_node

PAGE = 2 * 4 * 64 * 8  # bf16 elements of one page: K/V x layers x page tokens x head dim


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    with running_node(None) as n:
        yield n


def _backend(
    url: str, *, tp_rank: int = 0, tp_size: int = 1, mla: bool = False, page_first: bool = True
) -> Any:
    config = HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=mla,
        enable_storage_metrics=False,
        is_page_first_layout=page_first,
        model_name="Qwen/tiny",
        extra_config={
            "backend_name": "kvstore",
            "module_path": "client.engines.sglang",
            "class_name": "KVStoreHiCache",
            **({"url": url} if url else {}),
        },
    )
    return StorageBackendFactory.create_backend("dynamic", config, None)


def _pages(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(PAGE, generator=g).to(torch.bfloat16) for _ in range(n)]


def test_pages_round_trip_and_batch_exists_counts_leading_hits(node: NodeProcess) -> None:
    writer, reader = _backend(node.url), _backend(node.url)
    try:
        assert isinstance(writer, HiCacheStorage)
        keys = [f"page-{i:04x}" for i in range(6)]
        pages = _pages(6, seed=1)
        assert writer.batch_set(keys[:4], pages[:4])
        assert writer.set(keys[5], pages[5])
        assert writer.batch_exists(keys) == 4  # page 4 is missing: the prefix stops there
        assert writer.exists(keys[5]) and not writer.exists(keys[4])
        outs = [torch.zeros(PAGE, dtype=torch.bfloat16) for _ in keys]
        got = reader.batch_get(keys, outs)
        assert [g is not None for g in got] == [True] * 4 + [False, True]
        for i in (0, 1, 2, 3, 5):
            assert torch.equal(outs[i], pages[i])
        one = torch.zeros(PAGE, dtype=torch.bfloat16)
        assert reader.get(keys[2], one) is one and torch.equal(one, pages[2])
        assert reader.get(keys[4], one) is None
    finally:
        writer.close()
        reader.close()


def test_tp_ranks_have_their_own_keys_and_mla_ranks_share(node: NodeProcess) -> None:
    keys, pages = ["shared-0", "shared-1"], _pages(2, seed=2)
    rank0, rank1 = _backend(node.url, tp_size=2), _backend(node.url, tp_rank=1, tp_size=2)
    mla0, mla1 = (_backend(node.url, tp_rank=r, tp_size=2, mla=True) for r in (0, 1))
    try:
        assert rank0.batch_set(keys, pages)
        rank1.batch_get(keys, [torch.zeros(PAGE, dtype=torch.bfloat16) for _ in keys])
        assert rank1.batch_exists(keys) == 0  # rank 1's heads are other bytes
        assert mla0.batch_set(keys, pages)
        outs = [torch.zeros(PAGE, dtype=torch.bfloat16) for _ in keys]
        assert all(o is not None for o in mla1.batch_get(keys, outs))
        assert all(torch.equal(o, p) for o, p in zip(outs, pages, strict=True))
    finally:
        for b in (rank0, rank1, mla0, mla1):
            b.close()


def test_host_pools_of_two_layouts_never_read_each_others_pages(node: NodeProcess) -> None:
    """A flat page is laid out as its host pool is (SGLang flattens a page
    view of the pool), so a layer-first reader must not get page-first bytes."""
    keys, pages = ["layout-0", "layout-1"], _pages(2, seed=3)
    writer, same = _backend(node.url), _backend(node.url)
    layer_first = _backend(node.url, page_first=False)
    try:
        assert writer.batch_set(keys, pages)
        outs = [torch.zeros(PAGE, dtype=torch.bfloat16) for _ in keys]
        assert layer_first.batch_get(keys, outs) == [None, None]
        assert layer_first.batch_exists(keys) == 0
        assert all(o is not None for o in same.batch_get(keys, outs))
        assert all(torch.equal(o, p) for o, p in zip(outs, pages, strict=True))
    finally:
        for b in (writer, same, layer_first):
            b.close()


def test_a_config_without_url_is_refused() -> None:
    from kvstore.errors import ConfigError

    with pytest.raises(ConfigError, match="url"):
        _backend("")
