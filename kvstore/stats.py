"""Counters a store keeps, and the frozen snapshot ``stats()`` hands out."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, astuple, dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

from kvstore.tier import Tier

if TYPE_CHECKING:
    from kvstore.tiers.ssd import SsdTier

K = TypeVar("K")

# Prefix shapes: a lookup is bucketed by the prompt length it asked about, in
# tokens, since a hit's value (prefill skipped) grows with the prefix.
SHAPES: tuple[tuple[str, float], ...] = (
    ("0-1k", 1024),
    ("1k-4k", 4096),
    ("4k-16k", 16384),
    ("16k+", float("inf")),
)


_SHAPE_NAMES = [name for name, _ in SHAPES]
_SHAPE_LIMITS = [limit for _, limit in SHAPES]


def shape_of(tokens: int) -> str:
    return _SHAPE_NAMES[bisect.bisect_left(_SHAPE_LIMITS, tokens)]


def _row(table: dict[K, list[int]], key: K, width: int = 3) -> list[int]:
    row = table.get(key)
    if row is None:
        row = table[key] = [0] * width
    return row


LOOKUP_TIERS = tuple(t.value for t in Tier)  # fastest first, as kvstore.tier has them
# a prefix shape's counters: a lookup row, then the tokens found in each tier
SHAPE_FIELDS = ("lookups", "hit_tokens", "miss_tokens", *(f"{t}_hit_tokens" for t in LOOKUP_TIERS))


@dataclass
class Counters:
    """Mutable; updated under the store's lock."""

    puts: int = 0  # blocks newly stored
    put_duplicates: int = 0  # blocks already present (keys name content)
    put_bytes: int = 0
    hits: dict[str, int] = field(default_factory=dict)  # blocks served, per tier
    misses: int = 0
    get_bytes: int = 0
    lookups: int = 0
    lookup_hit_blocks: int = 0
    lookup_miss_blocks: int = 0
    demotions: int = 0  # DRAM -> SSD copies
    promotions: int = 0  # SSD -> DRAM copies
    # copies that left a tier to make room, per tier: an HBM copy moves down to
    # DRAM (or is dropped where SSD has one), a DRAM copy is dropped once SSD
    # holds it (demotions counts the writes), an SSD copy is dropped
    evictions: dict[str, int] = field(default_factory=dict)
    dropped: int = 0  # blocks that left the store entirely under pressure
    demotion_failures: int = 0
    deletes: int = 0
    dram_checksum_failures: int = 0  # DRAM copies that failed verify_dram_reads
    ns_blocks: dict[int, int] = field(default_factory=dict)  # namespace tag -> blocks stored
    ns_bytes: dict[int, int] = field(default_factory=dict)
    put_refused: int = 0  # blocks no tier could take (StoreFullError)
    put_declined: int = 0  # tails admission kept out of DRAM (to SSD, or not stored)
    # lookups of namespaces whose block size is known (metrics.enabled):
    lookup_hit_tokens: dict[str, int] = field(default_factory=dict)  # per tier
    lookup_miss_tokens: int = 0
    shapes: dict[str, list[int]] = field(default_factory=dict)  # SHAPE_FIELDS
    ns_lookups: dict[int, list[int]] = field(default_factory=dict)  # the same per namespace

    def bump(self, table: dict[K, int], tier: K, n: int = 1) -> None:
        table[tier] = table.get(tier, 0) + n

    def lookup_tokens(self, ns_tag: int, tiers: Sequence[str], asked: int, block_size: int) -> None:
        """One lookup of ``asked`` blocks that found ``tiers`` (one per leading hit)."""
        rest = len(tiers)
        shape = _row(self.shapes, shape_of(asked * block_size), len(SHAPE_FIELDS))
        for i, tier in enumerate(LOOKUP_TIERS):  # counted in C; usually one tier has them all
            n = tiers.count(tier) if rest else 0
            if n:
                self.bump(self.lookup_hit_tokens, tier, n * block_size)
                shape[3 + i] += n * block_size
                rest -= n
        hit, missed = len(tiers) * block_size, (asked - len(tiers)) * block_size
        self.lookup_miss_tokens += missed
        for row in (shape, _row(self.ns_lookups, ns_tag)):
            row[0] += 1
            row[1] += hit
            row[2] += missed

    def account(self, ns_tag: int, nbytes: int, blocks: int) -> None:
        """``blocks`` of a namespace, ``nbytes`` in all, entered the store
        (both negative: left it)."""
        self.bump(self.ns_blocks, ns_tag, blocks)
        self.bump(self.ns_bytes, ns_tag, nbytes)
        if not self.ns_blocks[ns_tag]:
            del self.ns_blocks[ns_tag], self.ns_bytes[ns_tag]


