"""Build and load the copy extension (JIT, cached on disk).

``torch.utils.cpp_extension.load`` compiles ``csrc/`` the first time (about a
minute; ``.ci/setup`` does it, so the first request never waits) and later
loads the cached library in milliseconds. The CUDA kernels are compiled only
where torch has CUDA and nvcc is found. Where nothing can be built the
loader warns once and ``native`` uses its pure-torch reference instead.

Environment: ``KVSTORE_NATIVE=0`` skips the extension (reference only);
``KVSTORE_NATIVE_CUDA=0`` builds it without CUDA kernels;
``KVSTORE_NATIVE_CACHE`` is the build directory (default
``~/.cache/kvstore/native``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("copy_blocks.cpp", "copy_blocks_cuda.cu")
FLAGS = ["-O3"]  # torch adds the C++ standard its headers need

_lock = threading.Lock()
_loaded: ModuleType | None = None
_failure: str | None = None


def _cuda_wanted() -> bool:
    if os.environ.get("KVSTORE_NATIVE_CUDA", "1") == "0" or torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def cache_dir(with_cuda: bool) -> Path:
    """Build directory for this source tree, torch build and Python: a change
    to any of them builds afresh instead of loading a stale library."""
    h = hashlib.sha256()
    for name in (*SOURCES, "copy_blocks.h"):
        h.update((CSRC / name).read_bytes())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{with_cuda}|{FLAGS}".encode())
    root = Path(os.environ.get("KVSTORE_NATIVE_CACHE", Path.home() / ".cache/kvstore/native"))
    return root / h.hexdigest()[:16]


def _staged_sources(build_dir: Path) -> Path:
    """The sources copied into the build directory and compiled from there:
    the build's command lines then name no checkout, so two checkouts of the
    same source share one build instead of rebuilding each other's."""
    src = build_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name in (*SOURCES, "copy_blocks.h"):
        data = (CSRC / name).read_bytes()
        dst = src / name
        if not dst.exists() or dst.read_bytes() != data:  # rewritten only when it changed
            tmp = dst.with_suffix(dst.suffix + f".{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(dst)
    return src


def build(*, verbose: bool = False) -> ModuleType:
    """Compile (or load the cached) extension; raises when it cannot be built."""
    from torch.utils.cpp_extension import load

    with_cuda = _cuda_wanted()
    if shutil.which("ninja") is None:  # the ninja wheel installs next to this Python
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    build_dir = cache_dir(with_cuda)
    src = _staged_sources(build_dir)
    if not (build_dir / "kvstore_copy_blocks.so").exists():
        print(
            f"kvstore: compiling the native copy extension into {build_dir} (once per "
            "source change; about a minute)",
            file=sys.stderr,
            flush=True,
        )
    sources = [str(src / SOURCES[0])]
    flags = list(FLAGS)
    if with_cuda:
        sources.append(str(src / SOURCES[1]))
        flags.append("-DKVSTORE_WITH_CUDA")
    module: ModuleType = load(
        name="kvstore_copy_blocks",
        sources=sources,
        extra_cflags=flags,
        extra_cuda_cflags=[*flags, "-lineinfo"],
        extra_include_paths=[str(src)],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        verbose=verbose,
    )
    return module


def extension() -> ModuleType | None:
    """The loaded extension, or None (after one warning) where it cannot be built."""
    global _loaded, _failure
    if _loaded is not None or _failure is not None:
        return _loaded
    with _lock:
        if _loaded is None and _failure is None:
            if os.environ.get("KVSTORE_NATIVE", "1") == "0":
                _failure = "disabled by KVSTORE_NATIVE=0"
                return None
            try:
                _loaded = build()
            except Exception as e:  # a compiler error, a missing toolchain: use the reference
                last = (str(e).strip().splitlines() or [""])[-1]
                _failure = f"{type(e).__name__}: {last}"
                warnings.warn(
                    "kvstore: the native copy extension could not be built "
                    f"({_failure}); gather/scatter fall back to the pure-torch reference, "
                    "several times slower. Run 'python -m native -v' to see the build log.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _loaded


def failure() -> str | None:
    """Why the extension is not loaded (None when it is, or was not tried yet)."""
    return _failure
