from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from client import Client
from kvstore.config import DramConfig, SsdConfig, StoreConfig
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.store import TieredStore

# 4 layers x K/V x 16 tokens x 2 heads x 64 dims x fp16 = 32 KiB per block
LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16, dtype="float16")
MiB = 1 << 20


@pytest.fixture
def layout() -> KVLayout:
    return LAYOUT


@pytest.fixture
def ns() -> Namespace:
    return Namespace("tiny-llama", LAYOUT)


def make_config(
    ssd_dir: Path | None, *, dram: int = 4 * MiB, ssd: int = 64 * MiB, **ssd_kw: object
) -> StoreConfig:
    return StoreConfig(
        dram=DramConfig(capacity=dram, page_size=MiB // 4),
        ssd=SsdConfig(path=ssd_dir, capacity=ssd, segment_size=MiB, **ssd_kw),  # type: ignore[arg-type]
    )


@pytest.fixture
def store_factory(tmp_path: Path) -> Iterator[Callable[..., TieredStore]]:
    opened: list[TieredStore] = []

    def make(*, ssd: bool = True, **kw: object) -> TieredStore:
        s = TieredStore(make_config(tmp_path / "ssd" if ssd else None, **kw))  # type: ignore[arg-type]
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def random_kv(num_tokens: int, seed: int, layout: KVLayout = LAYOUT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.prompt_shape(num_tokens), generator=g).to(layout.torch_dtype)


def random_tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 32000, (n,), generator=torch.Generator().manual_seed(seed))


def block_payload(seed: int, nbytes: int = LAYOUT.block_nbytes) -> torch.Tensor:
    return torch.randint(
        0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def read_checked(c: Client, tokens: torch.Tensor, kv: torch.Tensor) -> int:
    """Tokens ``c`` serves of a prompt; asserts every served byte is the truth."""
    out = torch.zeros_like(kv)
    got = c.get(tokens, out)
    assert torch.equal(out[:, :, :got], kv[:, :, :got]), "wrong bytes handed out"
    return got