@dataclass(frozen=True)
class TierStats:
    name: str
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int
    evictions: int


@dataclass(frozen=True)
class NamespaceStats:
    tag: int  # Namespace.tag
    name: str  # "tenant/model", or "?" when no client opened it since start-up
    blocks: int
    bytes: int
    lookups: int = 0
    hit_tokens: int = 0
    miss_tokens: int = 0


@dataclass(frozen=True)
class StoreStats:
    tiers: tuple[TierStats, ...]
    blocks: int
    puts: int
    put_duplicates: int
    put_bytes: int
    hits: int
    misses: int
    get_bytes: int
    lookups: int
    lookup_hit_blocks: int
    lookup_miss_blocks: int
    demotions: int
    promotions: int
    dropped: int
    demotion_failures: int
    deletes: int
    checksum_failures: int
    ssd_read_errors: int
    ssd_compactions: int
    ssd_reclaimed_bytes: int
    ssd_garbage_ratio: float
    lz4_ratio: float | None  # raw / stored bytes of blocks written with lz4
    namespaces: tuple[NamespaceStats, ...] = ()
    put_refused: int = 0
    put_declined: int = 0
    lookup_hit_tokens: dict[str, int] = field(default_factory=dict)  # per tier
    lookup_miss_tokens: int = 0
    shapes: dict[str, dict[str, int]] = field(default_factory=dict)  # lookups, hit/miss tokens

    @property
    def lookup_hit_rate(self) -> float:
        """Hit tokens over asked tokens, over the lookups of known namespaces."""
        hit = sum(self.lookup_hit_tokens.values())
        total = hit + self.lookup_miss_tokens
        return hit / total if total else 0.0

    def tier(self, name: str) -> TierStats:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def read_hit_rate(self) -> float:
        """Blocks served over blocks asked for by reads (gets)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tiers"] = {t["name"]: t for t in d["tiers"]}
        d["namespaces"] = {f"{n['tag']:08x}": n for n in d["namespaces"]}
        d["read_hit_rate"] = self.read_hit_rate
        d["lookup_hit_rate"] = self.lookup_hit_rate
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreStats:
        """Inverse of ``as_dict`` (a remote node's stats arrive as JSON)."""
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        fields["tiers"] = tuple(TierStats(**t) for t in d["tiers"].values())
        ns_fields = NamespaceStats.__dataclass_fields__
        fields["namespaces"] = tuple(
            NamespaceStats(**{k: v for k, v in n.items() if k in ns_fields})
            for n in d.get("namespaces", {}).values()
        )
        return cls(**fields)


def build_stats(
    c: Counters,
    tiers: Sequence[tuple[str, int, int, int]],
    blocks: int,
    names: Mapping[int, str],
    ssd: SsdTier | None,
) -> StoreStats:
    """A store's snapshot from its counters, its tiers (name, capacity, used
    bytes, blocks; fastest first) and its namespaces' names."""
    sc = ssd.counters if ssd is not None else None
    return StoreStats(
        tiers=tuple(
            TierStats(name, cap, used, n, c.hits.get(name, 0), c.evictions.get(name, 0))
            for name, cap, used, n in tiers
        ),
        blocks=blocks,
        puts=c.puts,
        put_duplicates=c.put_duplicates,
        put_bytes=c.put_bytes,
        hits=sum(c.hits.values()),
        misses=c.misses,
        get_bytes=c.get_bytes,
        lookups=c.lookups,
        lookup_hit_blocks=c.lookup_hit_blocks,
        lookup_miss_blocks=c.lookup_miss_blocks,
        demotions=c.demotions,
        promotions=c.promotions,
        dropped=c.dropped,
        demotion_failures=c.demotion_failures,
        deletes=c.deletes,
        checksum_failures=c.dram_checksum_failures + (sc.checksum_failures if sc else 0),
        ssd_read_errors=sc.read_errors if sc else 0,
        ssd_compactions=sc.compactions if sc else 0,
        ssd_reclaimed_bytes=sc.reclaimed_bytes if sc else 0,
        ssd_garbage_ratio=ssd.garbage_ratio() if ssd is not None else 0.0,
        lz4_ratio=(sc.lz4_raw_bytes / sc.lz4_stored_bytes) if sc and sc.lz4_stored_bytes else None,
        namespaces=tuple(
            NamespaceStats(
                tag,
                names.get(tag, "?"),
                c.ns_blocks.get(tag, 0),
                c.ns_bytes.get(tag, 0),
                *c.ns_lookups.get(tag, (0, 0, 0)),
            )
            for tag in sorted(set(c.ns_blocks) | set(c.ns_lookups))
        ),
        put_refused=c.put_refused,
        put_declined=c.put_declined,
        lookup_hit_tokens=dict(c.lookup_hit_tokens),
        lookup_miss_tokens=c.lookup_miss_tokens,
        shapes={name: dict(zip(SHAPE_FIELDS, row, strict=True)) for name, row in c.shapes.items()},
    )


def merge_stats(parts: Sequence[StoreStats]) -> StoreStats:
    """Several nodes' stats as one store's: counts and bytes add up, tiers and
    namespaces merge by name, ratios keep the worst (garbage) or the only value."""
    out: dict[str, Any] = {f: sum(getattr(p, f) for p in parts) for f in _COUNTS}
    out["ssd_garbage_ratio"] = max((p.ssd_garbage_ratio for p in parts), default=0.0)
    lz4 = [p.lz4_ratio for p in parts if p.lz4_ratio is not None]
    out["lz4_ratio"] = lz4[0] if len(lz4) == 1 else None
    tiers: dict[str, list[int]] = {}
    for p in parts:
        for t in p.tiers:
            acc = tiers.setdefault(t.name, [0] * 5)
            for i, v in enumerate(astuple(t)[1:]):
                acc[i] += v
    out["tiers"] = tuple(TierStats(name, *acc) for name, acc in tiers.items())
    spaces: dict[int, NamespaceStats] = {}
    for p in parts:
        for n in p.namespaces:
            old = spaces.get(n.tag)
            spaces[n.tag] = (
                n
                if old is None
                else NamespaceStats(
                    n.tag,
                    n.name,
                    *(a + b for a, b in zip(astuple(old)[2:], astuple(n)[2:], strict=True)),
                )
            )
    out["namespaces"] = tuple(spaces[t] for t in sorted(spaces))
    out["lookup_hit_tokens"] = _sum_maps(p.lookup_hit_tokens for p in parts)
    out["shapes"] = {
        shape: _sum_maps(p.shapes[shape] for p in parts if shape in p.shapes)
        for shape in sorted({s for p in parts for s in p.shapes})
    }
    return StoreStats(**out)


def _sum_maps(maps: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in maps:
        for k, v in m.items():
            out[k] = out.get(k, 0) + v
    return out


_COUNTS = [
    f.name
    for f in fields(StoreStats)
    if f.name
    not in ("tiers", "namespaces", "ssd_garbage_ratio", "lz4_ratio", "lookup_hit_tokens", "shapes")
]
