"""A small paged engine that drives a KV connector in vLLM v1's order.

vLLM is too large to install here, so this stands in for its scheduler and
model runner around the connector (the connector itself is the real one):
config objects with the attributes the connector reads, a block pool with an
optional local prefix cache, and steps that call, per request,
``get_num_new_matched_tokens`` -> allocate -> ``update_state_after_alloc``,
then per step ``build_connector_meta`` -> ``bind_connector_metadata`` ->
``start_load_kv`` -> per layer (``wait_for_layer_load``, write KV,
``save_kv_layer``) -> ``wait_for_save`` -> ``clear_connector_metadata``, and
finally ``request_finished``. Blocks the worker reports as failed to load are
recomputed, as vLLM does.

The "model" writes, for each position, KV that depends on every token up to
it (as attention's K and V do), so a block loaded for the wrong prefix or
into the wrong slot is visible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from client.engines.vllm import KVStoreConnector

LAYERS, HEADS, HEAD_DIM, BLOCK = 3, 2, 16, 16


@dataclass
class KVTransferConfig:
    kv_connector: str
    kv_role: str
    kv_connector_extra_config: dict[str, Any]


@dataclass
class ModelConfig:
    model: str
    dtype: torch.dtype = torch.float16

    def get_num_layers(self, parallel_config: Any) -> int:
        return LAYERS

    def get_num_kv_heads(self, parallel_config: Any) -> int:
        return HEADS

    def get_head_size(self) -> int:
        return HEAD_DIM


@dataclass
class CacheConfig:
    block_size: int = BLOCK
    cache_dtype: str = "auto"


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1


@dataclass
class VllmConfig:
    model_config: ModelConfig
    kv_transfer_config: KVTransferConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)


def vllm_config(url: str, model: str, role: str = "kv_both", **extra: Any) -> VllmConfig:
    tc = KVTransferConfig("KVStoreConnector", role, {"url": url, **extra})
    return VllmConfig(ModelConfig(model), tc)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]


class KVCacheBlocks:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (list(self.ids),)


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    req_ids: list[str]
    new_block_ids: list[tuple[list[int], ...] | None]
    num_computed_tokens: list[int]


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]


def token_kv(layer: int, prefix: list[int]) -> torch.Tensor:
    """K and V ``[2, heads, head_dim]`` of the last token of ``prefix``."""
    digest = hashlib.blake2b(repr((layer, prefix)).encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randn(2, HEADS, HEAD_DIM, generator=g).to(torch.float16)


def layer_name(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


class PagedEngine:
    """One engine: a scheduler-side and a worker-side connector over its own caches."""

    def __init__(self, config: VllmConfig, *, num_blocks: int = 48, seed: int = 0) -> None:
        self.caches = {
            layer_name(i): torch.zeros(2, num_blocks, BLOCK, HEADS, HEAD_DIM, dtype=torch.float16)
            for i in range(LAYERS)
        }
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        self.free = [int(b) for b in order]
        self.local: dict[tuple[int, ...], int] = {}  # the engine's own prefix cache
        self.scheduler = KVStoreConnector(config, "SCHEDULER")
        self.worker = KVStoreConnector(config, "WORKER")
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
                cache[:, b] = fill
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
        req = Request(req_id, prompt)
        table: list[int] = []
        while tuple(prompt[: (len(table) + 1) * BLOCK]) in self.local:
            table.append(self.local[tuple(prompt[: (len(table) + 1) * BLOCK])])
        local = len(table) * BLOCK
        external, is_async = self.scheduler.get_num_new_matched_tokens(req, local)
        assert external is not None and not is_async
        self.loaded.append(external)
        total = len(prompt) + decode_steps
        table += [self.free.pop() for _ in range(-(-total // BLOCK) - len(table))]
        self.scheduler.update_state_after_alloc(req, KVCacheBlocks(table), external)
        if after_alloc is not None:
            after_alloc()
        seq = list(prompt)
        done = local + external
        step = 0
        while done < total:
            n = min(chunk or len(prompt), len(prompt) - done) if done < len(prompt) else 1
            if step == 0:
                new = [NewRequestData(req_id, prompt, (list(table),), done)]
                cached = CachedRequestData([], [], [])
            else:
                new, cached = [], CachedRequestData([req_id], [None], [done])
            meta = self.scheduler.build_connector_meta(SchedulerOutput(new, cached, {req_id: n}))
            self.worker.bind_connector_metadata(meta)
            self.worker.start_load_kv(None)
            failed = self.worker.get_block_ids_with_load_errors()
            start = done
            if failed:  # recompute from the first block that did not load
                start = min(table.index(b) for b in failed) * BLOCK
            for i in range(LAYERS):
                name = layer_name(i)
                self.worker.wait_for_layer_load(name)
                for p in range(start, done + n):
                    self.caches[name][:, table[p // BLOCK], p % BLOCK] = token_kv(i, seq[: p + 1])
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
        for i in range(LAYERS):
            cache = self.caches[layer_name(i)]
            for p in range(skip, upto):
                if not torch.equal(
                    cache[:, table[p // BLOCK], p % BLOCK], token_kv(i, seq[: p + 1])
                ):
                    return False
        return True
