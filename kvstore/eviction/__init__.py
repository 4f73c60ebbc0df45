"""Eviction policies, chosen by name in the store's config."""

from __future__ import annotations

from collections.abc import Callable

from kvstore.errors import ConfigError
from kvstore.eviction.base import EvictionPolicy
from kvstore.eviction.lru import LRU
from kvstore.eviction.prefix_lru import PrefixAwareLRU

POLICIES: dict[str, Callable[[], EvictionPolicy]] = {"prefix-lru": PrefixAwareLRU, "lru": LRU}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(
            f"unknown eviction policy {name!r}; known: {', '.join(POLICIES)}"
        ) from None


__all__ = ["LRU", "POLICIES", "EvictionPolicy", "PrefixAwareLRU", "make_policy"]
