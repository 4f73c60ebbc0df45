"""The pure-torch gather/scatter: what the kernels must equal, and what runs
where the extension cannot be built (index_select / index_copy_ per layer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Integer views of each element size: index_select and index_copy_ support
# them on every device, which the float8 dtypes are not guaranteed.
_AS_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def copy_reference(
    layers: Sequence[torch.Tensor], ids: torch.Tensor, staging: torch.Tensor, *, gather: bool
) -> None:
    """Move blocks ``ids`` of 5-D layers ``[kv, blocks, block_size, heads,
    head_dim]`` to or from ``staging`` (contiguous, on the layers' device),
    laid out ``[n, layers, kv, block_size, heads, head_dim]``."""
    n = ids.numel()
    if n == 0:
        return
    kvf, _, bs, h, d = layers[0].shape
    as_int = _AS_INT[layers[0].element_size()]
    stage = staging.reshape(-1).view(torch.uint8).view(as_int)
    stage = stage.view(n, len(layers), kvf, bs, h, d)
    index = ids.to(layers[0].device)
    for i, layer in enumerate(layers):
        cache = layer.view(as_int)
        for k in range(kvf):
            if gather:
                stage[:, i, k] = cache[k].index_select(0, index)
            else:
                cache[k].index_copy_(0, index, stage[:, i, k])
