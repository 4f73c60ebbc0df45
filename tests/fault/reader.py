"""A reader process for fault tests: gets the given blocks in a loop until killed.

``python -m tests.fault.reader URL N`` reads blocks 0..N-1 of the fault-test
namespace and prints "reading" after its first complete get.
"""

from __future__ import annotations

import sys

from client import Client
from tests.fault.blocks import NS, block_keys_of, nbytes


def main(url: str, n: int) -> None:
    with Client.connect(url, namespace=NS) as c:
        dst = c.alloc(n * nbytes())
        outs = list(dst.view(n, nbytes()))
        keys = block_keys_of(range(n))
        first = True
        while True:
            c.get_blocks(keys, outs)
            if first:
                print("reading", flush=True)
                first = False


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
