"""Native copy extension (DESIGN item 9): gather/scatter of paged KV.

``gather_blocks`` / ``scatter_blocks`` move an engine's scattered paged KV
blocks, every layer in one call, to and from the store's contiguous payload
layout: C++ kernels on the CPU (multi-threaded), CUDA kernels on the GPU
(writing pinned host memory across PCIe directly), and a pure-torch reference
where the extension cannot be built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from native.paged import (
        COPY_DTYPES,
        CopyDone,
        PagedKV,
        gather_blocks,
        native_available,
        scatter_blocks,
    )


def __getattr__(name: str) -> Any:
    """``native.paged`` (and torch) load on first use: ``native.keys`` alone,
    as the CLI and the key chain need it, imports no torch."""
    if name in __all__:
        from native import paged

        return getattr(paged, name)
    raise AttributeError(f"module 'native' has no attribute {name!r}")


__all__ = [
    "COPY_DTYPES",
    "CopyDone",
    "PagedKV",
    "gather_blocks",
    "native_available",
    "scatter_blocks",
]
