import os
import random
from pathlib import Path

import pytest
import torch

from kvstore.checksum import checksum
from kvstore.config import SsdConfig
from kvstore.errors import StorageError
from kvstore.keys import ScopedKey, scoped
from kvstore.tiers.segment import HEADER_BYTES
from kvstore.tiers.ssd import SsdTier
from tests.conftest import block_payload
from tests.conftest import key as block_key

MiB = 1 << 20
SIZES = [1, 100, 4096, 32 << 10, 64 << 10, 200_000, 1 << 20]


def key(i: int) -> ScopedKey:
    """The tier indexes keys inside their namespace (tag 7 here)."""
    return scoped(7, block_key(i))


def _tier(path: Path, **kw: object) -> SsdTier:
    kw = {"capacity": 256 * MiB, "segment_size": 2 * MiB, **kw}
    return SsdTier(SsdConfig(path=path, **kw))  # type: ignore[arg-type]


def _fill(tier: SsdTier, n: int) -> dict[bytes, torch.Tensor]:
    data = {}
    for i in range(n):
        p = block_payload(i, SIZES[i % len(SIZES)])
        tier.put(key(i), p, checksum(p), parent=key(i - 1) if i else None)
        data[key(i)] = p
    return data


def _read(tier: SsdTier, k: bytes, nbytes: int) -> torch.Tensor | None:
    out = torch.empty(nbytes, dtype=torch.uint8)
    return out if tier.get_into(k, out) else None


def _segments(path: Path) -> list[Path]:
    return sorted(path.glob("seg-*.log"))


