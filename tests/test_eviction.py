from kvstore.eviction import PrefixAwareLRU
from tests.conftest import key


def _chain(policy: PrefixAwareLRU, ids: list[int]) -> None:
    parent = None
    for i in ids:
        policy.insert(key(i), parent)
        parent = key(i)


def test_chain_tails_go_first_and_parents_follow() -> None:
    p = PrefixAwareLRU()
    _chain(p, [1, 2, 3])  # older chain
    _chain(p, [10, 11])  # newer chain
    order = []
    while (v := p.victim(lambda k: False)) is not None:
        order.append(int.from_bytes(v, "little"))
        p.remove(v)
    assert order == [3, 2, 1, 11, 10]


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


def test_parent_with_a_resident_child_is_never_a_victim() -> None:
    p = PrefixAwareLRU()
    _chain(p, [1, 2])
    p.insert(key(3), key(1))  # a branch: 1 -> 2 and 1 -> 3
    seen = set()
    while (v := p.victim(lambda k: False)) is not None:
        assert not any(
            child in p and parent == v for child, parent in [(key(2), key(1)), (key(3), key(1))]
        )
        seen.add(v)
        p.remove(v)
    assert seen == {key(1), key(2), key(3)}
    assert len(p) == 0
