"""Native copy extension (DESIGN item 9): gather/scatter of paged KV.

``gather_blocks`` / ``scatter_blocks`` move an engine's scattered paged KV
blocks, every layer in one call, to and from the store's contiguous payload
layout: C++ kernels on the CPU (multi-threaded), CUDA kernels on the GPU
(writing pinned host memory across PCIe directly), and a pure-torch reference
where the extension cannot be built.
"""

from native.paged import (
    COPY_DTYPES,
    CopyDone,
    PagedKV,
    gather_blocks,
    native_available,
    scatter_blocks,
)

__all__ = [
    "COPY_DTYPES",
    "CopyDone",
    "PagedKV",
    "gather_blocks",
    "native_available",
    "scatter_blocks",
]
