"""Client.put_paged / get_paged: an engine's paged caches in and out of the
store, locally and through a real node, checked against the prompt-shaped
put/get path (so both agree on the payload layout)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from client import Client
from kvstore.config import HbmConfig
from kvstore.errors import InvalidArgumentError, LayoutError
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from tests.conftest import LAYOUT, make_config, random_tokens
from tests.node import running_node

NUM_BLOCKS = 32


def _engine_caches(seed: int, layout: KVLayout = LAYOUT, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if layout.kv_factor == 2:
        shape: tuple[int, ...] = (
            2,
            NUM_BLOCKS,
            layout.block_size,
            layout.num_kv_heads,
            layout.head_dim,
        )
    else:
        shape = (NUM_BLOCKS, layout.block_size, layout.head_dim)
    return [
        torch.randn(shape, generator=g).to(layout.torch_dtype).to(device)
        for _ in range(layout.num_layers)
    ]


def _prompt_kv(
    caches: list[torch.Tensor], table: list[int], num_tokens: int, layout: KVLayout
) -> torch.Tensor:
    """The prompt-shaped KV the engine's block table describes, token by token."""
    out = torch.empty(layout.prompt_shape(num_tokens), dtype=layout.torch_dtype)
    caches = [c.cpu() for c in caches]
    bs = layout.block_size
    for t in range(num_tokens):
        block, slot = table[t // bs], t % bs
        for layer, cache in enumerate(caches):
            if layout.kv_factor == 2:
                out[layer, :, t] = cache[:, block, slot]
            else:
                out[layer, 0, t, 0] = cache[block, slot]
    return out


def _round_trip(c: Client, layout: KVLayout, device: str = "cpu") -> None:
    tokens = random_tokens(6 * layout.block_size + 5, seed=1)  # 6 full blocks and a partial one
    caches = _engine_caches(2, layout, device)
    table = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(3))[:7].tolist()
    assert c.put_paged(tokens, caches, table) == 6 * layout.block_size
    assert c.lookup(tokens) == 6 * layout.block_size

    # the prompt-shaped get sees exactly the engine's tokens
    n = 6 * layout.block_size
    into = torch.zeros(layout.prompt_shape(n), dtype=layout.torch_dtype)
    assert c.get(tokens, into) == n
    assert torch.equal(into, _prompt_kv(caches, table, n, layout))

    # a decode engine with other caches and another block table
    target = _engine_caches(4, layout, device)
    before = [t.cpu() for t in target]
    table2 = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(5))[:7].tolist()
    assert c.get_paged(tokens, target, table2) == n
    assert torch.equal(_prompt_kv(target, table2, n, layout), into)
    untouched = [b for b in range(NUM_BLOCKS) if b not in table2[:6]]
    for t, b in zip((t.cpu() for t in target), before, strict=True):
        dim = 1 if layout.kv_factor == 2 else 0
        assert torch.equal(
            t.index_select(dim, torch.tensor(untouched)),
            b.index_select(dim, torch.tensor(untouched)),
        )


def test_put_paged_and_get_paged_round_trip_locally() -> None:
    ns = Namespace("tiny-llama", LAYOUT)
    with Client.local(make_config(None), namespace=ns) as c:
        _round_trip(c, LAYOUT)


def test_mla_caches_round_trip() -> None:
    mla = KVLayout(
        num_layers=3, num_kv_heads=1, head_dim=96, block_size=16, dtype="bfloat16", kv_factor=1
    )
    with Client.local(make_config(None), namespace=Namespace("tiny-mla", mla)) as c:
        _round_trip(c, mla)


