"""A transfer-engine peer in its own process, driven over stdin/stdout by tests and benches.

    python tests/xfer_peer.py BACKEND SIZE [SIZE ...]

Allocates one region per SIZE filled with ``pattern(i, size)``, plus one
read-only region (``bytes``), grants peers each region whole (reading and
writing; the read-only one for reading), prints ``{"regions": [desc, ...]}``
as one JSON line, then answers commands, one per line:

    hash I          -> sha256 hex of region I
    fill I SEED     -> region I := pattern(SEED, size), prints "ok"
    unregister I    -> prints "ok" or the error
    quit
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np

from transfer import Region, RegionDesc, TransferEngine, make_engine


def pattern(seed: int, n: int) -> np.ndarray:
    return np.frombuffer(np.random.default_rng(seed).bytes(n), dtype=np.uint8)


def served_regions(engine: TransferEngine, sizes: list[int]) -> list[Region]:
    """Region i holds ``pattern(i, size)``; one read-only region (``bytes``) comes last."""
    regions = [engine.alloc(n) for n in sizes]
    for i, r in enumerate(regions):
        r.view[:] = pattern(i, r.nbytes)
    regions.append(engine.register(b"read-only bytes region"))
    return regions


def grant_all(engine: TransferEngine, regions: list[Region]) -> list[RegionDesc]:
    """A grant of each whole region: read and write, read-only where it is."""
    return [engine.grant(r, read=True, write=r.view.flags.writeable) for r in regions]


def main() -> None:
    backend, sizes = sys.argv[1], [int(s) for s in sys.argv[2:]]
    engine = make_engine(backend, timeout=5.0)
    regions = served_regions(engine, sizes)
    descs = grant_all(engine, regions)
    print(json.dumps({"regions": [d.to_dict() for d in descs]}), flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "hash":
            reply = hashlib.sha256(regions[int(args[0])].view).hexdigest()
        elif cmd == "fill":
            r = regions[int(args[0])]
            r.view[:] = pattern(int(args[1]), r.nbytes)
            reply = "ok"
        elif cmd == "unregister":
            try:
                engine.unregister(regions[int(args[0])])
                reply = "ok"
            except Exception as e:
                reply = f"error {e}"
        else:
            break
        print(reply, flush=True)
    engine.close()


if __name__ == "__main__":
    main()
