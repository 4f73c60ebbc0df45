"""Chained block keys in C (``csrc/chain_keys.c``), loaded with ctypes.

The library is tiny and needs no torch headers: the first use compiles it
with the system C compiler against OpenSSL's libcrypto (a fraction of a
second) into ``KVSTORE_NATIVE_CACHE`` (default ``~/.cache/kvstore/native``),
under a name keyed by its source, so an unchanged source is never rebuilt
and two checkouts share one build. Where it cannot be built (no compiler, no
OpenSSL headers) or ``KVSTORE_NATIVE=0``, ``chain_keys`` returns None and
``kvstore.keys`` keys in Python: the same keys, about 10x slower.

``token_list`` (``csrc/token_list.c``, built the same way against this
Python's headers) turns an engine's list of token ids into the uint32 array
the chain reads; where it is missing, ``array.array`` does it, 3x slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "chain_keys.c"
COMMAND = ["-O2", "-shared", "-fPIC", "-lcrypto"]
TOKENS_SOURCE = CSRC / "token_list.c"  # needs Python's headers, so a library of its own
KEY_BYTES = 16

_lock = threading.Lock()


def _tokens_command() -> list[str]:
    return ["-O2", "-shared", "-fPIC", "-I", sysconfig.get_paths()["include"]]


def library_path(source: Path | None = None, command: Sequence[str] = COMMAND) -> Path:
    source = source or SOURCE
    h = hashlib.sha256(source.read_bytes() + " ".join(command).encode()).hexdigest()[:16]
    root = Path(os.environ.get("KVSTORE_NATIVE_CACHE", Path.home() / ".cache/kvstore/native"))
    return root / f"{source.stem}-{h}.so"


def build(source: Path | None = None, command: Sequence[str] = COMMAND) -> Path:
    """Compile ``source`` (the keying library's by default) if its cached
    build is missing; its path."""
    source = source or SOURCE
    path = library_path(source, command)
    if path.exists():
        return path
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        cmd = [cc, str(source), "-o", tmp, *command]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, path)  # atomic: a concurrent build never loads half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def build_tokens() -> Path:
    """``build`` of the token-list library (against this Python's headers)."""
    return build(TOKENS_SOURCE, _tokens_command())


class _Loaded:
    """One C function, loaded on first use (``open`` builds and binds it),
    or why it could not be (then its caller's Python path runs)."""

    def __init__(self, open_fn: Callable[[], Any], fallback: str) -> None:
        self._open = open_fn
        self._fallback = fallback
        self.fn: Any = None
        self.failure: str | None = None

    def get(self) -> Any:
        if self.fn is None and self.failure is None:
            with _lock:
                if self.fn is None and self.failure is None:
                    self._load()
        return self.fn

    def _load(self) -> None:
        if os.environ.get("KVSTORE_NATIVE", "1") == "0":
            self.failure = "disabled by KVSTORE_NATIVE=0"
            return
        try:
            self.fn = self._open()
        except OSError as e:
            self.failure = str(e)
            log.warning("kvstore: native %s unavailable (%s)", self._fallback, e)


def _open_chain() -> Any:
    fn = ctypes.CDLL(str(build())).kvstore_chain_keys
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_uint64]
    fn.argtypes += [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64]
    return fn


def _open_tokens() -> Any:
    fn = ctypes.PyDLL(str(build_tokens())).kvstore_token_list  # keeps the GIL: the C API needs it
    fn.restype = ctypes.c_longlong
    fn.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_longlong]
    return fn


_chain = _Loaded(_open_chain, "keying (keys are computed in Python)")
_tokens = _Loaded(_open_tokens, "token conversion (array.array converts)")


def token_list(tokens: list[int] | tuple[int, ...]) -> np.ndarray | None:
    """A list or tuple of ints as a uint32 array, in one C pass (3x faster
    than ``array.array``); None where the library is unavailable or an item
    is not a plain int in [0, 2**32) (the caller's own path says which)."""
    fn = _tokens.get()
    if fn is None or type(tokens) not in (list, tuple):
        return None
    out = np.empty(len(tokens), dtype="<u4")
    return out if fn(tokens, out.ctypes.data, len(tokens)) == -1 else None


def chain_keys(
    start: bytes, data: np.ndarray, nblocks: int, block_bytes: int, prefix: bytes = b""
) -> bytes | None:
    """``nblocks`` chained keys over the C-contiguous ``data`` (``block_bytes``
    each), from ``start``, concatenated, each after ``prefix`` (at most 16
    bytes); None where the library is unavailable or the block is too large
    for it."""
    fn = _chain.get()
    if fn is None:
        return None
    if len(start) != KEY_BYTES or data.nbytes < nblocks * block_bytes:
        raise ValueError("chain_keys: a 16-byte start and nblocks * block_bytes of data")
    if not data.flags.c_contiguous or len(prefix) > KEY_BYTES:
        raise ValueError("chain_keys: data must be C-contiguous, a prefix at most 16 bytes")
    out = ctypes.create_string_buffer(nblocks * (len(prefix) + KEY_BYTES))
    if fn(start, data.ctypes.data, nblocks, block_bytes, out, prefix, len(prefix)):
        return None
    return out.raw


def failure() -> str | None:
    """Why the keying library is not loaded (None when it is, or was not tried yet)."""
    return _chain.failure


def tokens_failure() -> str | None:
    """Why the token-list library is not loaded (None when it is, or was not tried yet)."""
    return _tokens.failure
