"""kvstore itself: the embedded store, or a ``kvstore serve`` node over one
transfer backend, through the client's block-level API."""

from __future__ import annotations

import subprocess

import torch

from bench.procs import start_serve
from client import Client, KVLayout, Namespace, StoreConfig


def object_layout(size: int) -> KVLayout:
    """A layout whose block is ``size`` opaque bytes (16 rows of size/16)."""
    return KVLayout(
        num_layers=1, num_kv_heads=1, head_dim=size // 16, block_size=16, dtype="uint8", kv_factor=1
    )


NAMESPACE_MODEL = "compare"  # every namespace of this peer is this model's


class KVStorePeer:
    def __init__(self, backend: str | None, capacity: str) -> None:
        """``backend`` None: the store embedded in this process."""
        self.name = f"kvstore {backend or 'embedded'}"
        self.proc: subprocess.Popen[str] | None = None
        ns = Namespace(NAMESPACE_MODEL, object_layout(16 * 1024))
        if backend is None:
            config = StoreConfig.load(overrides={"dram.capacity": capacity, "ssd.path": None})
            self.client = Client.local(config, namespace=ns)
        else:
            self.proc, summary = start_serve(
                "--ssd-path", "none", "--dram-capacity", capacity, "--transfer", backend
            )
            self.client = Client.connect(str(summary["url"]), namespace=ns)
        self._by_size: dict[int, Client] = {}

    def _client(self, size: int) -> Client:
        c = self._by_size.get(size)
        if c is None:
            c = self._by_size[size] = self.client.with_namespace(
                Namespace(NAMESPACE_MODEL, object_layout(size))
            )
        return c

    def buffer(self, nbytes: int) -> torch.Tensor:
        return self.client.alloc(nbytes)

    def put(self, keys: list[bytes], src: torch.Tensor, size: int) -> None:
        self._client(size).put_blocks(keys, list(src.view(len(keys), size)))

    def get(self, keys: list[bytes], dst: torch.Tensor, size: int) -> None:
        ok = self._client(size).get_blocks(keys, list(dst.view(len(keys), size)))
        if not all(ok):
            raise KeyError(f"{self.name}: {ok.count(False)} of {len(keys)} blocks missing")

    def prefix_hits(self, tokens: list[int], ns: Namespace, size: int) -> int:
        c = self._client(size)
        assert c.namespace == ns, "the lookup's blocks were put in another namespace"
        return c.lookup(tokens) // c.layout.block_size

    def delete(self, keys: list[bytes], size: int) -> None:
        self._client(size).delete(keys)

    def close(self) -> None:
        for c in self._by_size.values():
            c.close()
        self.client.close()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)
