"""The connector as vLLM 0.33 builds and calls it: its factory makes
``KVStoreConnector`` from a real ``KVTransferConfig`` for both roles, the
scheduler side answers for a real ``Request``, and worker sides save from and
load into vLLM's own KV views (two engines, two ``KVCacheLayout``s) through a
real ``kvstore serve``. This is the path that failed with "KV cache layer 0
has shape (8, 2, 16, 32)" before the connector read vLLM's views."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from vllm import SamplingParams
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
from vllm.v1.kv_cache_interface import KVCacheLayout
from vllm.v1.request import Request
from vllm.v1.worker.utils import allocate_kv_cache

from client.engines.vllm import BlockTransfer, StoreConnectorMetadata
from tests.engines.vllm_driver import LAYER_NAMES as LAYERS
from tests.engines.vllm_driver import connector, kv_cache_config, vllm_config
from tests.node import NodeProcess, running_node

NUM_BLOCKS = 8


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    with running_node(None) as n:
        yield n


def _kv_cache_config(layout: KVCacheLayout) -> Any:
    return kv_cache_config(NUM_BLOCKS, layout)


def _connector(url: str, role: KVConnectorRole, layout: KVCacheLayout) -> Any:
    return connector(vllm_config(url, "tiny"), role, _kv_cache_config(layout))


def test_vllm_builds_the_connector_and_it_moves_real_kv_views(node: NodeProcess) -> None:
    prompt = list(range(500, 500 + 3 * 16 + 7))  # three full blocks and a tail
    producer = _connector(node.url, KVConnectorRole.WORKER, KVCacheLayout.LBNHC)
    consumer = _connector(node.url, KVConnectorRole.WORKER, KVCacheLayout.BHLNC)
    scheduler = _connector(node.url, KVConnectorRole.SCHEDULER, KVCacheLayout.LBNHC)
    try:
        assert isinstance(producer, KVConnectorBase_V1)
        src = allocate_kv_cache(_kv_cache_config(KVCacheLayout.LBNHC), torch.device("cpu"),
                                KVCacheLayout.LBNHC)  # fmt: skip
        g = torch.Generator().manual_seed(3)
        for view in src.values():
            view.copy_(torch.randn(view.shape, generator=g).to(view.dtype))
        producer.register_kv_caches(src)
        producer.bind_connector_metadata(
            StoreConnectorMetadata(saves=[BlockTransfer("a", tuple(prompt[:48]), (6, 1, 4))])
        )
        producer.wait_for_save()  # vLLM 0.33's views: this raised LayoutError before
        producer.clear_connector_metadata()

        request = Request("b", prompt, SamplingParams(max_tokens=4), None)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (48, False)
        assert scheduler.get_num_new_matched_tokens(request, 16) == (32, False)

        dst = allocate_kv_cache(_kv_cache_config(KVCacheLayout.BHLNC), torch.device("cpu"),
                                KVCacheLayout.BHLNC)  # fmt: skip
        consumer.register_kv_caches(dst)
        consumer.bind_connector_metadata(
            StoreConnectorMetadata(loads=[BlockTransfer("b", tuple(prompt[:48]), (2, 7, 0))])
        )
        consumer.start_load_kv(None)
        assert consumer.get_block_ids_with_load_errors() == set()
        for name in LAYERS:
            for s, d in ((6, 2), (1, 7), (4, 0)):
                assert torch.equal(dst[name][d], src[name][s]), f"{name} block {s} -> {d}"
    finally:
        for c in (producer, consumer, scheduler):
            c.shutdown()


def test_a_load_that_falls_short_saves_nothing_of_that_request(node: NodeProcess) -> None:
    """The second of three blocks is deleted between lookup and load. vLLM is
    told which blocks to recompute, and the save planned in the same step (the
    request's blocks, the unloaded ones holding whatever memory held) never
    reaches the store."""
    prompt = list(range(900, 900 + 3 * 16 + 1))
    keys_of = _connector(node.url, KVConnectorRole.SCHEDULER, KVCacheLayout.LBNHC)
    producer = _connector(node.url, KVConnectorRole.WORKER, KVCacheLayout.LBNHC)
    consumer = _connector(node.url, KVConnectorRole.WORKER, KVCacheLayout.LBNHC)
    try:
        config = _kv_cache_config(KVCacheLayout.LBNHC)
        src = allocate_kv_cache(config, torch.device("cpu"), KVCacheLayout.LBNHC)
        for view in src.values():
            view.copy_(torch.randn(view.shape, generator=torch.Generator().manual_seed(5)).half())
        producer.register_kv_caches(src)
        producer.bind_connector_metadata(
            StoreConnectorMetadata(saves=[BlockTransfer("p", tuple(prompt[:48]), (0, 1, 2))])
        )
        producer.wait_for_save()
        keys = keys_of.client.keys(prompt[:48])
        assert keys_of.client.delete(keys[1:2]) == 1  # evicted after the lookup said 48

        dst = allocate_kv_cache(config, torch.device("cpu"), KVCacheLayout.LBNHC)
        for view in dst.values():
            view.fill_(7.0)  # what memory held: not this prompt's KV
        consumer.register_kv_caches(dst)
        blocks = (5, 6, 7)
        consumer.bind_connector_metadata(
            StoreConnectorMetadata(
                loads=[BlockTransfer("q", tuple(prompt[:48]), blocks)],
                saves=[BlockTransfer("q", tuple(prompt[:48]), blocks)],
            )
        )
        consumer.start_load_kv(None)
        assert consumer.get_block_ids_with_load_errors() == {6, 7}
        consumer.wait_for_save()
        assert keys_of.client.exists(keys) == [True, False, True], "garbage KV was saved"
        assert consumer.requires_kv_delivery is False
    finally:
        for c in (keys_of, producer, consumer):
            c.shutdown()


def _step(new: list[Any], cached: Any, scheduled: dict[str, int]) -> Any:
    from vllm.v1.core.sched.output import SchedulerOutput

    return SchedulerOutput(
        scheduled_new_reqs=new,
        scheduled_cached_reqs=cached,
        num_scheduled_tokens=scheduled,
        total_num_scheduled_tokens=sum(scheduled.values()),
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        finished_req_ids=set(),
        free_encoder_mm_hashes=[],
    )


def test_a_resumed_request_saves_from_its_new_block_table(node: NodeProcess) -> None:
    """Chunked prefill saves two blocks; the request is preempted and resumed
    with a new block table; the next save names blocks of that table, not of
    the old one with the new ids appended."""
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData

    prompt = list(range(40, 40 + 3 * 16 + 1))
    scheduler = _connector(node.url, KVConnectorRole.SCHEDULER, KVCacheLayout.LBNHC)
    try:
        request = Request("r", prompt, SamplingParams(max_tokens=4), None)
        new = NewRequestData.from_request(request, ([0, 1],))
        meta = scheduler.build_connector_meta(
            _step([new], CachedRequestData.make_empty(), {"r": 32})
        )
        assert [(s.req_id, s.block_ids) for s in meta.saves] == [("r", (0, 1))]
        resumed = CachedRequestData(
            req_ids=["r"],
            resumed_req_ids={"r"},
            new_token_ids=[[]],
            all_token_ids={},
            new_block_ids=[([5, 6, 7, 3],)],
            num_computed_tokens=[32],  # its own prefix cache held the two saved blocks
            num_output_tokens=[0],
        )
        meta = scheduler.build_connector_meta(_step([], resumed, {"r": 17}))
        assert [(s.block_ids, len(s.tokens)) for s in meta.saves] == [((5, 6, 7), 48)]
    finally:
        scheduler.shutdown()


def test_other_cache_salts_and_adapters_never_share_kv(node: NodeProcess) -> None:
    """One prompt saved under ``cache_salt="tenant-a"`` through the scheduler's
    own plan: the same prompt with that salt hits; with no salt, another salt,
    or a LoRA adapter it misses, as vLLM's own prefix cache would."""
    from vllm.lora.request import LoRARequest
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData

    prompt = list(range(7000, 7000 + 3 * 16 + 1))
    params = SamplingParams(max_tokens=1)
    scheduler = _connector(node.url, KVConnectorRole.SCHEDULER, KVCacheLayout.LBNHC)
    producer = _connector(node.url, KVConnectorRole.WORKER, KVCacheLayout.LBNHC)
    try:
        salted = Request("s", prompt, params, None, cache_salt="tenant-a")
        assert scheduler.get_num_new_matched_tokens(salted, 0) == (0, False)
        new = NewRequestData.from_request(salted, ([0, 1, 2, 3],))
        meta = scheduler.build_connector_meta(
            _step([new], CachedRequestData.make_empty(), {"s": len(prompt)})
        )
        assert [s.salt for s in meta.saves] == [b"salt:tenant-a"]
        config = _kv_cache_config(KVCacheLayout.LBNHC)
        producer.register_kv_caches(
            allocate_kv_cache(config, torch.device("cpu"), KVCacheLayout.LBNHC)
        )
        producer.bind_connector_metadata(meta)
        producer.wait_for_save()
        again = Request("s2", prompt, params, None, cache_salt="tenant-a")
        assert scheduler.get_num_new_matched_tokens(again, 0) == (48, False)
        adapter = LoRARequest("adapter-x", 1, "/nonexistent/adapter-x")
        for other in (
            Request("plain", prompt, params, None),
            Request("b", prompt, params, None, cache_salt="tenant-b"),
            Request("l", prompt, params, None, lora_request=adapter, cache_salt="tenant-a"),
        ):
            assert scheduler.get_num_new_matched_tokens(other, 0) == (0, False), other.request_id
    finally:
        scheduler.shutdown()
        producer.shutdown()


def test_an_mla_model_moves_through_the_connector(node: NodeProcess) -> None:
    """MLA (one latent vector per token, one copy for every head): the
    connector's layout has K/V factor 1 and the blocks move byte for byte
    from an LBNHC engine to a BLHNC one."""
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    mla = MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    config = vllm_config(node.url, "tiny-mla")
    prompt = list(range(3000, 3000 + 2 * 16 + 3))
    layouts = (KVCacheLayout.LBNHC, KVCacheLayout.BLHNC)
    kv = [kv_cache_config(NUM_BLOCKS, layout, mla) for layout in layouts]
    producer = connector(config, KVConnectorRole.WORKER, kv[0])
    consumer = connector(config, KVConnectorRole.WORKER, kv[1])
    try:
        assert (producer.layout.kv_factor, producer.layout.head_dim) == (1, 576)
        src = allocate_kv_cache(kv[0], torch.device("cpu"), layouts[0])
        g = torch.Generator().manual_seed(9)
        for view in src.values():
            view.copy_(torch.randn(view.shape, generator=g).to(view.dtype))
        producer.register_kv_caches(src)
        producer.bind_connector_metadata(
            StoreConnectorMetadata(saves=[BlockTransfer("m", tuple(prompt[:32]), (3, 5))])
        )
        producer.wait_for_save()
        dst = allocate_kv_cache(kv[1], torch.device("cpu"), layouts[1])
        consumer.register_kv_caches(dst)
        consumer.bind_connector_metadata(
            StoreConnectorMetadata(loads=[BlockTransfer("m", tuple(prompt[:32]), (0, 6))])
        )
        consumer.start_load_kv(None)
        assert consumer.get_block_ids_with_load_errors() == set()
        for name in LAYERS:
            assert torch.equal(dst[name][0], src[name][3]) and torch.equal(
                dst[name][6], src[name][5]
            )
    finally:
        producer.shutdown()
        consumer.shutdown()
