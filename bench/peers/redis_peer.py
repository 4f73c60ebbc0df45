"""Redis, the naive choice: blocks as values, redis-py with hiredis, pipelined."""

from __future__ import annotations

import torch

from bench.peers import PeerUnavailable
from bench.procs import RedisServer
from kvstore.keys import Namespace, block_keys, leading
from kvstore.units import parse_size


class RedisPeer:
    name = "redis"

    def __init__(self) -> None:
        try:
            import redis
        except ImportError as e:  # a dependency of kvstore: only a broken install lacks it
            raise PeerUnavailable(f"redis-py is not installed ({e})") from e
        try:
            self.server = RedisServer()
        except RuntimeError as e:
            raise PeerUnavailable(str(e)) from e
        self.client = redis.Redis(port=self.server.port, host="127.0.0.1")
        # one 64 MiB value fits; a pipeline's replies stay under the client output limit
        self.client.config_set("proto-max-bulk-len", parse_size("1GiB"))
        self.client.config_set("client-output-buffer-limit", "normal 0 0 0")

    def buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def put(self, keys: list[bytes], src: torch.Tensor, size: int) -> None:
        view = src.numpy().data
        pipe = self.client.pipeline(transaction=False)
        for i, k in enumerate(keys):
            pipe.set(k, view[i * size : (i + 1) * size])
        if not all(pipe.execute()):
            raise RuntimeError("redis SET failed")

    def get(self, keys: list[bytes], dst: torch.Tensor, size: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
        out = dst.numpy()
        for i, value in enumerate(pipe.execute()):
            if value is None or len(value) != size:
                raise KeyError(
                    f"redis GET of block {i} returned {None if value is None else len(value)}"
                )
            out[i * size : (i + 1) * size] = memoryview(value)

    def prefix_hits(self, tokens: list[int], ns: Namespace, size: int) -> int:
        keys = block_keys(ns, tokens)
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(k)
        return leading(pipe.execute())

    def delete(self, keys: list[bytes], size: int) -> None:
        for i in range(0, len(keys), 1024):
            self.client.delete(*keys[i : i + 1024])

    def close(self) -> None:
        self.client.close()
        self.server.close()