def test_partial_hits_fill_only_the_cached_prefix_and_known_blocks_are_not_copied() -> None:
    ns = Namespace("tiny-llama", LAYOUT)
    with Client.local(make_config(None), namespace=ns) as c:
        tokens = random_tokens(5 * 16, seed=7)
        caches = _engine_caches(8)
        table = [9, 3, 17, 0, 25]
        assert c.put_paged(tokens[:48], caches, table[:3]) == 48
        puts = c.stats().puts
        assert c.put_paged(tokens[:48], caches, table[:3]) == 48
        assert c.stats().puts == puts  # found by lookup: nothing gathered or sent

        target = _engine_caches(10)
        before = [t.clone() for t in target]
        assert c.get_paged(tokens, target, [1, 2, 4, 5, 6]) == 48
        for t, b, src in zip(target, before, caches, strict=True):
            assert torch.equal(t[:, [1, 2, 4]], src[:, table[:3]])
            assert torch.equal(t[:, [5, 6]], b[:, [5, 6]])  # past the first miss: untouched

        # extending the chain stores only the new blocks, parented on the old
        assert c.put_paged(tokens, caches, table) == 80
        assert c.stats().puts == puts + 2
        assert c.lookup(tokens) == 80


def test_get_paged_from_start_leaves_the_engines_own_blocks_alone() -> None:
    ns = Namespace("tiny-llama", LAYOUT)
    with Client.local(make_config(None), namespace=ns) as c:
        tokens = random_tokens(5 * 16, seed=11)
        caches = _engine_caches(12)
        c.put_paged(tokens, caches, [0, 1, 2, 3, 4])
        target = _engine_caches(13)
        before = [t.clone() for t in target]
        table = [7, 8, 9, 10, 11]
        # the engine holds blocks 0-1 itself (its prefix cache): only 2-4 are read
        assert c.get_paged(tokens, target, table, start=32) == 80
        for t, b, src in zip(target, before, caches, strict=True):
            assert torch.equal(t[:, [7, 8]], b[:, [7, 8]])
            assert torch.equal(t[:, [9, 10, 11]], src[:, [2, 3, 4]])
        # a start past the cached blocks reads nothing; a start inside a block is refused
        assert c.get_paged(tokens[:48], target, table, start=64) == 48
        with pytest.raises(InvalidArgumentError, match="whole number of blocks"):
            c.get_paged(tokens, target, table, start=20)
        # ids need only be distinct where blocks are written
        assert c.get_paged(tokens, target, [7, 7, 9, 10, 11], start=32) == 80


def test_bad_paged_input_is_refused_before_the_store_is_touched() -> None:
    ns = Namespace("tiny-llama", LAYOUT)
    with Client.local(make_config(None), namespace=ns) as c:
        tokens = random_tokens(64, seed=1)
        caches = _engine_caches(1)
        with pytest.raises(InvalidArgumentError, match="4 full blocks of tokens but a block table"):
            c.put_paged(tokens, caches, [0, 1, 2])
        with pytest.raises(LayoutError, match="namespace's layout"):
            c.put_paged(tokens, [t.float() for t in caches], [0, 1, 2, 3])
        with pytest.raises(LayoutError, match="namespace's layout"):
            c.put_paged(tokens, caches[:3], [0, 1, 2, 3])
        with pytest.raises(InvalidArgumentError, match="out of range"):
            c.put_paged(tokens, caches, [0, 1, 2, NUM_BLOCKS])
        assert c.stats().blocks == 0
        c.put_paged(tokens, caches, [0, 1, 2, 3])
        target = _engine_caches(2)
        before = [t.clone() for t in target]
        hits = c.stats().hits
        with pytest.raises(InvalidArgumentError, match="appears twice"):
            c.get_paged(tokens, target, [5, 6, 5, 7])
        assert c.stats().hits == hits
        assert all(torch.equal(a, b) for a, b in zip(target, before, strict=True))


@pytest.mark.parametrize("backend", ["tcp", "shm"])
def test_paged_round_trip_through_a_node(tmp_path: Path, backend: str) -> None:
    ns = Namespace("tiny-llama", LAYOUT)
    with (
        running_node(tmp_path / "ssd", "--transfer", backend) as node,
        Client.connect(node.url, namespace=ns) as c,
    ):
        _round_trip(c, LAYOUT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_paged_round_trip_from_gpu_caches_through_an_hbm_tier() -> None:
    cfg = replace(make_config(None), hbm=HbmConfig(capacity=16 << 20))
    with Client.local(cfg, namespace=Namespace("tiny-llama", LAYOUT)) as c:
        _round_trip(c, LAYOUT, "cuda")
        hbm = c.stats().tiers[0]
        assert hbm.name == "hbm" and hbm.blocks == 6 and hbm.hits >= 6
