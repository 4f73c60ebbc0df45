"""The HBM tier: refused on hosts without a GPU, real on hosts with one.

Placement, demotion to DRAM, pins and flushing are the store's logic, not
CUDA's: on CPU-only hosts (CI) they are exercised with the tier's pool in
host memory (``HbmTier(..., device="cpu")``, which only a test can build),
beside the same checks on a real GPU where one exists.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvstore.config import HbmConfig, StoreConfig
from kvstore.errors import ConfigError, StoreFullError
from kvstore.store import TieredStore
from kvstore.tiers.hbm import HbmTier
from tests.conftest import MiB, make_config

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))]
N = 32 * 1024  # block bytes


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def _blocks(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 256, (n, N), dtype=torch.uint8, generator=g))


def _store(tmp_path: Path | None, device: str, *, hbm: int = MiB) -> TieredStore:
    tier = HbmTier(HbmConfig(capacity=hbm, page_size=256 * 1024), device=device)
    return TieredStore(make_config(tmp_path, dram=4 * MiB), hbm=tier)


@pytest.mark.skipif(CUDA, reason="this host has a GPU")
def test_no_gpu_means_no_hbm_tier_and_a_clear_error() -> None:
    with TieredStore(make_config(None)) as store:
        assert [t.name for t in store.stats().tiers] == ["dram"]
    cfg = StoreConfig.load(overrides={"hbm.capacity": "64MiB", "dram.capacity": "16MiB"})
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        TieredStore(cfg)
    r = subprocess.run(
        [sys.executable, "-m", "kvstore", "serve", "--hbm-capacity", "64MiB", "--port", "0",
         "--dram-capacity", "16MiB", "--ssd-path", "none"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0 and "no CUDA GPU" in r.stderr, r.stderr[-2000:]


def test_hbm_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"hbm\.device"):
        HbmConfig(capacity=MiB, device="cpu")
    with pytest.raises(ConfigError, match=r"hbm\.capacity"):
        HbmConfig(capacity=-1)
    assert not StoreConfig().hbm.enabled  # off unless asked for


@pytest.mark.parametrize("device", DEVICES)
def test_writes_land_in_hbm_first_and_move_down_to_dram(device: str) -> None:
    with _store(None, device) as store:
        blocks = _blocks(80, seed=1)  # 2.5 MiB through a 1 MiB HBM tier, 8 blocks a put
        keys = [_key(i) for i in range(80)]
        parents = [None, *keys[:-1]]
        for a in range(0, 80, 8):
            assert store.put(keys[a : a + 8], blocks[a : a + 8], parents[a : a + 8]) == [True] * 8
            # each put lands whole in HBM: older blocks make room by moving down
            assert {store.tier_of(k) for k in keys[a : a + 8]} == {"hbm"}
        tiers = [store.tier_of(k) for k in keys]
        in_hbm = tiers.count("hbm")
        assert in_hbm == MiB // N and tiers.count("dram") == 80 - in_hbm
        hbm = next(t for t in store.stats().tiers if t.name == "hbm")
        assert hbm.evictions == 80 - in_hbm and hbm.blocks == in_hbm
        assert hbm.used_bytes == hbm.capacity_bytes == MiB
        dram_key = keys[tiers.index("dram")]
        assert store.locate([keys[0], keys[1]]) == tiers[:2]
        assert store.tier_of(dram_key) == "dram"

        outs = [torch.zeros(N, dtype=torch.uint8) for _ in range(80)]
        assert store.get_into(keys, outs) == [True] * 80
        assert all(torch.equal(a, b) for a, b in zip(outs, blocks, strict=True))
        hits = store.stats().tiers
        assert {t.name: t.hits for t in hits} == {"hbm": in_hbm, "dram": 80 - in_hbm}

        # a remote reader's view of an HBM block is a host copy
        plan = store.begin_read(keys[-1:])
        try:
            got = store.read_block(plan.reads[0])
            assert got is not None and got.device.type == "cpu"
            assert torch.equal(got, blocks[-1])
        finally:
            store.end_read(plan)


@pytest.mark.parametrize("device", DEVICES)
def test_a_pinned_hbm_block_is_never_moved_and_deletes_free_hbm(device: str) -> None:
    with _store(None, device) as store:
        first = _blocks(1, seed=2)[0]
        store.put([_key(0)], [first])
        plan = store.begin_read([_key(0)])  # a reader holds it
        try:
            more = _blocks(60, seed=3)
            store.put([_key(i) for i in range(1, 61)], more)
            assert store.tier_of(_key(0)) == "hbm"
            got = store.read_block(plan.reads[0])
            assert got is not None and torch.equal(got, first)
        finally:
            store.end_read(plan)
        used = store.stats().tiers[0].used_bytes
        hbm_keys = [_key(i) for i in range(61) if store.tier_of(_key(i)) == "hbm"]
        assert store.delete(hbm_keys) == len(hbm_keys)
        assert store.stats().tiers[0].used_bytes == used - len(hbm_keys) * N == 0


@pytest.mark.parametrize("device", DEVICES)
def test_hbm_blocks_are_flushed_to_ssd_at_close(tmp_path: Path, device: str) -> None:
    blocks = _blocks(10, seed=4)
    keys = [_key(i) for i in range(10)]
    with _store(tmp_path / "ssd", device) as store:
        store.put(keys, blocks)
        assert {store.tier_of(k) for k in keys} == {"hbm"}
    with TieredStore(make_config(tmp_path / "ssd")) as again:
        outs = [torch.zeros(N, dtype=torch.uint8) for _ in keys]
        assert again.get_into(keys, outs) == [True] * 10
        assert all(torch.equal(a, b) for a, b in zip(outs, blocks, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_an_hbm_victim_with_nowhere_to_go_stays_and_the_put_is_refused(device: str) -> None:
    """No SSD and a DRAM full of pinned blocks: HBM cannot make room, so the
    put fails with StoreFull and every stored block still reads back."""
    tier = HbmTier(HbmConfig(capacity=MiB, page_size=256 * 1024), device=device)
    with TieredStore(make_config(None, dram=MiB), hbm=tier) as store:
        keys = [_key(i) for i in range(65)]
        blocks = _blocks(65, seed=5)
        store.put(keys[:32], blocks[:32])
        store.put(keys[32:64], blocks[32:64])  # the first 32 move down to DRAM
        assert [store.tier_of(k) for k in keys[:64]] == ["dram"] * 32 + ["hbm"] * 32
        readers = store.begin_read(keys[:32])  # every DRAM block pinned
        try:
            with pytest.raises(StoreFullError):
                store.put(keys[64:], blocks[64:])
        finally:
            store.end_read(readers)
        outs = [torch.zeros(N, dtype=torch.uint8) for _ in range(64)]
        assert store.get_into(keys[:64], outs) == [True] * 64
        assert all(torch.equal(o, b) for o, b in zip(outs, blocks[:64], strict=True))
        assert store.put(keys[64:], blocks[64:]) == [True]  # with the pins gone, it fits
