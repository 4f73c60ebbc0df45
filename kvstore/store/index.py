"""Which blocks a store holds or is storing, and how their chains hang together."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from kvstore.errors import InvalidArgumentError
from kvstore.keys import KEY_BYTES, SCOPED_KEY_BYTES, BlockKey, ScopedKey, split_keys
from kvstore.store.block import Block
from kvstore.tiers.segment import FLAG_LZ4, Record


class BlockIndex:
    """Blocks by scoped key, the keys being stored, and how many stored or
    pending blocks name each key as their parent (a parent with children is
    not dropped from its only tier). Not locked: the store's lock guards it.
    The put and read paths walk ``blocks`` and ``pending`` themselves, a
    batch at a time: a method call per block cost more than the look-ups."""

    def __init__(self) -> None:
        self.blocks: dict[ScopedKey, Block] = {}
        self.pending: set[ScopedKey] = set()
        self.children: dict[ScopedKey, int] = {}
        self.removed: list[BlockKey] | None = None  # see TieredStore.track_removals

    def __len__(self) -> int:
        return len(self.blocks)

    def get(self, key: ScopedKey) -> Block | None:
        return self.blocks.get(key)

    def link(self, parent: ScopedKey | None, delta: int) -> None:
        """Count a block under its parent (+1), or stop counting it (-1)."""
        if parent is None:
            return
        n = self.children.get(parent, 0) + delta
        if n:
            self.children[parent] = n
        else:
            del self.children[parent]

    def unlink(self, key: ScopedKey, block: Block) -> None:
        """Take a block out of the index (its copies are the caller's)."""
        del self.blocks[key]
        self.link(block.parent, -1)
        if self.removed is not None:
            self.removed.append(key[4:])
        block.dead = True

    def adopt(self, records: Iterable[Record]) -> list[tuple[ScopedKey, Block]]:
        """Index the blocks a restarted SSD tier found, parents before children
        (so a policy sees chains), older before newer (so they leave first)."""
        found = {rec.scoped: rec for rec in records}
        added: list[tuple[ScopedKey, Block]] = []
        for key in found:
            chain: list[ScopedKey] = []
            k: ScopedKey | None = key
            while k is not None and k in found and k not in self.blocks and k not in chain:
                chain.append(k)
                k = found[k].scoped_parent
            for k in reversed(chain):
                rec = found[k]
                b = Block(
                    rec.scoped_parent, rec.raw_len, rec.checksum, rec.ns_tag,
                    bool(rec.flags & FLAG_LZ4), on_ssd=True,
                )  # fmt: skip
                self.blocks[k] = b
                self.link(b.parent, +1)
                added.append((k, b))
        return added


def scoped_keys(keys: Sequence[BlockKey], ns_tag: int | None) -> list[ScopedKey]:
    """Check ``keys`` and scope them by their namespace (None: the default, 0)."""
    try:
        packed = b"".join(keys)
        lengths = set(map(len, keys))
    except TypeError:
        lengths = {-1}
    if len(keys) and lengths != {KEY_BYTES}:
        bad = next(k for k in keys if not isinstance(k, bytes) or len(k) != KEY_BYTES)
        raise InvalidArgumentError(f"block keys are {KEY_BYTES}-byte bytes, got {bad!r:.40}")
    out = np.empty((len(keys), SCOPED_KEY_BYTES), np.uint8)
    out[:, :4] = np.frombuffer((ns_tag or 0).to_bytes(4, "little"), np.uint8)
    out[:, 4:] = np.frombuffer(packed, np.uint8).reshape(-1, KEY_BYTES)
    return split_keys(out.tobytes(), SCOPED_KEY_BYTES)
