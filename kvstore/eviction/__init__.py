"""Eviction policies and admission rules, chosen by name in the store's config."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from kvstore.errors import ConfigError
from kvstore.eviction.admission import ADMISSIONS, Admission
from kvstore.eviction.arc import PrefixAwareARC
from kvstore.eviction.base import EvictionPolicy
from kvstore.eviction.lru import LRU
from kvstore.eviction.prefix_lru import PrefixAwareLRU

POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "arc": PrefixAwareARC,
    "prefix-lru": PrefixAwareLRU,
    "lru": LRU,
}
DEFAULT_POLICY = "arc"  # the best measured (docs/performance.md, "kvstore replay")


T = TypeVar("T")


def make_policy(name: str) -> EvictionPolicy:
    return _make(POLICIES, name, "eviction policy")


def make_admission(name: str) -> Admission:
    return _make(ADMISSIONS, name, "admission rule")


def _make(table: dict[str, Callable[[], T]], name: str, what: str) -> T:
    try:
        return table[name]()
    except KeyError:
        raise ConfigError(f"unknown {what} {name!r}; known: {', '.join(table)}") from None


__all__ = [
    "ADMISSIONS",
    "DEFAULT_POLICY",
    "LRU",
    "POLICIES",
    "Admission",
    "EvictionPolicy",
    "PrefixAwareARC",
    "PrefixAwareLRU",
    "make_admission",
    "make_policy",
]
