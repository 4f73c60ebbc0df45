"""Regenerate the committed gRPC modules from ``kvstore.proto``.

    python -m kvstore.proto.generate

Only the message modules are generated (``kvstore_pb2.py`` and its typed
``.pyi``); the service's method table is read from the proto's descriptor
(``kvstore.rpc``), so no untyped stub module is needed. They are committed, so
installing kvstore needs no protoc; ``tests/test_service.py`` fails when they
drift from the proto.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTO = HERE / "kvstore.proto"


def protoc(*outputs: str) -> int:
    """Run grpc_tools' protoc on the proto with ``outputs`` (``--python_out=DIR`` ...)."""
    try:
        from grpc_tools import protoc as tool
    except ImportError:
        print("needs grpcio-tools: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    include = Path(tool.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT}", f"-I{include}", *outputs, str(PROTO.relative_to(ROOT))]
    return int(tool.main(args))


def main() -> int:
    out = str(ROOT)
    return protoc(f"--python_out={out}", f"--pyi_out={out}")


if __name__ == "__main__":
    sys.exit(main())
