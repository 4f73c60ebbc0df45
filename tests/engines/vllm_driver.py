"""A paged engine that drives the connector in vLLM v1's call order, over
vLLM 0.33's own objects: ``KVConnectorFactory`` builds the connectors from a
real ``VllmConfig``/``KVTransferConfig`` and ``KVCacheConfig``; caches are
``allocate_kv_cache``'s views under a ``KVCacheLayout``; requests and steps are
vLLM's ``Request``, ``KVCacheBlocks``, ``NewRequestData``,
``CachedRequestData`` and ``SchedulerOutput``. What it stands in for is only
vLLM's scheduler loop and model runner: per request
``get_num_new_matched_tokens`` -> allocate -> ``update_state_after_alloc``,
then per step ``build_connector_meta`` -> ``bind_connector_metadata`` ->
``start_load_kv`` -> per layer (``wait_for_layer_load``, write KV,
``save_kv_layer``) -> ``wait_for_save`` -> ``clear_connector_metadata``, and
finally ``request_finished``. Blocks the worker reports as failed to load are
recomputed, as vLLM does with ``kv_load_failure_policy: "recompute"``.

The "model" writes, for each position, KV that depends on every token up to
it (as attention's K and V do), so a block loaded for the wrong prefix or
into the wrong slot is visible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import DeviceConfig, KVTransferConfig, ParallelConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheLayout,
    KVCacheSpec,
    KVCacheTensor,
    compute_layout_strides,
)
from vllm.v1.request import Request
from vllm.v1.worker.utils import allocate_kv_cache

from client.engines.vllm import spec_layout
from kvstore.layout import KVLayout

LAYERS, HEADS, HEAD_DIM, BLOCK = 3, 2, 16, 16
SPEC = FullAttentionSpec(
    block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.float16
)
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


def store_layout() -> KVLayout:
    return spec_layout(SPEC, LAYERS)


def kv_cache_config(
    num_blocks: int,
    layout: KVCacheLayout,
    spec: KVCacheSpec = SPEC,
    layers: list[str] = LAYER_NAMES,
) -> KVCacheConfig:
    """What vLLM's planner makes for one group of ``layers`` under ``layout``."""
    layer_stride, block_stride, *_ = compute_layout_strides(spec, num_blocks, len(layers), layout)
    tensor = KVCacheTensor(
        size=spec.page_size_bytes * num_blocks * len(layers),
        layers=layers,
        layer_stride=layer_stride,
        block_stride=block_stride,
    )
    return KVCacheConfig(num_blocks, [tensor], [KVCacheGroupSpec(layers, spec)])


def vllm_config(
    url: str | None, model: str, role: str = "kv_both", *, tp: int = 1, **extra: Any
) -> VllmConfig:
    transfer = KVTransferConfig(
        kv_connector="KVStoreConnector",
        kv_connector_module_path="client.engines.vllm",
        kv_role=role,  # type: ignore[arg-type]
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={**({"url": url} if url else {}), "model": model, **extra},
    )
    return VllmConfig(
        kv_transfer_config=transfer,
        device_config=DeviceConfig(device="cpu"),
        parallel_config=ParallelConfig(tensor_parallel_size=tp),
    )


def connector(config: VllmConfig, role: KVConnectorRole, kv_config: KVCacheConfig) -> Any:
    return KVConnectorFactory.create_connector(config, role, kv_config)


