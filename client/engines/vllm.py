"""A KV connector for vLLM v1 (the ``KVConnectorBase_V1`` API) over the client.

vLLM builds two instances: one in the scheduler, which asks the store how
much of a new prompt it holds and writes per-step plans
(``StoreConnectorMetadata``), and one in each worker, which carries the plans
out on the engine's paged caches with the native gather/scatter. Register it
with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "client.engines.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"url": "kvstore://127.0.0.1:50061"}}'

A store block holds every layer of its tokens, so loads complete inside
``start_load_kv`` (``wait_for_layer_load`` has nothing left to wait for) and
saves happen once per step in ``wait_for_save``, after the last layer wrote
its KV. Blocks the store already has are never copied again. A block that
cannot be loaded (evicted between the scheduler's lookup and the load, or
damaged) is reported through ``get_block_ids_with_load_errors``, and vLLM
recomputes from there.

vLLM is not a dependency: where it is installed the connector subclasses its
base class; elsewhere (tests) it stands alone with the same methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from client.client import Client
from kvstore.errors import ConfigError, LayoutError
from kvstore.keys import Namespace
from kvstore.layout import DTYPES, KVLayout, dtype_name

_CACHE_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


@dataclass(frozen=True)
class BlockTransfer:
    """Whole blocks of one request moving between the engine and the store."""

    req_id: str
    tokens: tuple[int, ...]  # the prefix whose full blocks move
    block_ids: tuple[int, ...]  # the request's block table (at least those blocks)
    start: int = 0  # tokens the engine already holds (its own prefix cache): not moved
    salt: bytes = b""  # what else the KV depends on (request_salt)


@dataclass
class StoreConnectorMetadata:
    """One step's plan, from the scheduler's connector to the workers'."""

    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)


@dataclass
class _Prompt:
    tokens: tuple[int, ...]
    block_ids: list[int]
    saved: int = 0  # prompt tokens already planned for saving
    salt: bytes = b""


def request_salt(request: Any) -> bytes:
    """What a request's KV depends on beyond its tokens, as vLLM's own block
    hashes see it: the LoRA adapter, the ``cache_salt``, and the hashes of its
    multimodal inputs. Requests that differ in any of them never share keys
    (their chains start apart: ``kvstore.keys.salted_root``)."""
    parts = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        name = getattr(lora, "lora_name", None) or getattr(lora, "name", "")
        parts.append(f"lora:{name}:{getattr(lora, 'lora_int_id', '')}")
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts.append(f"salt:{salt}")
    for f in getattr(request, "mm_features", None) or []:
        ident = getattr(f, "identifier", None) or getattr(f, "mm_hash", None)
        pos = getattr(f, "mm_position", None)
        parts.append(f"mm:{ident}@{getattr(pos, 'offset', '')}+{getattr(pos, 'length', '')}")
    return "\0".join(parts).encode()


def layout_of(vllm_config: Any) -> KVLayout:
    """The store layout of the engine's KV cache, from vLLM's config objects."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    cache_dtype = str(getattr(cc, "cache_dtype", "auto"))
    if cache_dtype == "auto":
        dtype = dtype_name(mc.dtype)
    else:
        dtype = _CACHE_DTYPES.get(cache_dtype, cache_dtype)
    if dtype not in DTYPES:
        raise ConfigError(f"the store has no layout for KV cache dtype {cache_dtype} ({mc.dtype})")
    mla = bool(getattr(mc, "use_mla", False))
    return KVLayout(
        num_layers=mc.get_num_layers(pc),
        num_kv_heads=1 if mla else mc.get_num_kv_heads(pc),
        head_dim=mc.get_head_size(),
        block_size=cc.block_size,
        dtype=dtype,
        kv_factor=1 if mla else 2,
    )


def kv_cache_spec(kv_cache_config: Any) -> Any:
    """The one attention spec of a model's KV cache; hybrid models (several
    KV cache groups: full attention beside sliding windows, Mamba, ...) are
    refused, since a store block would need every group's blocks at once."""
    groups = [g for g in kv_cache_config.kv_cache_groups if g.layer_names]
    if len(groups) != 1:
        kinds = ", ".join(type(g.kv_cache_spec).__name__ for g in groups) or "none"
        raise ConfigError(
            f"KVStoreConnector supports models with one KV cache group; this one has "
            f"{len(groups)} ({kinds}): hybrid models are not supported yet"
        )
    spec = groups[0].kv_cache_spec
    specs = getattr(spec, "kv_cache_specs", None)  # UniformTypeKVCacheSpecs
    if specs:
        distinct = {type(v) for v in specs.values()}
        if len(distinct) != 1 or len(set(specs.values())) != 1:
            raise ConfigError("KVStoreConnector needs every layer's KV cache spec to be the same")
        spec = next(iter(specs.values()))
    if getattr(spec, "sliding_window", None):
        raise ConfigError("KVStoreConnector does not support sliding-window KV caches yet")
    return spec


