"""Chained block keys in C (``csrc/chain_keys.c``), loaded with ctypes.

The library is tiny and needs no torch headers: the first use compiles it
with the system C compiler against OpenSSL's libcrypto (a fraction of a
second) into ``KVSTORE_NATIVE_CACHE`` (default ``~/.cache/kvstore/native``),
under a name keyed by its source, so an unchanged source is never rebuilt
and two checkouts share one build. Where it cannot be built (no compiler, no
OpenSSL headers) or ``KVSTORE_NATIVE=0``, ``chain_keys`` returns None and
``kvstore.keys`` keys in Python: the same keys, about 10x slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "chain_keys.c"
COMMAND = ["-O2", "-shared", "-fPIC", "-lcrypto"]
KEY_BYTES = 16

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failure: str | None = None


def library_path() -> Path:
    h = hashlib.sha256(SOURCE.read_bytes() + " ".join(COMMAND).encode()).hexdigest()[:16]
    root = Path(os.environ.get("KVSTORE_NATIVE_CACHE", Path.home() / ".cache/kvstore/native"))
    return root / f"chain_keys-{h}.so"


def build() -> Path:
    """Compile the library if its cached build is missing; its path."""
    path = library_path()
    if path.exists():
        return path
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        cmd = [cc, str(SOURCE), "-o", tmp, *COMMAND]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, path)  # atomic: a concurrent build never loads half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load() -> ctypes.CDLL | None:
    global _lib, _failure
    with _lock:
        if _lib is None and _failure is None:
            if os.environ.get("KVSTORE_NATIVE", "1") == "0":
                _failure = "disabled by KVSTORE_NATIVE=0"
                return None
            try:
                lib = ctypes.CDLL(str(build()))
                fn = lib.kvstore_chain_keys
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_uint64]
                fn.argtypes += [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64]
                _lib = lib
            except OSError as e:
                _failure = str(e)
                log.warning("kvstore: native keying unavailable (%s); keying in Python", e)
    return _lib


def chain_keys(
    start: bytes, data: np.ndarray, nblocks: int, block_bytes: int, prefix: bytes = b""
) -> bytes | None:
    """``nblocks`` chained keys over the C-contiguous ``data`` (``block_bytes``
    each), from ``start``, concatenated, each after ``prefix`` (at most 16
    bytes); None where the library is unavailable or the block is too large
    for it."""
    lib = _lib if _lib is not None else _load()
    if lib is None:
        return None
    if len(start) != KEY_BYTES or data.nbytes < nblocks * block_bytes:
        raise ValueError("chain_keys: a 16-byte start and nblocks * block_bytes of data")
    if not data.flags.c_contiguous or len(prefix) > KEY_BYTES:
        raise ValueError("chain_keys: data must be C-contiguous, a prefix at most 16 bytes")
    out = ctypes.create_string_buffer(nblocks * (len(prefix) + KEY_BYTES))
    if lib.kvstore_chain_keys(
        start, data.ctypes.data, nblocks, block_bytes, out, prefix, len(prefix)
    ):
        return None
    return out.raw


def failure() -> str | None:
    """Why the library is not loaded (None when it is, or was not tried yet)."""
    return _failure
