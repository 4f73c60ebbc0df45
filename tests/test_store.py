import random
import threading
from pathlib import Path

import pytest
import torch

from kvstore.config import DramConfig, StoreConfig
from kvstore.errors import InvalidArgumentError, PayloadSizeError, StoreFullError
from kvstore.store import TieredStore
from tests.conftest import LAYOUT, MiB, block_payload, key, make_config

N = LAYOUT.block_nbytes


def _put_chain(store: TieredStore, ids: range) -> None:
    keys = [key(i) for i in ids]
    store.put(keys, [block_payload(i) for i in ids], [None, *keys[:-1]])


def _assert_exact(store: TieredStore, ids: range) -> None:
    outs = [torch.empty(N, dtype=torch.uint8) for _ in ids]
    ok = store.get_into([key(i) for i in ids], outs, prefix=False)
    assert all(ok)
    for i, out in zip(ids, outs, strict=True):
        assert torch.equal(out, block_payload(i))


def test_eviction_demotes_to_ssd_rather_than_dropping(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory(dram=4 * MiB)
    for c in range(10):  # 10 chains x 40 blocks x 32 KiB = 12.5 MiB into a 4 MiB DRAM
        _put_chain(store, range(c * 40, c * 40 + 40))
    assert store.wait_idle()
    s = store.stats()
    assert s.dropped == 0 and s.demotions > 0
    assert s.tier("dram").used_bytes <= 0.9 * 4 * MiB
    assert s.blocks == 400
    _assert_exact(store, range(400))


def test_demotion_takes_chain_tails_first(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory(dram=4 * MiB)
    for c in range(6):
        _put_chain(store, range(c * 40, c * 40 + 40))
    store.wait_idle()
    for c in range(6):
        tiers = [store.tier_of(key(i)) for i in range(c * 40, c * 40 + 40)]
        # within a chain, what stayed in DRAM is a prefix: no DRAM block after an SSD one
        first_ssd = tiers.index("ssd") if "ssd" in tiers else len(tiers)
        assert all(t == "ssd" for t in tiers[first_ssd:]), tiers


def test_dram_only_drops_tails_and_never_strands_a_child(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory(ssd=False, dram=2 * MiB)
    for c in range(8):
        _put_chain(store, range(c * 40, c * 40 + 40))
    s = store.stats()
    assert s.dropped > 0 and s.blocks < 320
    for c in range(8):
        present = store.exists([key(i) for i in range(c * 40, c * 40 + 40)])
        n = store.lookup([key(i) for i in range(c * 40, c * 40 + 40)])
        assert present == [True] * n + [False] * (40 - n)  # evicted from the tail only
    assert store.lookup([key(i) for i in range(280, 320)]) == 40  # newest chain intact


def test_ssd_hit_is_promoted_and_counted(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory(dram=4 * MiB)
    for c in range(10):
        _put_chain(store, range(c * 40, c * 40 + 40))
    store.wait_idle()
    cold = next(i for i in range(400) if store.tier_of(key(i)) == "ssd")
    before = store.stats()
    _assert_exact(store, range(cold, cold + 1))
    after = store.stats()
    assert after.tier("ssd").hits == before.tier("ssd").hits + 1
    assert after.promotions == before.promotions + 1
    assert store.tier_of(key(cold)) == "dram"


def test_bad_input_leaves_the_store_unchanged(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory(ssd=False, dram=2 * MiB)
    _put_chain(store, range(3))
    before = store.stats()
    with pytest.raises(InvalidArgumentError):
        store.put([key(9), b"short"], [block_payload(9), block_payload(10)])
    with pytest.raises(InvalidArgumentError):
        store.put([key(9)], [block_payload(9), block_payload(10)])
    with pytest.raises(PayloadSizeError):
        store.get_into(
            [key(0), key(1)],
            [torch.empty(N, dtype=torch.uint8), torch.empty(N - 1, dtype=torch.uint8)],
        )
    with pytest.raises(InvalidArgumentError):
        store.get_into([key(0)], [b"read-only destination".ljust(N)])
    with pytest.raises(StoreFullError):
        store.put([key(50)], [torch.zeros(3 * MiB, dtype=torch.uint8)])  # larger than DRAM, no SSD
    after = store.stats()
    assert after.blocks == before.blocks == 3 and after.puts == before.puts
    assert after.tier("dram").used_bytes == before.tier("dram").used_bytes
    _assert_exact(store, range(3))


def test_delete_removes_from_every_tier_and_stays_deleted(tmp_path: Path, store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory(dram=4 * MiB)
    for c in range(10):
        _put_chain(store, range(c * 40, c * 40 + 40))
    store.wait_idle()
    in_ssd = next(i for i in range(400) if store.tier_of(key(i)) == "ssd")
    in_dram = next(i for i in range(400) if store.tier_of(key(i)) == "dram")
    assert store.delete([key(in_ssd), key(in_dram), key(9999)]) == 2
    assert store.exists([key(in_ssd), key(in_dram)]) == [False, False]
    store.close()
    reopened = store_factory(dram=4 * MiB)
    assert reopened.exists([key(in_ssd)]) == [False]
    assert reopened.stats().blocks > 0


def test_keys_ssd_eviction_dropped_stay_gone_after_restart(tmp_path: Path) -> None:
    """12.5 MiB into 1 MiB of DRAM and 3 MiB of SSD: most blocks are evicted
    from the SSD; then half the keys are deleted (evicted ones count 0). The
    restart holds exactly what the SSD held, minus the deleted keys, within
    capacity (before: 945 of 1,250 evicted keys came back, 17 MB on disk)."""
    config = make_config(tmp_path / "ssd", dram=1 * MiB, ssd=3 * MiB, flush_on_close=False)
    store = TieredStore(config)
    for c in range(10):
        _put_chain(store, range(c * 40, c * 40 + 40))
        store.wait_idle()
    on_ssd = {i for i in range(400) if store.tier_of(key(i)) == "ssd"}
    assert 0 < len(on_ssd) < 100 and store.stats().tier("ssd").evictions > 0
    deleted = set(range(0, 400, 2))
    present = {i for i in deleted if store.exists([key(i)])[0]}
    assert store.delete([key(i) for i in sorted(deleted)]) == len(present)
    store.close()
    with TieredStore(config) as reopened:
        back = {i for i in range(400) if reopened.exists([key(i)])[0]}
        assert back == on_ssd - deleted
        assert reopened.stats().tier("ssd").used_bytes <= 3 * MiB


def test_corrupted_ssd_block_is_a_miss_through_the_store(tmp_path: Path, store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory(dram=4 * MiB)
    for c in range(10):
        _put_chain(store, range(c * 40, c * 40 + 40))
    store.wait_idle()
    store.close()
    for seg in sorted((tmp_path / "ssd").glob("seg-*.log")):
        raw = bytearray(seg.read_bytes())
        raw[len(raw) // 2] ^= 0x5A  # lands in some payload
        seg.write_bytes(bytes(raw))
    store = store_factory(dram=4 * MiB)
    total = store.stats().blocks
    outs = [torch.empty(N, dtype=torch.uint8) for _ in range(total)]
    ids = [
        int.from_bytes(k, "little") for k in (key(i) for i in range(400)) if store.exists([k])[0]
    ]
    ok = store.get_into([key(i) for i in ids], outs[: len(ids)], prefix=False)
    bad = [i for i, good in zip(ids, ok, strict=True) if not good]
    s = store.stats()
    assert s.checksum_failures == len(bad) >= 1
    for i, out, good in zip(ids, outs, ok, strict=True):
        if good:  # nothing wrong is ever handed out
            assert torch.equal(out, block_payload(i))
    assert store.exists([key(i) for i in bad]) == [False] * len(bad)


def test_threads_never_see_a_torn_block(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = store_factory(dram=3 * MiB)
    errors: list[str] = []
    ids = list(range(600))
    stop = threading.Event()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            i = rng.choice(ids)
            store.put([key(i)], [block_payload(i)])

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        out = torch.empty(N, dtype=torch.uint8)
        while not stop.is_set():
            i = rng.choice(ids)
            if store.get_into([key(i)], [out])[0] and not torch.equal(out, block_payload(i)):
                errors.append(f"block {i} read back wrong")

    def deleter() -> None:
        # Only the first 100 ids: the rest accumulate past DRAM's 96 blocks, so
        # demotion runs during the race however the threads are scheduled.
        rng = random.Random(99)
        while not stop.is_set():
            store.delete([key(rng.choice(ids[:100]))])

    writers = [threading.Thread(target=writer, args=(s,)) for s in range(3)]
    others = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    others.append(threading.Thread(target=deleter))
    for t in writers + others:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in others:
        t.join()
    assert not errors, errors[:5]
    s = store.stats()
    assert s.hits > 0 and s.demotions > 0


def test_default_config_opens_dram_only() -> None:
    with TieredStore(StoreConfig(dram=DramConfig(capacity=8 * MiB))) as store:
        assert [t.name for t in store.stats().tiers] == ["dram"]


@pytest.mark.parametrize("verify", [False, True])
def test_verify_dram_reads_turns_damaged_memory_into_a_miss(verify: bool) -> None:
    """Bytes changed in the pool behind the store's back (a stray write, bad
    memory): with ``verify_dram_reads`` the read is a miss, counted, and the
    block is gone; without it (the default) the changed bytes are served."""
    config = StoreConfig(dram=DramConfig(capacity=8 * MiB), verify_dram_reads=verify)
    with TieredStore(config) as store:
        store.put([key(1), key(2)], [block_payload(1), block_payload(2)])
        pool = store.dram_pool
        want = block_payload(1)
        at = next(
            i for i in range(0, pool.numel() - N + 1, 4096) if torch.equal(pool[i : i + N], want)
        )
        pool[at + 100] ^= 0xFF
        outs = [torch.empty(N, dtype=torch.uint8) for _ in range(2)]
        found = store.get_into([key(1), key(2)], outs, prefix=False)
        if verify:
            assert found == [False, True] and store.exists([key(1)]) == [False]
            assert store.stats().checksum_failures == 1
        else:
            assert found == [True, True] and not torch.equal(outs[0], want)
        assert torch.equal(outs[1], block_payload(2))


def test_commit_with_the_callers_digests_stores_them_and_refuses_a_wrong_count() -> None:
    """``commit_put(digests=)``: checksums the caller took as the bytes
    arrived become the blocks' own (a later verified read checks them);
    a list that does not match the plan's writes stores nothing."""
    from kvstore.checksum import checksum

    config = StoreConfig(dram=DramConfig(capacity=8 * MiB), verify_dram_reads=True)
    with TieredStore(config) as store:
        keys = [key(i) for i in range(3)]
        plan = store.begin_put(keys, [N] * 3)
        for w in plan.writes:
            w.buffer.copy_(block_payload(w.index))
        with pytest.raises(InvalidArgumentError):
            store.commit_put(plan, digests=[1, 2])
        assert store.lookup(keys) == 0 and store.stats().tier("dram").used_bytes == 0

        plan = store.begin_put(keys, [N] * 3)
        for w in plan.writes:
            w.buffer.copy_(block_payload(w.index))
        digests = [checksum(w.buffer) for w in plan.writes]
        digests[2] ^= 1  # as if block 2 had changed after it was hashed
        assert store.commit_put(plan, digests=digests) == [True] * 3
        outs = [torch.empty(N, dtype=torch.uint8) for _ in keys]
        assert store.get_into(keys, outs, prefix=False) == [True, True, False]
        assert torch.equal(outs[1], block_payload(1))


def test_a_large_batch_is_hashed_on_every_core_with_the_same_checksums() -> None:
    """``checksum_extents`` over more than ``PARALLEL_MIN`` bytes (two
    tensors, uneven extents) gives each extent's own checksum, in order,
    whether it is hashed on one core or several."""
    from kvstore import checksum as cs

    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 256, (cs.PARALLEL_MIN,), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=g)
    extents = [(a, 0, 1), (a, 1, 5 << 20), (b, 7, 2 << 20), (a, 5 << 20, 3 << 20), (b, 0, 9)]
    extents += [(b, i << 16, 1 << 16) for i in range(40)]
    want = [cs.checksum(t[at : at + n]) for t, at, n in extents]
    assert cs.checksum_extents(extents) == want
    assert cs.checksum_extents(extents[:2]) == want[:2]  # below the threshold: one core
    if cs._CORES > 1:
        assert cs._workers is not None  # the large batch did use the workers


def test_a_forked_child_hashes_large_batches_on_threads_of_its_own() -> None:
    """After the parent has used its hashing threads, a forked child (an
    engine's worker) hashes a large batch too instead of waiting on threads
    it did not inherit."""
    import multiprocessing as mp

    import numpy as np

    from kvstore import checksum as cs

    raw = np.random.default_rng(6).integers(0, 256, cs.PARALLEL_MIN * 2, dtype=np.uint8)
    data = torch.from_numpy(raw)
    extents = [(data, i << 20, 1 << 20) for i in range(16)]
    want = cs.checksum_extents(extents)  # the parent's workers exist now
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(cs.checksum_extents, (extents,)).get(timeout=60)
    assert got == want
