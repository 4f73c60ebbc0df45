"""The blocks fault tests write: keys and payloads any process can rebuild."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from kvstore.keys import Namespace
from kvstore.layout import KVLayout

# 16 layers x K/V x 16 tokens x 4 heads x 64 dims x fp16 = 256 KiB per block
LAYOUT = KVLayout(num_layers=16, num_kv_heads=4, head_dim=64, block_size=16, dtype="float16")
NS = Namespace("fault", LAYOUT)


def nbytes() -> int:
    return LAYOUT.block_nbytes


def key_of(i: int) -> bytes:
    return hashlib.blake2b(f"fault/{i}".encode(), digest_size=16).digest()


def block_keys_of(ids: Iterable[int]) -> list[bytes]:
    return [key_of(i) for i in ids]


def payload_of(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randint(0, 256, (nbytes(),), dtype=torch.uint8, generator=g)
