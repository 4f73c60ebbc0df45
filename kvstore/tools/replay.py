"""Replay a request trace through the store's own placement and eviction.

Each request is a chain of blocks. Replaying it does what a serving engine
would do: look the chain up (the leading blocks found are the request's
hits), read those hits (which refreshes them in their tier's policy), and
put the rest. This goes through a real ``TieredStore`` with tiny payloads
(4 KiB, one slab page each, so capacities are exact block counts), so what
is measured is the store's actual placement, demotion and eviction code.
The bound beside it is Belady's offline MIN on the flattened block sequence.

Formats: ``mooncake`` (JSONL with ``hash_ids``, one id per 512-token block,
as published with the Mooncake paper) and ``tokens`` (JSONL, each line a
list of token ids or ``{"tokens": [...]}``, keyed with the real key
function, as an engine would log them).
"""

from __future__ import annotations

import contextlib
import heapq
import json
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvstore.config import DramConfig, SsdConfig, StoreConfig
from kvstore.errors import InvalidArgumentError, StoreFullError
from kvstore.keys import BlockKey, Namespace, block_keys, leading
from kvstore.layout import KVLayout
from kvstore.stats import SHAPES, shape_of
from kvstore.store import TieredStore
from kvstore.tiers.segment import record_end

PAYLOAD = 4096  # bytes per replayed block: one slab page, so capacity is exact
FORMATS = ("mooncake", "tokens")
MOONCAKE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class Trace:
    requests: list[list[BlockKey]]  # each a chain: block i's parent is block i-1
    block_tokens: int  # tokens per block, for the prefix-shape buckets

    @property
    def accesses(self) -> int:
        return sum(len(r) for r in self.requests)

    @property
    def distinct(self) -> int:
        return len({k for r in self.requests for k in r})


def load_trace(
    path: str | Path, fmt: str = "mooncake", *, block_size: int = 16, limit: int = 0
) -> Trace:
    """Read ``limit`` requests (0: all) of a trace file."""
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"trace format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    ns = Namespace("replay", KVLayout(1, 1, 1, block_size, "uint8"))
    requests: list[list[BlockKey]] = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InvalidArgumentError(f"{path}:{n}: not JSON: {e}") from None
                if fmt == "mooncake":
                    ids = rec.get("hash_ids") if isinstance(rec, dict) else None
                    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                        raise InvalidArgumentError(f"{path}:{n}: no integer list 'hash_ids'")
                    requests.append([i.to_bytes(16, "little", signed=True) for i in ids])
                else:
                    tokens = rec.get("tokens") if isinstance(rec, dict) else rec
                    if not isinstance(tokens, list):
                        raise InvalidArgumentError(f"{path}:{n}: expected a list of token ids")
                    requests.append(block_keys(ns, tokens))
                if limit and len(requests) >= limit:
                    break
    except OSError as e:
        raise InvalidArgumentError(f"cannot read trace {path}: {e}") from None
    return Trace(requests, MOONCAKE_BLOCK_TOKENS if fmt == "mooncake" else block_size)


@dataclass
class Result:
    """Hit counts of one replay (blocks; ``shapes`` by prompt length in tokens)."""

    policy: str
    capacity: int  # blocks, all tiers together
    hits: int = 0
    accesses: int = 0
    tiers: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # bucket -> [hits, accesses]

    def count(self, chain_len: int, block_tokens: int, tiers: Sequence[str]) -> None:
        self.hits += len(tiers)
        self.accesses += chain_len
        for t in tiers:
            self.tiers[t] = self.tiers.get(t, 0) + 1
        row = self.shapes.setdefault(shape_of(chain_len * block_tokens), [0, 0])
        row[0] += len(tiers)
        row[1] += chain_len

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def tier_shares(self) -> dict[str, float]:
        """Hits per tier, as a share of all accesses."""
        return {t: n / self.accesses for t, n in self.tiers.items()} if self.accesses else {}

    def shape_rates(self) -> dict[str, float]:
        """Hit rate per prompt-length bucket (buckets with accesses only)."""
        return {
            name: self.shapes[name][0] / self.shapes[name][1]
            for name, _ in SHAPES
            if name in self.shapes and self.shapes[name][1]
        }

    def as_dict(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "capacity_blocks": self.capacity,
            "hit_rate": self.hit_rate,
            "hits": self.hits,
            "accesses": self.accesses,
            "tiers": self.tier_shares(),
            "shapes": self.shape_rates(),
        }


