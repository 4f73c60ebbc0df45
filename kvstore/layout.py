"""The byte layout of one block's KV payload.

A block's payload holds the KV of ``block_size`` tokens for every layer, in one
contiguous C-order array of shape::

    [num_layers, kv_factor, block_size, num_kv_heads, head_dim]

``kv_factor`` is 2 (K then V) for ordinary attention and 1 for MLA's single
latent vector per token (then ``num_kv_heads`` is 1). A whole prompt's KV, as
the client takes it, has the same shape with ``num_tokens`` in place of
``block_size``; block *i* is the slice ``[:, :, i*block_size:(i+1)*block_size]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvstore.errors import LayoutError, PayloadSizeError

if TYPE_CHECKING:  # torch is imported where tensors are touched: the CLI never does
    import torch

    from kvstore.buffers import Payload

# the dtypes a layout may name (torch's names), and their sizes in bytes
DTYPES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
    "int8": 1,
}


def dtype_name(dtype: torch.dtype) -> str | None:
    """A torch dtype's name in ``DTYPES`` (None: not one a layout can have)."""
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPES else None


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "bfloat16"
    kv_factor: int = 2

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LayoutError(f"layout.{name} must be a positive int, got {value!r}")
        if self.kv_factor not in (1, 2):
            raise LayoutError(
                f"layout.kv_factor must be 2 (K and V) or 1 (MLA), got {self.kv_factor!r}"
            )
        if self.dtype not in DTYPES:
            raise LayoutError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.kv_factor, self.block_size, self.num_kv_heads, self.head_dim)

    def prompt_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.kv_factor, num_tokens, self.num_kv_heads, self.head_dim)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]

    @property
    def block_nbytes(self) -> int:
        n = self.itemsize
        for d in self.block_shape:
            n *= d
        return n

    @classmethod
    def opaque(cls, nbytes: int, *, what: str = "blocks") -> KVLayout:
        """A layout whose block is ``nbytes`` of bytes with no KV structure:
        for engines that hand over pages or chunks already laid out."""
        if nbytes <= 0 or nbytes % 16:
            raise LayoutError(f"{what} must be a positive multiple of 16 bytes, got {nbytes}")
        return cls(
            num_layers=1, num_kv_heads=1, head_dim=nbytes // 16, block_size=16, dtype="uint8",
            kv_factor=1,
        )  # fmt: skip

    def fingerprint(self) -> str:
        """A canonical string of everything that changes a payload's bytes."""
        return (
            f"L{self.num_layers}/kv{self.kv_factor}/h{self.num_kv_heads}/d{self.head_dim}"
            f"/bs{self.block_size}/{self.dtype}"
        )

    def view_block(self, buf: Payload) -> torch.Tensor:
        """View one block's payload buffer as a tensor of ``block_shape`` (no copy)."""
        from kvstore.buffers import as_tensor, contiguous_bytes

        t = as_tensor(buf)
        flat = contiguous_bytes(t)
        if flat is None:
            raise LayoutError("a block payload must be contiguous to be viewed")
        if flat.numel() != self.block_nbytes:
            raise PayloadSizeError(self.block_nbytes, flat.numel(), what="block payload")
        return flat.view(self.torch_dtype).view(self.block_shape)

    def block_slices(self, kv: torch.Tensor, num_blocks: int) -> list[torch.Tensor]:
        """Per-block views of a prompt-shaped tensor (strided; no copy)."""
        self.check_prompt(kv, min_tokens=num_blocks * self.block_size)
        bs = self.block_size
        return [kv[:, :, i * bs : (i + 1) * bs] for i in range(num_blocks)]

    def check_prompt(self, kv: torch.Tensor, *, min_tokens: int) -> None:
        from kvstore.buffers import nbytes_of

        if kv.dtype != self.torch_dtype:
            raise LayoutError(f"KV tensor is {kv.dtype}, layout says {self.torch_dtype}")
        if kv.dim() != 5:
            raise LayoutError(
                f"KV tensor must be 5-D {self.prompt_shape(min_tokens)}, got {tuple(kv.shape)}"
            )
        want = self.prompt_shape(kv.shape[2])
        if tuple(kv.shape) != want or kv.shape[2] < min_tokens:
            raise LayoutError(
                f"KV tensor shape {tuple(kv.shape)} does not fit the layout: expected "
                f"{self.prompt_shape(min_tokens)} "
                f"(layers, kv, tokens>={min_tokens}, heads, head_dim)"
            )
        if nbytes_of(kv) == 0 and min_tokens:
            raise LayoutError("KV tensor is empty")
