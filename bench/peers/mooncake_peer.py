"""Mooncake Store, from the PyPI package ``mooncake-transfer-engine-non-cuda``.

Three parts, as Mooncake deploys them: ``mooncake_master`` (with its HTTP
metadata server), a storage process that mounts the global segment (the
memory objects live in, like a ``kvstore serve`` node's DRAM pool), and this
process as a client that mounts none. The client moves registered buffers
with ``batch_put_from`` / ``batch_get_into`` over the TCP transport, the
fastest documented path on a host without RDMA.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.peers import PeerUnavailable
from bench.procs import free_port
from kvstore.keys import Namespace, block_keys, leading
from transfer.memory import alloc_anonymous

_ENV = {
    "MC_TE_FILTERS": "lo",  # keep the transfer engine on loopback
    "MC_TCP_BIND_ADDRESS": "127.0.0.1",
    "MC_LOG_LEVEL": "ERROR",
}
INSTALL = "pip install -e '.[peers]' (and apt-get install libibverbs1, which it links)"


def _store_class() -> Any:
    for k, v in _ENV.items():
        os.environ.setdefault(k, v)
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as e:
        raise PeerUnavailable(f"mooncake is not importable ({e}): {INSTALL}") from e
    return MooncakeDistributedStore


def _setup(store: Any, metadata: str, master: str, segment: int) -> None:
    rc = store.setup("127.0.0.1", metadata, segment, 64 << 20, "tcp", "", master)
    if rc != 0:
        raise PeerUnavailable(f"MooncakeDistributedStore.setup returned {rc}")


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerUnavailable(f"mooncake_master exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise PeerUnavailable(f"mooncake_master did not listen on {port}")


class MooncakePeer:
    name = "mooncake tcp"

    def __init__(self, capacity: int) -> None:
        cls = _store_class()
        import mooncake

        exe = Path(mooncake.__file__).parent / "mooncake_master"
        if not exe.exists():
            raise PeerUnavailable(f"{exe} is missing: {INSTALL}")
        rpc, http, metrics = free_port(), free_port(), free_port()
        self.metadata = f"http://127.0.0.1:{http}/metadata"
        self.master_addr = f"127.0.0.1:{rpc}"
        args = [f"-rpc_port={rpc}", "-rpc_address=127.0.0.1", "-enable_http_metadata_server=true"]
        args += ["-http_metadata_server_host=127.0.0.1", f"-http_metadata_server_port={http}"]
        args += ["-metrics_host=127.0.0.1", f"-metrics_port={metrics}"]
        env = {**os.environ, **_ENV}
        self.master = subprocess.Popen([str(exe), *args], env=env, stderr=subprocess.DEVNULL)
        self.server: subprocess.Popen[bytes] | None = None
        self.store: Any = None
        self._buffers: list[torch.Tensor] = []
        try:
            _wait_port(rpc, self.master)
            _wait_port(http, self.master)
            cmd = [sys.executable, "-m", "bench.peers.mooncake_peer", self.metadata]
            cmd += [self.master_addr, str(capacity)]
            self.server = subprocess.Popen(
                cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            assert self.server.stdout is not None
            if self.server.stdout.readline().strip() != b"ready":
                raise PeerUnavailable("the Mooncake storage process did not start")
            self.store = cls()
            _setup(self.store, self.metadata, self.master_addr, 0)
        except BaseException:
            self.close()
            raise

    def buffer(self, nbytes: int) -> torch.Tensor:
        t = torch.from_numpy(alloc_anonymous(nbytes))
        if self.store.register_buffer(t.data_ptr(), nbytes) != 0:
            raise RuntimeError("mooncake register_buffer failed")
        self._buffers.append(t)
        return t

    def put(self, keys: list[bytes], src: torch.Tensor, size: int) -> None:
        base = src.data_ptr()
        ptrs = [base + i * size for i in range(len(keys))]
        rcs = self.store.batch_put_from([k.hex() for k in keys], ptrs, [size] * len(keys))
        bad = [rc for rc in rcs if rc != 0]
        if bad:
            raise RuntimeError(f"mooncake batch_put_from: {len(bad)} failed (first {bad[0]})")

    def get(self, keys: list[bytes], dst: torch.Tensor, size: int) -> None:
        base = dst.data_ptr()
        ptrs = [base + i * size for i in range(len(keys))]
        got = self.store.batch_get_into([k.hex() for k in keys], ptrs, [size] * len(keys))
        bad = [n for n in got if n != size]
        if bad:
            raise KeyError(f"mooncake batch_get_into: {len(bad)} not read (first {bad[0]})")

    def prefix_hits(self, tokens: list[int], ns: Namespace, size: int) -> int:
        keys = block_keys(ns, tokens)
        return leading(hit == 1 for hit in self.store.batch_is_exist([k.hex() for k in keys]))

    def delete(self, keys: list[bytes], size: int) -> None:
        self.store.batch_remove([k.hex() for k in keys], True)  # force: past read leases

    def close(self) -> None:
        if self.store is not None:
            for t in self._buffers:
                self.store.unregister_buffer(t.data_ptr())
            self.store.close()
            self.store = None
        for proc in (self.server, self.master):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def serve(metadata: str, master: str, capacity: int) -> None:
    """The storage process: mount ``capacity`` bytes of global segment and
    hold it until stdin closes."""
    store = _store_class()()
    _setup(store, metadata, master, capacity)
    print("ready", flush=True)
    sys.stdin.read()
    store.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="the Mooncake storage process of bench.compare")
    p.add_argument("metadata")
    p.add_argument("master")
    p.add_argument("capacity", type=int)
    a = p.parse_args()
    serve(a.metadata, a.master, a.capacity)
