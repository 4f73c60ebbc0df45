"""The connector driven in vLLM v1's call order over vLLM 0.33's own objects
(``tests/engines/vllm_driver.py``), against a real ``kvstore serve`` node: KV
saved by one engine arrives exactly in another engine's blocks, under another
``KVCacheLayout``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.kv_cache_interface import KVCacheLayout

from client import Client
from kvstore.errors import ConfigError
from kvstore.keys import Namespace
from tests.conftest import random_tokens
from tests.engines.vllm_driver import (
    PagedEngine,
    connector,
    kv_cache_config,
    store_layout,
    vllm_config,
)
from tests.node import NodeProcess, running_node


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    with running_node(None) as n:
        yield n


def _engine(node: NodeProcess, model: str, role: str = "kv_both", seed: int = 0) -> PagedEngine:
    layouts = list(KVCacheLayout)  # engines differ in layout too
    return PagedEngine(vllm_config(node.url, model, role), seed=seed, layout=layouts[seed % 6])


@contextmanager
def _after_producer(
    node: NodeProcess, model: str, prompt: list[int], seed: int
) -> Iterator[PagedEngine]:
    """A fresh engine on a store where another engine already ran ``prompt``."""
    producer = _engine(node, model, seed=seed)
    producer.run("a", prompt)
    engine = _engine(node, model, seed=seed + 1)
    try:
        yield engine
    finally:
        producer.close()
        engine.close()


def _prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in random_tokens(n, seed)]


def _store(node: NodeProcess, model: str) -> Client:
    return Client.connect(node.url, namespace=Namespace(model, store_layout()))


def test_one_engine_saves_and_another_loads_exactly(node: NodeProcess) -> None:
    prompt = _prompt(100, seed=1)  # 6 full blocks and 4 tokens
    producer = _engine(node, "m-roundtrip", "kv_producer", seed=1)
    table_a, seq = producer.run("a", prompt)
    assert producer.loaded == [0] and producer.computed == 102
    consumer = _engine(node, "m-roundtrip", "kv_consumer", seed=2)
    table_b, seq_b = consumer.run("b", prompt)
    assert seq_b == seq
    assert consumer.loaded == [96]
    assert consumer.computed == 4 + 2  # the partial block and two decode steps
    assert table_a[:6] != table_b[:6]  # other blocks of another pool
    assert consumer.expected_ok(table_b, seq, len(seq))
    for name, cache in consumer.caches.items():  # the loaded blocks are the producer's bytes
        for a, b in zip(table_a[:6], table_b[:6], strict=True):
            assert cache[b].equal(producer.caches[name][a])
    with _store(node, "m-roundtrip") as c:
        assert c.lookup(seq) == 96  # the prompt's blocks only; decode tokens are not saved
    producer.close()
    consumer.close()


def test_blocks_in_the_engines_own_prefix_cache_are_not_reloaded(node: NodeProcess) -> None:
    prompt = _prompt(90, seed=2)
    with _after_producer(node, "m-local", prompt, seed=3) as engine:
        local = engine.cache_local(prompt, 2, fill=7.0)  # the engine says it has blocks 0-1
        table, seq = engine.run("b", prompt)
        assert table[:2] == local
        assert engine.loaded == [80 - 32]  # blocks 2-4 from the store
        assert engine.computed == 10 + 2
        for cache in engine.caches.values():
            assert bool((cache[local] == 7.0).all())  # untouched
        assert engine.expected_ok(table, seq, len(seq), skip=32)


def test_chunked_prefill_saves_each_block_as_it_completes(node: NodeProcess) -> None:
    prompt = _prompt(120, seed=3)
    engine = _engine(node, "m-chunked", seed=5)
    seen: list[int] = []
    with _store(node, "m-chunked") as c:
        engine.run("a", prompt, chunk=40, after_step=lambda _: seen.append(c.lookup(prompt)))
    # after 40, 80, 120 prompt tokens, then two decode steps
    assert seen == [32, 80, 112, 112, 112]
    engine.close()


def test_a_block_lost_after_the_lookup_is_recomputed(node: NodeProcess) -> None:
    prompt = _prompt(100, seed=4)
    with _after_producer(node, "m-lost", prompt, seed=6) as engine, _store(node, "m-lost") as c:

        def evict() -> None:  # between the scheduler's lookup and the worker's load
            assert c.delete([c.keys(prompt)[3]]) == 1

        table, seq = engine.run("b", prompt, after_alloc=evict)
        assert engine.loaded == [96]  # what the scheduler was told
        assert engine.computed == 100 - 48 + 2  # blocks 3.. recomputed
        assert engine.expected_ok(table, seq, len(seq))


def test_a_block_aligned_prompt_leaves_its_last_token_to_compute(node: NodeProcess) -> None:
    prompt = _prompt(96, seed=5)
    with _after_producer(node, "m-aligned", prompt, seed=8) as engine:
        table, seq = engine.run("b", prompt)
        assert engine.loaded == [80]
        assert engine.computed == 16 + 2
        assert engine.expected_ok(table, seq, len(seq))


def test_roles_a_consumer_never_saves_and_a_producer_never_loads(node: NodeProcess) -> None:
    prompt = _prompt(64, seed=6)
    consumer = _engine(node, "m-roles", "kv_consumer", seed=10)
    consumer.run("a", prompt)
    with _store(node, "m-roles") as c:
        assert c.lookup(prompt) == 0
        both = _engine(node, "m-roles", seed=11)
        both.run("b", prompt)
        assert c.lookup(prompt) == 64
    producer = _engine(node, "m-roles", "kv_producer", seed=12)
    producer.run("c", prompt)
    assert producer.loaded == [0] and producer.computed == 64 + 2
    for e in (consumer, both, producer):
        e.close()


def test_bad_configs_are_refused_with_the_reason(node: NodeProcess) -> None:
    kv = kv_cache_config(8, KVCacheLayout.LBNHC)
    worker = KVConnectorRole.WORKER
    with pytest.raises(ConfigError, match="url"):
        connector(vllm_config(None, "m-bad"), worker, kv)
    with pytest.raises(ConfigError, match="tensor and pipeline parallel"):
        connector(vllm_config(node.url, "m-bad", tp=2), worker, kv)