def token_kv(layer: int, prefix: list[int]) -> torch.Tensor:
    """The packed K|V ``[heads, 2 * head_dim]`` of the last token of ``prefix``."""
    digest = hashlib.blake2b(repr((layer, prefix)).encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    kv = torch.randn(2, HEADS, HEAD_DIM, generator=g).to(torch.float16)
    return kv.permute(1, 0, 2).reshape(HEADS, 2 * HEAD_DIM)


class PagedEngine:
    """One engine: a scheduler-side and a worker-side connector over its own caches."""

    def __init__(
        self,
        config: VllmConfig,
        *,
        num_blocks: int = 48,
        seed: int = 0,
        layout: KVCacheLayout = KVCacheLayout.LBNHC,
    ) -> None:
        kv_config = kv_cache_config(num_blocks, layout)
        self.caches = allocate_kv_cache(kv_config, torch.device("cpu"), layout)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        self.free = [int(b) for b in order]
        self.local: dict[tuple[int, ...], int] = {}  # the engine's own prefix cache
        self.scheduler = connector(config, KVConnectorRole.SCHEDULER, kv_config)
        self.worker = connector(config, KVConnectorRole.WORKER, kv_config)
        self.worker.register_kv_caches(self.caches)
        self.computed = 0  # tokens the model ran
        self.loaded: list[int] = []  # external tokens the connector announced, per request

    def close(self) -> None:
        self.scheduler.shutdown()
        self.worker.shutdown()

    def cache_local(self, prompt: list[int], blocks: int, fill: float) -> list[int]:
        """Put the first ``blocks`` of ``prompt`` in the local prefix cache,
        their contents set to ``fill`` (a sentinel the connector must not touch)."""
        ids = []
        for i in range(blocks):
            b = self.free.pop()
            for cache in self.caches.values():
                cache[b] = fill
            self.local[tuple(prompt[: (i + 1) * BLOCK])] = b
            ids.append(b)
        return ids

    def run(
        self,
        req_id: str,
        prompt: list[int],
        *,
        decode_steps: int = 2,
        chunk: int | None = None,
        after_alloc: Callable[[], None] | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> tuple[list[int], list[int]]:
        """Prefill ``prompt`` (in chunks of ``chunk`` tokens) and decode; the
        block table and the full sequence (prompt + generated tokens)."""
        req = Request(req_id, prompt, SamplingParams(max_tokens=decode_steps), None)
        table: list[int] = []
        while tuple(prompt[: (len(table) + 1) * BLOCK]) in self.local:
            table.append(self.local[tuple(prompt[: (len(table) + 1) * BLOCK])])
        local = len(table) * BLOCK
        external, is_async = self.scheduler.get_num_new_matched_tokens(req, local)
        assert external is not None and not is_async
        self.loaded.append(external)
        total = len(prompt) + decode_steps
        table += [self.free.pop() for _ in range(-(-total // BLOCK) - len(table))]
        blocks = KVCacheBlocks(([KVCacheBlock(b) for b in table],))
        self.scheduler.update_state_after_alloc(req, blocks, external)
        if after_alloc is not None:
            after_alloc()
        seq = list(prompt)
        done = local + external
        step = 0
        while done < total:
            n = min(chunk or len(prompt), len(prompt) - done) if done < len(prompt) else 1
            if step == 0:
                req.num_computed_tokens = done
                new = [NewRequestData.from_request(req, (list(table),))]
                cached = CachedRequestData.make_empty()
            else:
                new = []
                cached = CachedRequestData(
                    req_ids=[req_id],
                    resumed_req_ids=set(),
                    new_token_ids=[[]],
                    all_token_ids={},
                    new_block_ids=[None],
                    num_computed_tokens=[done],
                    num_output_tokens=[max(0, done - len(prompt))],
                )
            meta = self.scheduler.build_connector_meta(
                SchedulerOutput(
                    scheduled_new_reqs=new,
                    scheduled_cached_reqs=cached,
                    num_scheduled_tokens={req_id: n},
                    total_num_scheduled_tokens=n,
                    scheduled_spec_decode_tokens={},
                    scheduled_encoder_inputs={},
                    finished_req_ids=set(),
                    free_encoder_mm_hashes=[],
                )
            )
            self.worker.bind_connector_metadata(meta)
            self.worker.start_load_kv(None)
            failed = self.worker.get_block_ids_with_load_errors()
            start = done
            if failed:  # recompute from the first block that did not load
                start = min(table.index(b) for b in failed) * BLOCK
            for i, name in enumerate(LAYER_NAMES):
                self.worker.wait_for_layer_load(name)
                for p in range(start, done + n):
                    self.caches[name][table[p // BLOCK], :, p % BLOCK] = token_kv(i, seq[: p + 1])
                self.worker.save_kv_layer(name, self.caches[name], None)
            self.worker.wait_for_save()
            self.worker.clear_connector_metadata()
            self.computed += done + n - start
            done += n
            if done >= len(prompt):  # the step's sampled token joins the sequence
                seq.append((sum(seq) + done) % 32000)
            if after_step is not None:
                after_step(step)
            step += 1
        self.scheduler.request_finished(req, table)
        return table, seq[:total]

    def expected_ok(self, table: list[int], seq: list[int], upto: int, skip: int = 0) -> bool:
        """Whether the cache holds the right KV for positions ``skip..upto``."""
        for i, name in enumerate(LAYER_NAMES):
            cache = self.caches[name]
            for p in range(skip, upto):
                if not torch.equal(
                    cache[table[p // BLOCK], :, p % BLOCK], token_kv(i, seq[: p + 1])
                ):
                    return False
        return True
