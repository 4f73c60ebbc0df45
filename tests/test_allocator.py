import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.allocator import SlabAllocator, size_class

PAGE = 64 * 1024


def test_size_classes_are_tight_and_page_aligned() -> None:
    for n in (16 << 10, 1 << 20, 2 << 20, 3 << 20, 7 << 19):
        assert size_class(n) == n  # common KV block sizes fit exactly
    for n in range(1, 5 << 20, 9973):
        c = size_class(n)
        assert c >= n
        assert c <= max(64, n * 1.25 + 4096)
        if c >= 4096:
            assert c % 4096 == 0


def _check_no_overlap(live: dict[int, int]) -> None:
    spans = sorted(live.items())
    for (a, na), (b, _) in itertools.pairwise(spans):
        assert a + na <= b, f"extents overlap: {a}+{na} > {b}"


def test_churn_never_overlaps_and_never_leaks() -> None:
    alloc = SlabAllocator(64 * PAGE, PAGE)
    rng = random.Random(7)
    live: dict[int, int] = {}
    for step in range(20000):
        if live and (rng.random() < 0.45 or alloc.free_pages == 0):
            off = rng.choice(list(live))
            alloc.free(off)
            del live[off]
        else:
            n = rng.choice([64, 100, 4096, 5000, 16384, 40000, PAGE, 3 * PAGE + 1])
            off = alloc.alloc(n)
            if off is None:
                continue
            assert off + n <= alloc.capacity
            live[off] = n
        if step % 997 == 0:
            _check_no_overlap(live)
    _check_no_overlap(live)
    for off in list(live):
        alloc.free(off)
    assert alloc.used_bytes == 0
    assert alloc.free_pages == alloc.num_pages
    assert alloc.free_bytes == alloc.capacity


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3 * PAGE)), min_size=1, max_size=200))
def test_property_alloc_free_sequences(ops: list[tuple[bool, int]]) -> None:
    alloc = SlabAllocator(16 * PAGE, PAGE)
    live: dict[int, int] = {}
    for is_free, n in ops:
        if is_free and live:
            off = next(iter(live))
            alloc.free(off)
            del live[off]
        else:
            off = alloc.alloc(n)
            if off is not None:
                assert off not in live
                live[off] = n
    _check_no_overlap(live)
    assert alloc.used_bytes == sum(alloc.chunk_size(n) for n in live.values())


def test_full_pool_returns_none_and_frees_make_room_for_another_class() -> None:
    alloc = SlabAllocator(4 * PAGE, PAGE)
    small = [alloc.alloc(PAGE // 4) for _ in range(16)]
    assert None not in small
    assert alloc.alloc(PAGE // 4) is None
    assert alloc.alloc(2 * PAGE) is None
    for off in small[:8]:  # empties two pages: a 2-page run becomes possible
        assert off is not None
        alloc.free(off)
    assert alloc.alloc(2 * PAGE) is not None
    with pytest.raises(ValueError):
        alloc.free(123)
