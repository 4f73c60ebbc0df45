"""The copy extension: gather/scatter of paged KV against an explicit
per-block formula and the pure-torch reference, for random block tables,
every dtype, both layouts, contiguous and strided caches; and the checks
that refuse bad input before any byte moves. CUDA cases run where a GPU is."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import zlib
from collections.abc import Callable

import pytest
import torch

import native.paged
from kvstore.errors import InvalidArgumentError, LayoutError, PayloadSizeError
from native import PagedKV, gather_blocks, native_available, scatter_blocks
from native.build import CSRC
from native.reference import copy_reference

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.uint8]
NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM, LAYERS = 24, 16, 2, 32, 3


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs included: comparisons are bytewise)."""
    es = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * es), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)


# Each maker returns one layer: flash [2, nb, bs, h, d] or mla [nb, bs, d], in
# a different memory arrangement.
def _flash(variant: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    nb, bs, h, d = NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM
    if variant == "contiguous":
        return _random((2, nb, bs, h, d), dtype, gen)
    if variant == "padded":  # rows contiguous, pieces not (a slice of a wider cache)
        return _random((2, nb, bs, h, d + 8), dtype, gen)[..., :d]
    if variant == "hnd":  # heads-major cache permuted to this order
        return _random((2, nb, h, bs, d), dtype, gen).transpose(2, 3)
    if variant == "elementwise":  # every other element: no contiguous run at all
        return _random((2, nb, bs, h, 2 * d), dtype, gen)[..., ::2]
    raise AssertionError(variant)


def _mla(variant: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    nb, bs, d = NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM * 3
    if variant == "contiguous":
        return _random((nb, bs, d), dtype, gen)
    if variant == "padded":
        return _random((nb, bs, d + 16), dtype, gen)[..., :d]
    if variant == "elementwise":
        return _random((nb, bs, 2 * d), dtype, gen)[..., ::2]
    raise AssertionError(variant)


CASES = [("flash", v) for v in ("contiguous", "padded", "hnd", "elementwise")] + [
    ("mla", v) for v in ("contiguous", "padded", "elementwise")
]


def _caches(kind: str, variant: str, dtype: torch.dtype, seed: int, device: str):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    make: Callable[[str, torch.dtype, torch.Generator], torch.Tensor] = (
        _flash if kind == "flash" else _mla
    )
    layers = []
    for _ in range(LAYERS):
        t = make(variant, dtype, gen)
        if device != "cpu":  # keep the arrangement: move the base, then view again
            base = t._base if t._base is not None else t
            moved = base.to(device)
            t = moved.as_strided(t.shape, t.stride(), t.storage_offset())
        layers.append(t)
    return layers


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _expected(layers: list[torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Staging bytes by the definition: block i, layer l, K/V k in order."""
    kv = PagedKV.of(layers)
    parts = [_bytes(layer[k, b]) for b in ids for layer in kv.layers for k in range(layer.shape[0])]
    return torch.cat(parts)


def _block_table(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(NUM_BLOCKS, generator=g)[:n].tolist()


def test_extension_is_built_here() -> None:
    """CI builds the extension in .ci/setup; the fallback is for machines without a compiler."""
    if os.environ.get("KVSTORE_NATIVE") == "0":
        pytest.skip("extension disabled by KVSTORE_NATIVE=0")
    assert native_available("cpu"), native.build.failure()
    if CUDA:
        assert native_available("cuda"), "torch has CUDA but the CUDA kernels were not built"
    # built from a copy of the sources in the build directory: its command
    # lines name no checkout, so two checkouts share the build
    build_dir = native.build.cache_dir(native.build._cuda_wanted())
    ninja = (build_dir / "build.ninja").read_text()
    assert str(native.build.CSRC) not in ninja and str(build_dir / "src") in ninja


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_gather_scatter_round_trip(
    kind: str, variant: str, dtype: torch.dtype, device: str
) -> None:
    seed = zlib.crc32(f"{kind}/{variant}/{dtype}".encode()) % 10_000
    layers = _caches(kind, variant, dtype, seed, device)
    ids = _block_table(seed, 7)
    want = _expected(layers, ids)
    kv = PagedKV.of(layers)
    out = torch.full((len(ids) * kv.block_nbytes,), 0xAB, dtype=torch.uint8, device=device)
    gather_blocks(layers, ids, out).wait()
    assert torch.equal(_bytes(out), want)

    ref = torch.zeros_like(out)
    copy_reference(kv.layers, torch.tensor(ids), ref, gather=True)
    assert torch.equal(_bytes(ref), want)

    # scatter into other caches of the same arrangement: the chosen blocks
    # become the originals, every other block keeps its old bytes
    target = _caches(kind, variant, dtype, seed + 1, device)
    before = [_bytes(t) for t in target]
    scatter_blocks(out, target, ids).wait()
    kt = PagedKV.of(target)
    for orig, after, old in zip(kv.layers, kt.layers, before, strict=True):
        for b in range(NUM_BLOCKS):
            got = _bytes(after[:, b])
            if b in ids:
                assert torch.equal(got, _bytes(orig[:, b]))
            else:
                assert torch.equal(got, _bytes(old.view(after.dtype).view(after.shape)[:, b]))


@pytest.mark.parametrize("mode", ["direct", "staged"])
@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_cuda_to_pinned_host_and_back(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native.paged, "STAGE_BYTES", 3 * 1024)  # several staged steps
    for kind, variant in CASES:
        layers = _caches(kind, variant, torch.bfloat16, 7, "cuda")
        ids = _block_table(3, 9)
        kv = PagedKV.of(layers)
        out = torch.empty(len(ids) * kv.block_nbytes, dtype=torch.uint8).pin_memory()
        done = gather_blocks(layers, ids, out, mode=mode)  # type: ignore[arg-type]
        assert done.event is not None
        done.wait()
        assert torch.equal(out, _expected(layers, ids)), (kind, variant)
        target = _caches(kind, variant, torch.bfloat16, 8, "cuda")
        scatter_blocks(out, target, ids, mode=mode).wait()  # type: ignore[arg-type]
        for a, b in zip(PagedKV.of(target).layers, kv.layers, strict=True):
            assert torch.equal(_bytes(a[:, ids]), _bytes(b[:, ids]))


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_cuda_to_pageable_host_is_staged() -> None:
    layers = _caches("flash", "contiguous", torch.float16, 5, "cuda")
    ids = _block_table(5, 4)
    out = torch.empty(len(ids) * PagedKV.of(layers).block_nbytes, dtype=torch.uint8)
    gather_blocks(layers, ids, out).wait()
    assert torch.equal(out, _expected(layers, ids))
    with pytest.raises(InvalidArgumentError, match="pinned"):
        gather_blocks(layers, ids, out, mode="direct")


def test_cpu_threads_split_large_batches_exactly() -> None:
    """Enough bytes that the CPU kernel splits items across threads."""
    gen = torch.Generator().manual_seed(11)
    layers = [_random((2, 40, 16, 8, 128), torch.bfloat16, gen) for _ in range(8)]
    ids = torch.randperm(40, generator=gen)[:32]
    out = torch.empty(32 * PagedKV.of(layers).block_nbytes, dtype=torch.uint8)
    gather_blocks(layers, ids, out)
    assert torch.equal(out, _expected(layers, ids.tolist()))


def test_accepts_a_mapping_of_layers_and_an_id_tensor() -> None:
    layers = _caches("flash", "contiguous", torch.float16, 1, "cpu")
    named = {f"model.layers.{i}.attn": t for i, t in enumerate(layers)}
    ids = torch.tensor([3, 1], dtype=torch.int32)
    out = torch.empty(2 * PagedKV.of(named).block_nbytes, dtype=torch.uint8)
    gather_blocks(named, ids, out)
    assert torch.equal(out, _expected(layers, [3, 1]))
    assert PagedKV.of(named).block_shape == (LAYERS, 2, BLOCK_SIZE, HEADS, HEAD_DIM)
    assert PagedKV.of(_caches("mla", "contiguous", torch.float16, 1, "cpu")).block_shape == (
        LAYERS,
        1,
        BLOCK_SIZE,
        1,
        HEAD_DIM * 3,
    )


def test_empty_batch_is_a_no_op() -> None:
    layers = _caches("flash", "contiguous", torch.float16, 1, "cpu")
    gather_blocks(layers, [], torch.empty(0, dtype=torch.uint8)).wait()


# -- bad input: a clear error, and nothing touched ------------------------------


def _setup() -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    layers = _caches("flash", "contiguous", torch.float16, 2, "cpu")
    out = torch.full((2 * PagedKV.of(layers).block_nbytes,), 7, dtype=torch.uint8)
    return layers, out, [t.clone() for t in layers]


@pytest.mark.parametrize(
    ("ids", "error", "match"),
    [
        ([0, NUM_BLOCKS], InvalidArgumentError, f"block id {NUM_BLOCKS} is out of range"),
        ([-1, 2], InvalidArgumentError, "block id -1 is out of range"),
        (torch.tensor([1.0, 2.0]), InvalidArgumentError, "integers"),
        (torch.tensor([[1, 2]]), InvalidArgumentError, "1-D"),
        (["a", "b"], InvalidArgumentError, "integers"),
    ],
)
def test_bad_block_ids_touch_nothing(ids: object, error: type[Exception], match: str) -> None:
    layers, out, before = _setup()
    with pytest.raises(error, match=match):
        gather_blocks(layers, ids, out)  # type: ignore[arg-type]
    assert bool((out == 7).all())
    with pytest.raises(error, match=match):
        scatter_blocks(out, layers, ids)  # type: ignore[arg-type]
    assert all(torch.equal(_bytes(a), _bytes(b)) for a, b in zip(layers, before, strict=True))


def test_duplicate_ids_in_a_scatter_are_refused() -> None:
    layers, out, before = _setup()
    gather_blocks(layers, [4, 4], out)  # reading one block twice is fine
    with pytest.raises(InvalidArgumentError, match="block id 4 appears twice"):
        scatter_blocks(out, layers, [4, 4])
    assert all(torch.equal(_bytes(a), _bytes(b)) for a, b in zip(layers, before, strict=True))


def test_bad_buffers_touch_nothing() -> None:
    layers, out, before = _setup()
    with pytest.raises(PayloadSizeError, match="out for 3 block"):
        gather_blocks(layers, [0, 1, 2], out)
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        gather_blocks(layers, [0, 1], out.view(2, -1).t())
    with pytest.raises(PayloadSizeError):
        scatter_blocks(out[:-2], layers, [0, 1])
    with pytest.raises(InvalidArgumentError, match=r"torch\.Tensor"):
        scatter_blocks(bytearray(out.numel()), layers, [0, 1])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="mode"):
        gather_blocks(layers, [0, 1], out, mode="fast")  # type: ignore[arg-type]
    assert bool((out == 7).all())
    assert all(torch.equal(_bytes(a), _bytes(b)) for a, b in zip(layers, before, strict=True))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: [], "no KV cache layers"),
        (lambda: [torch.zeros(2, 4, 16, 2)], "expected"),
        (lambda: [torch.zeros(3, 4, 16, 2, 8)], "first dim is K/V"),
        (lambda: [torch.zeros(2, 4, 16, 2, 8, dtype=torch.float64)], "float64 is not supported"),
        (lambda: [torch.zeros(2, 4, 16, 2, 8), torch.zeros(2, 5, 16, 2, 8)], "layer 1 is"),
        (
            lambda: [torch.zeros(2, 4, 16, 2, 8), torch.zeros(2, 4, 16, 2, 8).half()],
            "layers must match",
        ),
        (lambda: [torch.zeros(1, 1, 16, 2, 8).expand(2, 4, 16, 2, 8)], "zero stride"),
        (lambda: [torch.zeros(2, 0, 16, 2, 8)], "empty"),
        (lambda: [[1, 2, 3]], "not a torch.Tensor"),
    ],
)
def test_bad_caches_are_refused(make: Callable[[], list[torch.Tensor]], match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        gather_blocks(make(), [0], torch.empty(0))


def test_kind_must_match_the_tensors() -> None:
    layers = _caches("mla", "contiguous", torch.float16, 1, "cpu")
    with pytest.raises(LayoutError, match="for kind 'flash'"):
        PagedKV.of(layers, "flash")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_cuda_sources_compile_without_spills(tmp_path: object) -> None:
    """Where nvcc exists but no GPU does (CI), the CUDA side still has to
    compile: the kernels for Hopper with no register spills, and the binding's
    CUDA path against torch's headers."""
    from torch.utils.cpp_extension import include_paths

    kernels = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-DKVSTORE_WITH_CUDA", "-Xptxas", "-v",
         "-c", str(CSRC / "copy_blocks_cuda.cu"), "-o", os.devnull],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert kernels.returncode == 0, kernels.stderr[-4000:]
    spills = re.findall(r"(\d+) bytes spill stores", kernels.stderr)
    assert spills and all(n == "0" for n in spills), kernels.stderr[-4000:]
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"], CSRC]]
    binding = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", "-w", "-DKVSTORE_WITH_CUDA",
         "-DTORCH_EXTENSION_NAME=check", *includes, str(CSRC / "copy_blocks.cpp")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert binding.returncode == 0, binding.stderr[-4000:]
