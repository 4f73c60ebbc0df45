"""Eviction policies and admission: the prefix rule (a block with a resident
child is never a victim), ARC's scan resistance and adaptation, and the tail
admission rule through a real store."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import ConfigError
from kvstore.eviction import POLICIES, PrefixAwareARC, PrefixAwareLRU, make_policy
from kvstore.eviction.admission import SecondSightTail
from kvstore.eviction.base import EvictionPolicy
from kvstore.store import TieredStore
from tests.conftest import MiB, block_payload, key, make_config


def _chain(policy: EvictionPolicy, ids: list[int]) -> None:
    parent = None
    for i in ids:
        policy.insert(key(i), parent)
        parent = key(i)


def _drain(policy: EvictionPolicy) -> list[int]:
    order = []
    while (v := policy.victim(lambda k: False)) is not None:
        order.append(int.from_bytes(v, "little"))
        policy.remove(v)
    return order


def test_chain_tails_go_first_and_parents_follow() -> None:
    p = PrefixAwareLRU()
    _chain(p, [1, 2, 3])  # older chain
    _chain(p, [10, 11])  # newer chain
    assert _drain(p) == [3, 2, 1, 11, 10]


def test_touch_protects_a_whole_prefix_and_skip_passes_over_pinned() -> None:
    p = PrefixAwareLRU()
    _chain(p, [1, 2, 3])
    _chain(p, [10, 11])
    for i in (1, 2, 3):
        p.touch(key(i))  # the old chain was just read: the new one is colder now
    assert p.victim(lambda k: False) == key(11)
    assert p.victim(lambda k: k == key(11)) == key(3)
    p.remove(key(11))
    assert p.victim(lambda k: False) == key(10)


@pytest.mark.parametrize("name", ["arc", "prefix-lru"])
def test_a_parent_arriving_after_its_child_is_not_a_leaf(name: str) -> None:
    # demotion moves tails down first: a lower tier sees the child, then the parent
    p = make_policy(name)
    p.insert(key(2), key(1))
    p.insert(key(1), None)
    p.insert(key(5), None)
    p.touch(key(5))
    order = _drain(p)
    assert sorted(order) == [1, 2, 5] and order.index(2) < order.index(1)


# a random mix of chain inserts (branching off resident blocks), reads and evictions
OPS = st.lists(
    st.tuples(st.sampled_from(["chain", "touch", "evict"]), st.integers(0, 60), st.integers(1, 5)),
    max_size=120,
)


@pytest.mark.parametrize("name", ["arc", "prefix-lru"])
@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_a_victim_never_has_a_resident_child(name: str, ops: list[tuple[str, int, int]]) -> None:
    policy = make_policy(name)
    parent_of: dict[bytes, bytes | None] = {}
    fresh = 1000
    for op, a, b in ops:
        if op == "chain":  # b new blocks under block a (if resident) or a new root
            parent = key(a) if key(a) in policy else None
            for _ in range(b):
                fresh += 1
                policy.insert(key(fresh), parent)
                parent_of[key(fresh)] = parent
                parent = key(fresh)
        elif op == "touch":
            policy.touch(key(a))
        else:
            _evict(policy, parent_of, b)
    _evict(policy, parent_of, len(parent_of))  # everything drains, children first
    assert len(policy) == 0


def _evict(policy: EvictionPolicy, parent_of: dict[bytes, bytes | None], n: int) -> None:
    for _ in range(n):
        v = policy.victim(lambda k: False)
        if v is None:
            return
        assert not any(p == v and c in policy for c, p in parent_of.items())
        policy.remove(v)


def _cycle(policy: EvictionPolicy, room: int, ids: list[int]) -> None:
    """Insert one-block chains, evicting down to ``room`` as a full tier would."""
    for i in ids:
        while len(policy) >= room:
            v = policy.victim(lambda k: False)
            assert v is not None
            policy.remove(v)
        policy.insert(key(i), None)


def test_arc_keeps_reread_blocks_through_a_scan_that_flushes_lru() -> None:
    for policy in (PrefixAwareARC(), PrefixAwareLRU()):
        _cycle(policy, 8, list(range(1, 9)))  # fill the tier: 8 blocks
        for i in (1, 2, 3):
            policy.touch(key(i))  # read again: ARC moves them to its frequent list
        _cycle(policy, 8, list(range(100, 120)))  # a scan of 20 one-shot blocks
        kept = {i for i in (1, 2, 3) if key(i) in policy}
        # ARC evicts from the recent list while it is over its target (half)
        assert kept == ({1, 2, 3} if isinstance(policy, PrefixAwareARC) else set())


def test_arc_adapts_its_recent_target_to_ghost_hits() -> None:
    arc = PrefixAwareARC()
    _cycle(arc, 4, [1, 2, 3, 4])
    arc.touch(key(4))  # frequent: 4; recent: 1, 2, 3 (over its target of 4 / 2)
    _cycle(arc, 4, [5])  # so the oldest recent block goes: 1
    assert key(1) not in arc and arc.recent_target == 0.5
    _cycle(arc, 4, [1])  # 2 goes; 1 is back from the recent ghosts: recent grows by 1/4
    assert key(2) not in arc and key(1) in arc and arc.recent_target == 0.75
    _cycle(arc, 4, [6])  # recent (3, 5) is under 3 blocks now: the oldest frequent goes
    assert key(4) not in arc and key(3) in arc
    _cycle(arc, 4, [4])  # 4 back from the frequent ghosts: recent shrinks again
    assert key(4) in arc and arc.recent_target == 0.5


def test_unknown_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="known: arc, prefix-lru, lru"):
        make_policy("fifo")
    with pytest.raises(ConfigError, match="unknown admission rule 'maybe'; known: all, tail"):
        replace(make_config(None), admission="maybe")
    assert set(POLICIES) >= {"arc", "prefix-lru", "lru"}


def test_second_sight_declines_a_tail_once() -> None:
    rule = SecondSightTail(remember=2)
    assert not rule.admit(key(1)) and rule.admit(key(1))  # seen twice: in
    assert not rule.admit(key(2)) and not rule.admit(key(3)) and not rule.admit(key(4))
    assert not rule.admit(key(2))  # forgotten: only the last 2 declined keys are kept


BLOCK = 256 * 1024  # one DRAM page of make_config's pool


def _put_chain(store: TieredStore, ids: list[int]) -> list[bool]:
    keys = [key(i) for i in ids]
    parents = [None, *keys[:-1]]
    return store.put(keys, [block_payload(i, BLOCK) for i in ids], parents)


def test_tail_admission_skips_a_new_tail_under_pressure_without_ssd() -> None:
    # 1 MiB of DRAM in 256 KiB pages holds 4 blocks of 256 KiB
    with TieredStore(replace(make_config(None, dram=MiB), admission="tail")) as store:
        assert _put_chain(store, [1, 2, 3]) == [True] * 3  # room: the tail is admitted
        assert _put_chain(store, [10, 11]) == [True, False]  # full: the new tail is not
        assert store.lookup([key(10), key(11)]) == 1 and store.stats().put_declined == 1
        assert _put_chain(store, [10, 11]) == [False, True]  # seen before: admitted now
        assert store.lookup([key(10), key(11)]) == 2 and store.stats().put_declined == 1
        assert store.get_into([key(11)], [block_payload(0, BLOCK)]) == [True]


def test_tail_admission_sends_a_new_tail_to_ssd(tmp_path: Path) -> None:
    config = make_config(tmp_path / "ssd", dram=MiB, ssd=16 * MiB)
    # no demotion before DRAM is full, so the second chain meets a full DRAM
    dram = replace(config.dram, high_watermark=1.0, low_watermark=0.5)
    with TieredStore(replace(config, dram=dram, admission="tail")) as store:
        assert _put_chain(store, [1, 2, 3, 4]) == [True] * 4
        assert _put_chain(store, [10, 11]) == [True, True]
        assert store.stats().put_declined == 1
        assert store.locate([key(10), key(11)])[1] == "ssd"
        got = block_payload(0, BLOCK)
        assert store.get_into([key(10), key(11)], [block_payload(0, BLOCK), got]) == [True] * 2
        assert bool((got == block_payload(11, BLOCK)).all())


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=60, deadline=None)
@given(
    history=st.lists(st.integers(0, 30), max_size=40),
    batch=st.lists(st.tuples(st.integers(0, 60), st.integers(-1, 60)), max_size=30),
)
def test_a_batch_insert_evicts_as_the_same_inserts_one_by_one(
    name: str, history: list[int], batch: list[tuple[int, int]]
) -> None:
    """``insert_many`` (a put's batch) leaves a policy as a loop of
    ``insert`` would: the same victims in the same order, whether the batch
    holds new keys, chains, keys already resident or keys ARC remembers as
    ghosts."""
    one, many = make_policy(name), make_policy(name)
    for p in (one, many):  # a past: residents, then some removed (ghosts)
        for i in history:
            p.insert(key(i), None)
        for i in history[::3]:
            p.remove(key(i))
    seen: set[int] = set()
    items = []
    for k, parent in batch:
        if k not in seen:  # a batch's keys are distinct
            seen.add(k)
            items.append((key(k), None if parent < 0 else key(parent)))
    for k, parent in items:
        one.insert(k, parent)
    many.insert_many(items)
    assert len(one) == len(many)
    assert _drain(one) == _drain(many)