def spec_layout(spec: Any, num_layers: int) -> KVLayout:
    """The store layout of ``num_layers`` layers of one vLLM attention spec."""
    dtype = dtype_name(spec.dtype)
    if dtype is None:
        raise ConfigError(f"the store has no layout for KV cache dtype {spec.dtype}")
    mla = _is_mla(spec)
    head_v = getattr(spec, "head_size_v", None) or spec.head_size
    if not mla and head_v != spec.head_size:
        raise ConfigError(
            f"K and V heads differ in size ({spec.head_size} and {head_v}): not supported"
        )
    return KVLayout(
        num_layers=num_layers,
        num_kv_heads=1 if mla else int(spec.num_kv_heads),
        head_dim=int(spec.head_size),
        block_size=int(spec.block_size),
        dtype=dtype,
        kv_factor=1 if mla else 2,
    )


def _is_mla(spec: Any) -> bool:
    return any(c.__name__.startswith("MLA") for c in type(spec).__mro__)


def paged_layers(kv_caches: Mapping[str, torch.Tensor], spec: Any = None) -> list[torch.Tensor]:
    """vLLM's per-layer KV views as the native copy takes them, without a copy.

    vLLM 0.33 registers ``[blocks, heads, block_size, C]`` per layer, its
    strides set by the ``KVCacheLayout`` (any of the six): ``C`` packs K then
    V (``head_size + head_size_v``), or for MLA (``spec`` an MLA spec) holds
    the one latent vector. These become ``[2, blocks, block_size, heads,
    head_size]`` (K and V ``head_size`` elements apart in ``C``) and MLA's
    ``[blocks, block_size, C]``. Older releases' ``[2, blocks, ...]`` and MLA
    ``[blocks, block_size, C]`` views pass through as they are.
    """
    out = []
    for name, t in kv_caches.items():
        if t.dim() != 4:
            out.append(t)
            continue
        blocks, heads, bs, c = t.shape
        if spec is not None and _is_mla(spec):
            if heads != 1:
                raise LayoutError(f"MLA layer {name} has {heads} heads in its KV view, not 1")
            out.append(t[:, 0])
            continue
        half = int(spec.head_size) if spec is not None else c // 2
        if c != 2 * half:
            raise LayoutError(
                f"layer {name}'s KV view {tuple(t.shape)} does not pack K and V of "
                f"{half} elements each in its last dim"
            )
        sb, sh, sn, sc = t.stride()
        out.append(
            t.as_strided(
                (2, blocks, bs, heads, half),
                (half * sc, sb, sn, sh, sc),
                t.storage_offset(),
            )
        )
    return out


