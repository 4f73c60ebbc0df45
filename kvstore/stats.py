"""Counters a store keeps, and the frozen snapshot ``stats()`` hands out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass, field, fields
from typing import Any, TypeVar

K = TypeVar("K")


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
    evictions: dict[str, int] = field(default_factory=dict)  # copies dropped, per tier
    dropped: int = 0  # blocks that left the store entirely under pressure
    demotion_failures: int = 0
    deletes: int = 0
    ns_blocks: dict[int, int] = field(default_factory=dict)  # namespace tag -> blocks stored
    ns_bytes: dict[int, int] = field(default_factory=dict)

    def bump(self, table: dict[K, int], tier: K, n: int = 1) -> None:
        table[tier] = table.get(tier, 0) + n

    def account(self, ns_tag: int, nbytes: int, sign: int) -> None:
        """A block of a namespace entered (+1) or left (-1) the store."""
        self.bump(self.ns_blocks, ns_tag, sign)
        self.bump(self.ns_bytes, ns_tag, sign * nbytes)
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

    def tier(self, name: str) -> TierStats:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tiers"] = {t["name"]: t for t in d["tiers"]}
        d["namespaces"] = {f"{n['tag']:08x}": n for n in d["namespaces"]}
        d["hit_rate"] = self.hit_rate
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
                else NamespaceStats(n.tag, n.name, old.blocks + n.blocks, old.bytes + n.bytes)
            )
    out["namespaces"] = tuple(spaces[t] for t in sorted(spaces))
    return StoreStats(**out)


_COUNTS = [
    f.name
    for f in fields(StoreStats)
    if f.name not in ("tiers", "namespaces", "ssd_garbage_ratio", "lz4_ratio")
]
