"""Gather an engine's paged KV into the store's block payloads, and back.

Engines keep KV in paged caches, one tensor per layer:

- ``flash``: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (vLLM's
  FlashAttention layout: K then V);
- ``mla``: ``[num_blocks, block_size, head_dim]`` (one latent vector per token).

Any strides are accepted (a slice of a larger tensor, an HND cache permuted
to this order). A batch of ``n`` block ids moves to or from one contiguous
staging buffer laid out ``[n, num_layers, kv, block_size, heads, head_dim]``:
block *i* of the batch is exactly the store's payload for that block
(``kvstore.layout.KVLayout.block_shape``), so the staging buffer is handed to
the store as it is.

Everything is checked before a byte moves: a bad shape, dtype, device, size
or block id raises ``kvstore.errors.LayoutError`` (or another
``InvalidArgumentError``) and leaves caches and buffers untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from kvstore.errors import InvalidArgumentError, LayoutError, PayloadSizeError
from native.build import extension
from native.reference import copy_reference

CacheKind = Literal["flash", "mla"]  # not transfer.protocol.Kind
Mode = Literal["auto", "direct", "staged"]

COPY_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint8,
    torch.int8,
)
STAGE_BYTES = 64 << 20  # device scratch per step of a staged copy (bounded, reused)


@dataclass(frozen=True, eq=False)
class PagedKV:
    """An engine's per-layer caches, checked once and viewed as 5-D
    ``[kv, num_blocks, block_size, heads, head_dim]`` (no copy)."""

    layers: tuple[torch.Tensor, ...]
    kind: CacheKind

    @classmethod
    def of(
        cls,
        kv_caches: PagedKV | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        kind: CacheKind | None = None,
    ) -> PagedKV:
        if isinstance(kv_caches, PagedKV):
            if kind is not None and kind != kv_caches.kind:
                raise LayoutError(f"caches are {kv_caches.kind!r}, not {kind!r}")
            return kv_caches
        caches = list(kv_caches.values() if isinstance(kv_caches, Mapping) else kv_caches)
        if not caches:
            raise LayoutError("no KV cache layers given")
        for i, t in enumerate(caches):
            if not isinstance(t, torch.Tensor):
                raise LayoutError(f"layer {i} is a {type(t).__name__}, not a torch.Tensor")
        first = caches[0]
        dims = {5: "flash", 3: "mla"}
        found = dims.get(first.dim())
        if found is None or (kind is not None and kind != found):
            want = "[2, blocks, block_size, heads, head_dim] (flash) or [blocks, block_size, "
            raise LayoutError(
                f"KV cache layer 0 has shape {tuple(first.shape)}; expected {want}head_dim] (mla)"
                + (f" for kind {kind!r}" if kind else "")
            )
        if found == "flash" and first.shape[0] != 2:
            raise LayoutError(f"a flash cache's first dim is K/V (2), got {tuple(first.shape)}")
        if first.dtype not in COPY_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in COPY_DTYPES)
            raise LayoutError(f"KV cache dtype {first.dtype} is not supported; use one of {names}")
        if first.device.type not in ("cpu", "cuda"):
            raise LayoutError(f"KV caches on {first.device} are not supported (cpu or cuda)")
        if first.numel() == 0:
            raise LayoutError(f"KV cache layer 0 is empty: {tuple(first.shape)}")
        for i, t in enumerate(caches[1:], 1):
            if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                raise LayoutError(
                    f"layer {i} is {t.dtype}{tuple(t.shape)} on {t.device}, layer 0 is "
                    f"{first.dtype}{tuple(first.shape)} on {first.device}: layers must match"
                )
        for i, t in enumerate(caches):
            if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape, strict=True)):
                raise LayoutError(f"layer {i} is an expanded view (a zero stride): blocks alias")
        views = caches if found == "flash" else [t.unsqueeze(0).unsqueeze(3) for t in caches]
        return cls(tuple(views), found)  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype

    @property
    def num_blocks(self) -> int:
        return int(self.layers[0].shape[1])

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """One block's payload shape: (layers, kv, block_size, heads, head_dim)."""
        kvf, _, bs, h, d = self.layers[0].shape
        return (len(self.layers), int(kvf), int(bs), int(h), int(d))

    @property
    def block_nbytes(self) -> int:
        n = self.layers[0].element_size()
        for d in self.block_shape:
            n *= d
        return n

    def block_ids(self, block_ids: Sequence[int] | torch.Tensor, *, unique: bool) -> torch.Tensor:
        """``block_ids`` as a CPU int64 tensor, each checked to be in range
        (and, for a scatter, distinct: two writes to one block would race)."""
        if isinstance(block_ids, torch.Tensor):
            ids = block_ids.detach()
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise InvalidArgumentError(f"block ids must be integers, got {ids.dtype}")
        else:
            try:
                ids = torch.tensor(list(block_ids), dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError) as e:
                raise InvalidArgumentError(f"block ids must be integers: {e}") from None
        if ids.dim() != 1:
            raise InvalidArgumentError(f"block ids must be 1-D, got shape {tuple(ids.shape)}")
        ids = ids.to("cpu", torch.int64).contiguous()
        if ids.numel():
            bad = ids[(ids < 0) | (ids >= self.num_blocks)]
            if bad.numel():
                raise InvalidArgumentError(
                    f"block id {int(bad[0])} is out of range: the caches have "
                    f"{self.num_blocks} blocks"
                )
            if unique and torch.unique(ids).numel() != ids.numel():
                values, counts = torch.unique(ids, return_counts=True)
                dup = int(values[counts > 1][0])
                raise InvalidArgumentError(f"block id {dup} appears twice in one scatter")
        return ids

    def check_staging(self, staging: torch.Tensor, n: int, what: str) -> None:
        if not isinstance(staging, torch.Tensor):
            raise InvalidArgumentError(f"{what} must be a torch.Tensor, got {type(staging)}")
        got = staging.numel() * staging.element_size()
        if got != n * self.block_nbytes:
            raise PayloadSizeError(
                n * self.block_nbytes, got, what=f"{what} for {n} block(s) of {self.block_shape}"
            )
        if not staging.is_contiguous():
            raise InvalidArgumentError(f"{what} must be contiguous")
        dev = staging.device
        if dev.type == "cpu" or (dev == self.device and dev.type == "cuda"):
            return
        raise InvalidArgumentError(
            f"{what} is on {dev}, the caches on {self.device}: use host memory or the same device"
        )