def replay(
    trace: Trace,
    policy: str,
    dram_blocks: int,
    ssd_blocks: int = 0,
    *,
    progress: Callable[[int], object] | None = None,
    observe: Callable[[TieredStore], object] | None = None,
) -> Result:
    """Replay ``trace`` through a store of ``dram_blocks`` (+ ``ssd_blocks`` on
    SSD, in a temporary directory) using ``policy``: an eviction policy's name,
    optionally with an admission rule after a plus (``arc+tail``). ``observe``
    sees the store after each request (tests check invariants with it)."""
    if dram_blocks < 1 or ssd_blocks < 0:
        raise InvalidArgumentError("capacities must be >= 1 DRAM block and >= 0 SSD blocks")
    eviction, _, admission = policy.partition("+")
    with tempfile.TemporaryDirectory(prefix="kvstore-replay-") as tmp:
        ssd = SsdConfig(
            path=Path(tmp) if ssd_blocks else None,
            capacity=max(1, ssd_blocks) * _ssd_record(),
            segment_size=64 * PAYLOAD * 16,
            flush_on_close=False,
        )
        config = StoreConfig(
            dram=DramConfig(capacity=dram_blocks * PAYLOAD, page_size=PAYLOAD, hugepages=False),
            ssd=ssd,
            eviction=eviction,
            admission=admission or "all",
            promote_on_hit=True,
        )
        result = Result(policy, dram_blocks + ssd_blocks)
        payload = torch.zeros(PAYLOAD, dtype=torch.uint8)
        sink = torch.empty(PAYLOAD, dtype=torch.uint8)
        with TieredStore(config) as store:
            for i, keys in enumerate(trace.requests):
                tiers = store.locate(keys)
                result.count(len(keys), trace.block_tokens, tiers)
                n = len(tiers)
                if n:
                    store.get_into(keys[:n], [sink] * n)
                if n < len(keys):
                    parents: list[BlockKey | None] = [keys[n - 1] if n else None, *keys[n:-1]]
                    # a chain longer than the store keeps what went in
                    with contextlib.suppress(StoreFullError):
                        store.put(keys[n:], [payload] * (len(keys) - n), parents)
                    if ssd_blocks:
                        store.wait_idle()
                if observe is not None:
                    observe(store)
                if progress is not None:
                    progress(i)
    return result


def _ssd_record() -> int:
    return record_end(0, PAYLOAD)


def belady(trace: Trace, capacity: int) -> Result:
    """Belady's MIN on the block sequence, counting hits as leading blocks found
    like the replay: a missed block is cached only if it is used again sooner
    than the cached block used furthest in the future, which it then replaces.

    A parent is always used again before its child (every chain holding the
    child holds the parent first), so this cache never holds a child without
    its parent, and MIN's block hits are prefix hits: no policy does better.
    """
    seq = [k for r in trace.requests for k in r]
    never = len(seq)
    next_use = [never] * len(seq)
    last: dict[BlockKey, int] = {}
    for i in range(len(seq) - 1, -1, -1):
        next_use[i] = last.get(seq[i], never)
        last[seq[i]] = i
    cache: dict[BlockKey, int] = {}  # key -> its next use
    heap: list[tuple[int, BlockKey]] = []  # (-next use, key), stale entries skipped
    result = Result("OPT", capacity)
    pos = 0
    for keys in trace.requests:
        n = leading(k in cache for k in keys)
        result.count(len(keys), trace.block_tokens, ["opt"] * n)
        for k in keys:
            nu = next_use[pos]
            pos += 1
            if k not in cache and len(cache) >= capacity:
                while -heap[0][0] != cache.get(heap[0][1]):
                    heapq.heappop(heap)
                if nu >= -heap[0][0]:
                    continue  # used no sooner than anything cached: not worth a slot
                del cache[heapq.heappop(heap)[1]]
            cache[k] = nu
            heapq.heappush(heap, (-nu, k))
    result.tiers = {}
    return result


def capacities(spec: str, distinct: int) -> list[int]:
    """``"1%,5%,500"`` -> block counts (percentages of the trace's distinct blocks)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            n = round(distinct * float(part[:-1]) / 100) if part.endswith("%") else int(part)
        except ValueError:
            raise InvalidArgumentError(
                f"capacity {part!r}: expected blocks or a percentage"
            ) from None
        if n < 1:
            raise InvalidArgumentError(f"capacity {part!r} is under one block")
        out.append(n)
    if not out:
        raise InvalidArgumentError("no capacity given")
    return out


def run_all(
    trace: Trace,
    policies: Iterable[str],
    sizes: Sequence[int],
    *,
    ssd_fraction: float = 0.0,
    progress: Callable[[int], object] | None = None,
    starting: Callable[[str, int], object] | None = None,
) -> list[Result]:
    """Every policy at every capacity (``ssd_fraction`` of it on SSD), and OPT;
    ``starting(policy, capacity)`` before each run (a progress bar's label)."""
    out = []
    for size in sizes:
        ssd = round(size * ssd_fraction)
        for p in policies:
            if starting is not None:
                starting(p, size)
            out.append(replay(trace, p, max(1, size - ssd), ssd, progress=progress))
        out.append(belady(trace, size))
    return out
