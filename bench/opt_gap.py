"""What an online policy could reach on a trace: bounds that use hindsight.

OPT (Belady's MIN) knows every block's next use. Between it and LRU, this
measures two caches that know part of the future, to show how much of OPT's
lead any online rule could hope to recover on this trace:

- ``oracle admission``: LRU that caches a block only if it is used again
  within ``H`` block accesses (a perfect yes/no reuse predictor; best ``H``
  of a sweep in multiples of the capacity);
- ``hindsight classes``: each access falls in a class by what a store can
  see (accesses so far, requests since the last one, the chain's length in
  blocks); a block's priority is its class's chance of reuse within ``H``,
  measured on the whole trace in advance, plus its age's decay; the lowest
  goes, and a block worth less than the lowest cached one is not cached
  (best of a sweep). An online learner of the same classes can only do worse.

Hits are leading blocks found, as in ``kvstore replay``; this runs on the block
sequence alone (no store), in seconds.

Run: ``python -m bench.opt_gap`` (``--capacity``, ``--trace``, ``--json``).
"""

from __future__ import annotations

import heapq
import json
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.report import bench_parser
from kvstore.keys import BlockKey, leading
from kvstore.tools.replay import Trace, belady, capacities, load_trace

TRACE = Path(__file__).resolve().parents[2] / "shared/data/traces/mooncake_synthetic_trace.jsonl"
NEVER = 1 << 62


def next_uses(seq: Sequence[BlockKey]) -> list[int]:
    out = [NEVER] * len(seq)
    last: dict[BlockKey, int] = {}
    for i in range(len(seq) - 1, -1, -1):
        out[i] = last.get(seq[i], NEVER)
        last[seq[i]] = i
    return out


def classes(trace: Trace) -> list[tuple[int, int, int]]:
    """Per access: (accesses so far, log2 requests since the last, log2 chain length)."""
    count: Counter[BlockKey] = Counter()
    last: dict[BlockKey, int] = {}
    out = []
    for i, chain in enumerate(trace.requests):
        length = min(int(math.log2(len(chain))), 7)
        for k in chain:
            count[k] += 1
            gap = min(int(math.log2(i - last[k] + 1)), 11) if k in last else -1
            out.append((min(count[k], 6), gap, length))
            last[k] = i
    return out


def lru_admitting(trace: Trace, capacity: int, admit: Callable[[int], bool]) -> float:
    """LRU that keeps a block (on a miss or a hit) only if ``admit(access index)``."""
    cache: OrderedDict[BlockKey, None] = OrderedDict()
    hits = pos = 0
    for chain in trace.requests:
        hits += leading(k in cache for k in chain)
        for k in chain:
            if k in cache:
                cache.move_to_end(k)
                if not admit(pos):
                    del cache[k]
            elif admit(pos):
                if len(cache) >= capacity:
                    cache.popitem(last=False)
                cache[k] = None
            pos += 1
    return hits / trace.accesses


def by_priority(trace: Trace, capacity: int, prio: Callable[[int], float]) -> float:
    """Evict the lowest ``prio(access index)``; bypass a block worth less than that."""
    cache: dict[BlockKey, float] = {}
    heap: list[tuple[float, BlockKey]] = []
    hits = pos = 0
    for chain in trace.requests:
        hits += leading(k in cache for k in chain)
        for k in chain:
            p = prio(pos)
            pos += 1
            if k not in cache and len(cache) >= capacity:
                while cache.get(heap[0][1]) != heap[0][0]:
                    heapq.heappop(heap)  # stale: re-prioritised or gone
                if heap[0][0] > p:
                    continue
                del cache[heapq.heappop(heap)[1]]
            cache[k] = p
            heapq.heappush(heap, (p, k))
    return hits / trace.accesses


def bounds(trace: Trace, capacity: int) -> dict[str, float]:
    seq = [k for chain in trace.requests for k in chain]
    nxt = next_uses(seq)
    out = {"LRU": lru_admitting(trace, capacity, lambda _: True)}
    horizons = [m * capacity for m in (2, 4, 8, 16)]
    cls = classes(trace)
    seen = Counter(cls)
    admitted, prioritised = 0.0, 0.0
    for h in horizons:
        soon = [u - i <= h for i, u in enumerate(nxt)]
        admitted = max(admitted, lru_admitting(trace, capacity, soon.__getitem__))
        reused: Counter[tuple[int, int, int]] = Counter(
            c for c, s in zip(cls, soon, strict=True) if s
        )
        chance = [reused[c] / seen[c] for c in cls]
        for decay in (h, 2 * h):
            prio = [p + i / decay for i, p in enumerate(chance)]
            prioritised = max(prioritised, by_priority(trace, capacity, prio.__getitem__))
    out["oracle admission"] = admitted
    out["hindsight classes"] = prioritised
    out["OPT"] = belady(trace, capacity).hit_rate
    return out


def main() -> None:
    p = bench_parser("opt_gap", __doc__, rounds="unused", quick="the first 800 requests")
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--capacity", default="5%")
    args = p.parse_args()
    trace = load_trace(args.trace, limit=800 if args.quick else 0)
    for size in capacities(args.capacity, trace.distinct):
        got = bounds(trace, size)
        if args.json:
            print(json.dumps({"capacity_blocks": size, "hit_rate": got}))
            continue
        print(f"\n{size} blocks ({size / trace.distinct:.0%} of {trace.distinct} distinct)")
        for name, rate in got.items():
            print(f"  {name:20} {rate:7.1%}   {rate / got['OPT']:.2f}x OPT")


if __name__ == "__main__":
    main()