class CopyDone:
    """A started gather/scatter. CPU copies are finished when returned; a CUDA
    copy runs on the current stream until ``wait()`` (or the event) says so."""

    def __init__(self, event: torch.cuda.Event | None = None) -> None:
        self.event = event

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def done(self) -> bool:
        return self.event is None or bool(self.event.query())  # type: ignore[no-untyped-call]


def gather_blocks(
    kv_caches: PagedKV | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    out: torch.Tensor,
    *,
    kind: CacheKind | None = None,
    mode: Mode = "auto",
) -> CopyDone:
    """Copy blocks ``block_ids`` of every layer into ``out`` (contiguous,
    ``len(block_ids)`` payloads back to back). ``out`` may be host memory for
    caches on the GPU: pinned host memory is written across PCIe without a
    bounce (``mode`` "direct") or through one device-side staging step
    ("staged"); "auto" picks the faster one measured on an H100."""
    kv = PagedKV.of(kv_caches, kind)
    ids = kv.block_ids(block_ids, unique=False)
    kv.check_staging(out, ids.numel(), "out")
    return _copy(kv, ids, out, gather=True, mode=mode)


def scatter_blocks(
    src: torch.Tensor,
    kv_caches: PagedKV | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    *,
    kind: CacheKind | None = None,
    mode: Mode = "auto",
) -> CopyDone:
    """Copy ``src`` (payloads back to back, as ``gather_blocks`` writes them)
    into blocks ``block_ids`` of every layer; the ids must be distinct."""
    kv = PagedKV.of(kv_caches, kind)
    ids = kv.block_ids(block_ids, unique=True)
    kv.check_staging(src, ids.numel(), "src")
    return _copy(kv, ids, src, gather=False, mode=mode)


def native_available(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled kernels serve caches on ``device``."""
    ext = extension()
    if ext is None:
        return False
    return torch.device(device).type == "cpu" or bool(ext.has_cuda())


def _copy(
    kv: PagedKV, ids: torch.Tensor, staging: torch.Tensor, *, gather: bool, mode: Mode
) -> CopyDone:
    if mode not in ("auto", "direct", "staged"):
        raise InvalidArgumentError(f"mode must be 'auto', 'direct' or 'staged', got {mode!r}")
    if ids.numel() == 0:
        return CopyDone()
    if kv.device.type == "cpu":
        if staging.device.type != "cpu":
            raise InvalidArgumentError("CPU caches need a host staging buffer")
        _kernel(kv, ids, ids, staging, gather=gather)
        return CopyDone()
    with torch.cuda.device(kv.device):
        stream = torch.cuda.current_stream()
        ids_dev = ids.to(kv.device, non_blocking=True)
        on_host = staging.device.type == "cpu"
        direct = not on_host or (
            mode != "staged" and staging.is_pinned() and native_available(kv.device)
        )
        if mode == "direct" and not direct:
            raise InvalidArgumentError(
                "a direct copy needs pinned host memory and the CUDA kernels "
                f"(pinned: {staging.is_pinned()}, kernels: {native_available(kv.device)})"
            )
        if direct:
            _kernel(kv, ids_dev, ids, staging, gather=gather)
        else:
            _staged(kv, ids_dev, ids, staging, gather=gather)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
    return CopyDone(event)


def _kernel(
    kv: PagedKV, ids: torch.Tensor, ids_cpu: torch.Tensor, staging: torch.Tensor, *, gather: bool
) -> None:
    ext = extension()
    if ext is None or not native_available(kv.device):
        copy_reference(kv.layers, ids, staging, gather=gather)
        return
    stream = torch.cuda.current_stream().cuda_stream if kv.device.type == "cuda" else 0
    ext.copy_blocks(list(kv.layers), ids, ids_cpu, staging, gather, torch.get_num_threads(), stream)


def _staged(
    kv: PagedKV, ids: torch.Tensor, ids_cpu: torch.Tensor, host: torch.Tensor, *, gather: bool
) -> None:
    """Device <-> host through a bounded device scratch: kernel and one
    cudaMemcpyAsync per step (synchronous where ``host`` is not pinned)."""
    per_block = kv.block_nbytes
    step = max(1, STAGE_BYTES // per_block)
    n = ids.numel()
    flat = host.reshape(-1).view(torch.uint8)
    scratch = torch.empty(min(n, step) * per_block, dtype=torch.uint8, device=kv.device)
    pinned = host.is_pinned()
    for a in range(0, n, step):
        b = min(n, a + step)
        part = scratch[: (b - a) * per_block]
        span = flat[a * per_block : b * per_block]
        if gather:
            _kernel(kv, ids[a:b], ids_cpu[a:b], part, gather=True)
            span.copy_(part, non_blocking=pinned)
        else:
            part.copy_(span, non_blocking=pinned)
            _kernel(kv, ids[a:b], ids_cpu[a:b], part, gather=False)
