"""``python -m native [-v]``: build the keying library and the copy
extension now (``.ci/setup`` runs it)."""

from __future__ import annotations

import sys

from native import keys
from native.build import build, cache_dir


def main() -> int:
    try:
        print(f"native: keying library ready in {keys.build()}")
    except OSError as e:
        print(
            f"native: keying library not built ({e}); keys are computed in Python", file=sys.stderr
        )
    try:
        print(f"native: token conversion ready in {keys.build_tokens()}")
    except OSError as e:
        print(f"native: token conversion not built ({e}); array.array is used", file=sys.stderr)
    try:
        mod = build(verbose="-v" in sys.argv)
    except Exception as e:
        print(f"native: build failed: {e}", file=sys.stderr)
        return 1
    kinds = "CPU and CUDA" if mod.has_cuda() else "CPU"
    print(f"native: copy extension ready ({kinds} kernels) in {cache_dir(mod.has_cuda())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