def test_restart_recovers_every_block_written_before_close(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    data = _fill(tier, 30)
    tier.close()
    tier = _tier(tmp_path)
    assert len(tier) == 30
    assert len(_segments(tmp_path)) > 1  # the 2 MiB segment size forced rolls
    parents = {r.scoped: r.scoped_parent for r in tier.records()}
    for i, (k, p) in enumerate(data.items()):
        got = _read(tier, k, p.numel())
        assert got is not None and torch.equal(got, p)
        assert parents[k] == (key(i - 1) if i else None)
    tier.close()


def test_torn_last_record_reads_as_a_miss(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    data = _fill(tier, 5)
    tier.close()
    last = _segments(tmp_path)[-1]
    os.truncate(last, last.stat().st_size - 1000)  # cut the last record's payload
    tier = _tier(tmp_path)
    assert tier.counters.scan_skipped_bytes > 0
    keys = list(data)
    assert keys[-1] not in tier
    for k in keys[:-1]:
        got = _read(tier, k, data[k].numel())
        assert got is not None and torch.equal(got, data[k])
    tier.close()


def test_flipped_payload_byte_is_a_miss_and_counted(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    data = _fill(tier, 3)
    tier.close()
    seg = _segments(tmp_path)[0]
    raw = bytearray(seg.read_bytes())
    # block 1 (100 bytes) sits after block 0's header+payload; flip a byte inside it
    rec1 = next(r for r in _tier_records(tmp_path) if r.scoped == key(1))
    raw[rec1.payload_offset + 50] ^= 0x01
    seg.write_bytes(bytes(raw))
    tier = _tier(tmp_path)
    assert key(1) in tier  # the scan does not read payloads
    assert _read(tier, key(1), 100) is None
    assert tier.counters.checksum_failures == 1
    assert key(1) not in tier  # dropped: later lookups do not claim it
    got = _read(tier, key(2), data[key(2)].numel())
    assert got is not None and torch.equal(got, data[key(2)])
    tier.close()


def _tier_records(path: Path) -> list:  # type: ignore[type-arg]
    t = _tier(path)
    recs = list(t.records())
    t.close()
    return recs


def test_flipped_header_byte_skips_only_that_record(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    data = _fill(tier, 4)
    tier.close()
    rec = next(r for r in _tier_records(tmp_path) if r.scoped == key(1))
    seg = _segments(tmp_path)[0]
    raw = bytearray(seg.read_bytes())
    raw[rec.offset + 20] ^= 0xFF
    seg.write_bytes(bytes(raw))
    tier = _tier(tmp_path)
    assert key(1) not in tier
    assert tier.counters.scan_skipped_bytes >= HEADER_BYTES
    for i in (0, 2, 3):  # resynchronised after the damaged header
        got = _read(tier, key(i), data[key(i)].numel())
        assert got is not None and torch.equal(got, data[key(i)])
    tier.close()


def test_tombstones_survive_restart_and_compaction(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    data = _fill(tier, 40)
    deleted = [key(i) for i in range(40) if i % 4]
    assert tier.remove(deleted) == len(deleted)
    disk_before = tier.disk_bytes
    assert tier.garbage_ratio() > 0.5
    reclaimed = tier.compact()
    assert reclaimed > 0 and tier.disk_bytes < disk_before
    assert tier.counters.compactions > 0
    tier.close()
    tier = _tier(tmp_path)
    assert sorted(r.scoped for r in tier.records()) == sorted(k for k in data if k not in deleted)
    for k in data:
        if k not in deleted:
            got = _read(tier, k, data[k].numel())
            assert got is not None and torch.equal(got, data[k])
    tier.close()


def test_lz4_round_trips_and_reports_its_ratio(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    compressible = torch.arange(256 * 1024, dtype=torch.int32).remainder(7).to(torch.uint8)
    noise = block_payload(3, 256 * 1024)
    for i, p in enumerate((compressible, noise)):
        tier.put(key(i), p, checksum(p), compress=True)
    c = tier.counters
    assert c.lz4_raw_bytes == 2 * 256 * 1024
    assert c.lz4_stored_bytes < c.lz4_raw_bytes  # noise kept raw, pattern shrank
    tier.close()
    tier = _tier(tmp_path)
    for i, p in enumerate((compressible, noise)):
        got = _read(tier, key(i), p.numel())
        assert got is not None and torch.equal(got, p)
    tier.close()


def test_unusable_data_dirs_get_clear_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot use as data dir"):
        _tier(blocker / "sub")
    tier = _tier(tmp_path / "d")
    with pytest.raises(StorageError, match="in use by another"):
        _tier(tmp_path / "d")
    tier.close()
    _tier(tmp_path / "d").close()  # released on close


@pytest.mark.parametrize("seed", range(6))
def test_a_restart_brings_back_exactly_the_live_records(tmp_path: Path, seed: int) -> None:
    """Puts (some of a key already there), deletes, evictions, compactions at
    random ratios and restarts, against a model of what is live: a deleted or
    evicted key never comes back, whichever segments compaction removed."""
    rng = random.Random(seed)
    tier = _tier(tmp_path, segment_size=64 << 10)
    live: dict[bytes, torch.Tensor] = {}
    for step in range(300):
        op = rng.random()
        k = key(rng.randrange(40))
        if op < 0.5:
            p = block_payload(int.from_bytes(k[4:], "little"), rng.choice([512, 9000, 30_000]))
            if k in live:  # keys name content: a second put carries the same bytes
                p = live[k]
            tier.put(k, p, checksum(p))
            live[k] = p
        elif op < 0.65:
            assert tier.remove([k]) == (k in live)
            live.pop(k, None)
        elif op < 0.8:
            tier.evict([k])
            live.pop(k, None)
        elif op < 0.9:
            tier.compact(min_garbage_ratio=rng.choice([0.01, 0.5, 1.0]))
        else:
            tier.close()
            tier = _tier(tmp_path, segment_size=64 << 10)
            assert {r.scoped for r in tier.records()} == set(live), f"step {step}"
    tier.close()
    tier = _tier(tmp_path, segment_size=64 << 10)
    assert {r.scoped for r in tier.records()} == set(live)
    for k, p in live.items():
        got = _read(tier, k, p.numel())
        assert got is not None and torch.equal(got, p)
    assert tier.used_bytes <= tier.capacity
    tier.close()


def test_opening_over_capacity_drops_the_oldest_for_good(tmp_path: Path) -> None:
    """A smaller ``ssd.capacity`` at restart trims the oldest records, and a
    later open with the old capacity does not bring them back."""
    tier = _tier(tmp_path)
    for i in range(40):
        p = block_payload(i, 64 << 10)
        tier.put(key(i), p, checksum(p))
    tier.close()
    small = SsdTier(SsdConfig(path=tmp_path, capacity=1 * MiB, segment_size=2 * MiB))
    kept = {r.scoped for r in small.records()}
    assert small.used_bytes <= 1 * MiB and 0 < len(kept) < 40
    assert kept == {key(i) for i in range(40 - len(kept), 40)}  # the newest stay
    small.close()
    tier = _tier(tmp_path)
    assert {r.scoped for r in tier.records()} == kept
    tier.close()


def test_a_delete_reserve_is_held_in_the_data_dir(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    reserve = tmp_path / "RESERVE"
    assert reserve.stat().st_size == 1 * MiB  # 1/256 of 256 MiB
    assert reserve.stat().st_blocks * 512 >= 1 * MiB  # allocated, not a sparse promise
    tier.close()
