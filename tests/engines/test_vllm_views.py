"""vLLM 0.33's own KV caches through the connector's view of them.

The caches are what vLLM's worker allocates: ``allocate_kv_cache`` over a
``KVCacheConfig`` of vLLM's own classes, with strides from vLLM's
``compute_layout_strides`` for each of its six ``KVCacheLayout``s, dense
(K|V packed in the last dim) and MLA. Blocks are saved from one layout into a
real ``kvstore serve`` and loaded into caches of another layout, at other
block ids: every byte of every block comes back, and no other block changes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheLayout,
    KVCacheSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)
from vllm.v1.worker.utils import allocate_kv_cache

from client import Client, Namespace
from client.engines.vllm import kv_cache_spec, paged_layers, spec_layout
from kvstore.errors import ConfigError
from tests.engines.vllm_driver import kv_cache_config
from tests.node import NodeProcess, running_node

LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(3)]
NUM_BLOCKS = 12
SPECS: dict[str, KVCacheSpec] = {
    "dense": FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float16),
    "mla": MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.bfloat16),
}
LAYOUTS = list(KVCacheLayout)


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    with running_node(None) as n:
        yield n


def _config(spec: KVCacheSpec, layout: KVCacheLayout) -> KVCacheConfig:
    return kv_cache_config(NUM_BLOCKS, layout, spec, LAYERS)


def _caches(config: KVCacheConfig, layout: KVCacheLayout, seed: int) -> dict[str, torch.Tensor]:
    caches = allocate_kv_cache(config, torch.device("cpu"), layout)
    g = torch.Generator().manual_seed(seed)
    for view in caches.values():
        view.copy_(torch.randn(view.shape, generator=g).to(view.dtype))
    return caches


@pytest.mark.parametrize("kind", SPECS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[x.name for x in LAYOUTS])
def test_blocks_saved_from_one_layout_load_into_another(
    node: NodeProcess, kind: str, layout: KVCacheLayout
) -> None:
    spec = SPECS[kind]
    other = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]
    config = _config(spec, layout)
    src = _caches(config, layout, seed=1)
    dst = _caches(_config(spec, other), other, seed=2)
    before = {name: view.clone() for name, view in dst.items()}
    ns = Namespace(f"vllm-{kind}-{layout.name}", spec_layout(kv_cache_spec(config), len(LAYERS)))
    tokens = list(range(100, 100 + 4 * 16 + 5))  # four full blocks and a tail
    saved, loaded = [7, 2, 11, 0], [3, 5, 1, 9]
    with Client.connect(node.url, namespace=ns) as c:
        assert c.put_paged(tokens, paged_layers(src, spec), saved) == 64
        assert c.get_paged(tokens, paged_layers(dst, spec), loaded) == 64
    for name in LAYERS:
        for s, d in zip(saved, loaded, strict=True):
            assert torch.equal(dst[name][d], src[name][s]), f"{name} block {s} -> {d}"
        for b in set(range(NUM_BLOCKS)) - set(loaded):
            assert torch.equal(dst[name][b], before[name][b]), f"{name} block {b} changed"


def test_the_store_layout_is_what_vllm_allocates() -> None:
    """Dense: K and V of head_size each; MLA: one latent vector per token."""
    dense = spec_layout(SPECS["dense"], 3)
    assert (dense.kv_factor, dense.num_kv_heads, dense.head_dim, dense.block_size) == (2, 2, 64, 16)
    assert dense.block_nbytes == 3 * SPECS["dense"].page_size_bytes
    mla = spec_layout(SPECS["mla"], 3)
    assert (mla.kv_factor, mla.num_kv_heads, mla.head_dim) == (1, 1, 576)
    assert mla.block_nbytes == 3 * SPECS["mla"].page_size_bytes


def test_a_hybrid_model_is_refused_naming_its_groups() -> None:
    full = SPECS["dense"]
    window = SlidingWindowSpec(
        block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float16, sliding_window=128
    )
    config = KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(LAYERS[:2], full), KVCacheGroupSpec(LAYERS[2:], window)],
    )
    with pytest.raises(ConfigError, match="FullAttentionSpec, SlidingWindowSpec"):
        kv_cache_spec(config)
