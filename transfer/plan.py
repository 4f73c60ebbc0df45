"""How a group of transfers to one peer becomes wire entries and parallel lanes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from transfer.base import Transfer
from transfer.protocol import Op, new_entries


class Piece(NamedTuple):
    item: int  # index of the transfer in the group
    op: Op
    local: np.ndarray  # the local bytes, already sliced
    region: int  # the remote grant's id
    offset: int  # in the remote grant
    key: tuple[int, int]  # the remote grant's key


def plan_lanes(items: Sequence[Transfer], streams: int, min_bytes: int) -> list[list[Piece]]:
    """Cut a group into pieces of >= ``min_bytes`` and deal them to up to ``streams`` lanes."""
    total = sum(t.length for t in items)
    lanes = max(1, min(streams, total // min_bytes))
    chunk = max(min_bytes, -(-total // lanes))
    step = chunk if lanes > 1 else max(total, 1)
    pieces: list[Piece] = []
    for i, t in enumerate(items):
        local = t.local.view[t.local_offset : t.local_offset + t.length]
        op, region, key = t.op, t.remote.region_id, t.remote.key_words
        for start in range(0, max(t.length, 1), step):
            pieces.append(
                Piece(i, op, local[start : start + step], region, t.remote_offset + start, key)
            )
    if lanes == 1:
        return [pieces]
    out: list[list[Piece]] = [[] for _ in range(lanes)]
    load = [0] * lanes
    for p in sorted(pieces, key=lambda p: -p.local.nbytes):
        k = load.index(min(load))
        out[k].append(p)
        load[k] += p.local.nbytes
    return [lane for lane in out if lane]


def encode(pieces: Sequence[Piece]) -> np.ndarray:
    """The wire entries asking the peer for ``pieces``, in order."""
    entries = new_entries(len(pieces))
    entries["op"] = [p.op for p in pieces]
    entries["region"] = [p.region for p in pieces]
    entries["offset"] = [p.offset for p in pieces]
    entries["length"] = [p.local.nbytes for p in pieces]
    entries["key0"] = [p.key[0] for p in pieces]
    entries["key1"] = [p.key[1] for p in pieces]
    return entries


def one_lane(items: Sequence[Transfer]) -> list[Piece]:
    """Each transfer as a single piece (backends that do not split)."""
    return plan_lanes(items, 1, 1)[0]