class StoreConnector:
    """The connector's logic; ``KVStoreConnector`` is what vLLM loads."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        tc = vllm_config.kv_transfer_config
        extra: dict[str, Any] = dict(getattr(tc, "kv_connector_extra_config", None) or {})
        if "url" not in extra:
            raise ConfigError(
                "KVStoreConnector needs kv_connector_extra_config.url "
                "(kvstore://host:port of a node, or redis://... of a cluster)"
            )
        self.role_name = str(getattr(role, "name", role)).upper()
        if self.role_name not in ("SCHEDULER", "WORKER"):
            raise ConfigError(f"unknown connector role {role!r}")
        kv_role = str(getattr(tc, "kv_role", None) or "kv_both")
        if kv_role not in ("kv_producer", "kv_consumer", "kv_both"):
            raise ConfigError(f"kv_role must be kv_producer, kv_consumer or kv_both, got {kv_role}")
        self.loads_enabled = kv_role != "kv_producer"
        self.saves_enabled = kv_role != "kv_consumer"
        pc = vllm_config.parallel_config
        sizes = (getattr(pc, "tensor_parallel_size", 1), getattr(pc, "pipeline_parallel_size", 1))
        if sizes != (1, 1):
            raise ConfigError("KVStoreConnector supports tensor and pipeline parallel size 1 only")
        # the layout of what vLLM allocates when it says (0.33 does), else of the model config
        self._spec = kv_cache_spec(kv_cache_config) if kv_cache_config is not None else None
        if self._spec is not None:
            layers = sum(len(g.layer_names) for g in kv_cache_config.kv_cache_groups)
            self.layout = spec_layout(self._spec, layers)
        else:
            self.layout = layout_of(vllm_config)
        model = str(extra.get("model") or vllm_config.model_config.model)
        self.namespace = Namespace(model, self.layout, str(extra.get("tenant", "default")))
        self.client = Client.connect(
            str(extra["url"]),
            namespace=self.namespace,
            token=extra.get("token"),
            transfer=extra.get("transfer"),
        )
        # scheduler side
        self._external: dict[str, int] = {}  # req_id -> tokens to load, set after allocation
        self._prompts: dict[str, _Prompt] = {}
        self._salts: dict[str, bytes] = {}  # from the Request (NewRequestData has no cache_salt)
        # worker side
        self._caches: list[torch.Tensor] = []
        self._metadata: StoreConnectorMetadata | None = None
        self._load_errors: set[int] = set()
        self._failed_loads: set[str] = set()  # this step's requests whose load fell short

    # -- scheduler side ------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens beyond the engine's own ``num_computed_tokens`` the store
        can supply: whole blocks, never the prompt's last token (the engine
        must compute its logits). Loads are synchronous (False)."""
        if not self.loads_enabled:
            return 0, False
        salt = self._salts[request.request_id] = request_salt(request)
        hits = self.client.loadable(request.prompt_token_ids, salt=salt)
        return max(0, hits - num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            self._external[request.request_id] = num_external_tokens

    def build_connector_meta(self, scheduler_output: Any) -> StoreConnectorMetadata:
        """This step's loads (new requests with external hits) and saves (the
        prompt blocks this step completes)."""
        meta = StoreConnectorMetadata()
        scheduled: dict[str, int] = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            salt = self._salts.pop(new.req_id, None)
            if salt is None:  # not asked about (no lookup): what NewRequestData tells
                salt = request_salt(new)
            prompt = _Prompt(tuple(new.prompt_token_ids), list(new.block_ids[0]), salt=salt)
            self._prompts[new.req_id] = prompt
            external = self._external.pop(new.req_id, 0)
            if external:
                end = new.num_computed_tokens
                meta.loads.append(
                    BlockTransfer(
                        new.req_id,
                        prompt.tokens[:end],
                        tuple(prompt.block_ids),
                        end - external,
                        prompt.salt,
                    )
                )
                prompt.saved = end  # those blocks came from the store
            self._plan_save(meta, new.req_id, new.num_computed_tokens + scheduled[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            prompt_or_none = self._prompts.get(req_id)
            if prompt_or_none is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in getattr(cached, "resumed_req_ids", ()):  # preempted, then resumed:
                    prompt_or_none.block_ids = list(new_ids[0])  # a new block table
                else:
                    prompt_or_none.block_ids.extend(new_ids[0])
            self._plan_save(meta, req_id, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return meta

    def _plan_save(self, meta: StoreConnectorMetadata, req_id: str, done: int) -> None:
        prompt = self._prompts[req_id]
        bs = self.layout.block_size
        upto = min(done, len(prompt.tokens)) // bs * bs
        if self.saves_enabled and upto > prompt.saved:
            meta.saves.append(
                BlockTransfer(
                    req_id,
                    prompt.tokens[:upto],
                    tuple(prompt.block_ids[: upto // bs]),
                    salt=prompt.salt,
                )
            )
            prompt.saved = upto

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Saves finish inside the step that planned them, so the blocks may
        be freed at once."""
        self._prompts.pop(request.request_id, None)
        self._external.pop(request.request_id, None)
        self._salts.pop(request.request_id, None)
        return False, None

    # -- worker side -----------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """vLLM's views, in layer order, seen as the native copy takes them."""
        self._caches = paged_layers(kv_caches, self._spec)

    @property
    def requires_kv_delivery(self) -> bool:
        """A best-effort cache: a save dropped at preemption is a later miss."""
        return False

    def bind_connector_metadata(self, connector_metadata: StoreConnectorMetadata) -> None:
        self._metadata = connector_metadata
        self._failed_loads.clear()

    def clear_connector_metadata(self) -> None:
        self._metadata = None

    def has_connector_metadata(self) -> bool:
        return self._metadata is not None

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        bs = self.layout.block_size
        for load in self._plan().loads:
            got = self.client.get_paged(
                load.tokens, self._caches, load.block_ids, start=load.start, salt=load.salt
            )
            want = len(load.tokens)
            if got < want:
                self._load_errors.update(load.block_ids[got // bs : want // bs])
                self._failed_loads.add(load.req_id)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: ``start_load_kv`` loaded every layer."""

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        """Nothing per layer: a store block spans all layers, saved in ``wait_for_save``."""

    def wait_for_save(self) -> None:
        """Saves this step's completed prompt blocks, except those of a request
        whose load fell short this step: its blocks past the failure hold no
        KV yet (vLLM recomputes them), and a store must never take them."""
        for save in self._plan().saves:
            if save.req_id not in self._failed_loads:
                self.client.put_paged(save.tokens, self._caches, save.block_ids, salt=save.salt)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None

    def shutdown(self) -> None:
        self.client.close()

    def _plan(self) -> StoreConnectorMetadata:
        if self._metadata is None:
            raise RuntimeError("no connector metadata bound for this step")
        return self._metadata


try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
except ImportError:
    KVStoreConnector: type[StoreConnector] = StoreConnector
else:  # pragma: no cover - vLLM is not installed where the tests run

    class _VllmConnector(StoreConnector, KVConnectorBase_V1):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
            try:
                KVConnectorBase_V1.__init__(self, vllm_config, role, kv_cache_config)
            except TypeError:  # vLLM releases whose base takes no kv_cache_config
                KVConnectorBase_V1.__init__(self, vllm_config, role)
            StoreConnector.__init__(self, vllm_config, role, kv_cache_config)

    KVStoreConnector = _VllmConnector
