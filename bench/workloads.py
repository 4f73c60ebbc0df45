"""Synthetic request workloads for ``kvstore replay``, unlike the Mooncake trace.

``chat`` is multi-turn conversation traffic with one-shot documents mixed in:

- a new conversation starts from one of ``systems`` system prompts (2-16
  blocks each, popularity 1/rank) and adds a user message (1-4 blocks);
- a later turn of a live conversation resends everything so far (the previous
  prompt, the model's reply of 1-3 blocks, a new message), and ends the
  conversation one time in four;
- a ``scan`` share of requests are unique documents of 32-128 blocks that are
  never seen again: the traffic a scan-resistant policy must not let flush
  the conversations.

Each step starts a conversation (25%) or continues a random live one (75%).
Requests are token-id lists (``block_size`` tokens per block, ids drawn from
a seeded generator), written as the ``tokens`` JSONL format so a replay keys
them with the store's real key function.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def chat(
    requests: int = 4000,
    *,
    seed: int = 0,
    block_size: int = 16,
    systems: int = 16,
    scan: float = 0.2,
) -> list[list[int]]:
    rng = random.Random(seed)

    def blocks(n: int) -> list[int]:
        return [rng.randrange(32000) for _ in range(n * block_size)]

    prompts = [blocks(rng.randint(2, 16)) for _ in range(systems)]
    weights = [1 / (rank + 1) for rank in range(systems)]
    live: list[list[int]] = []  # each conversation's history, reply included
    out: list[list[int]] = []
    while len(out) < requests:
        if rng.random() < scan:
            out.append(blocks(rng.randint(32, 128)))
        elif live and rng.random() < 0.75:
            i = rng.randrange(len(live))
            prompt = live[i] + blocks(rng.randint(1, 4))
            out.append(prompt)
            if rng.random() < 0.25:
                live.pop(i)
            else:
                live[i] = prompt + blocks(rng.randint(1, 3))
        else:
            prompt = rng.choices(prompts, weights)[0] + blocks(rng.randint(1, 4))
            out.append(prompt)
            live.append(prompt + blocks(rng.randint(1, 3)))
    return out


def write_tokens(path: str | Path, requests: list[list[int]]) -> Path:
    """Write ``requests`` as the ``tokens`` trace format (one JSON list per line)."""
    path = Path(path)
    with open(path, "w") as f:
        for tokens in requests:
            f.write(json.dumps(tokens) + "\n")
    return path
