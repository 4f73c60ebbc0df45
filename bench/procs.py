"""Real processes for benchmarks and tests: a ``redis-server`` on a free
loopback port, and ``kvstore serve`` nodes."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throw-away ``redis-server`` (no persistence) that can be stopped and
    started again on the same port, as an outage would look to clients."""

    def __init__(
        self, port: int | None = None, *, start: bool = True, host: str = "127.0.0.1"
    ) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(
                "redis-server is not installed: apt-get install redis-server "
                "(bash .ci/setup does it)"
            )
        self.exe = exe
        self.host = host  # a test network namespace's address, or loopback
        self.port = port or free_port()
        self.dir = tempfile.TemporaryDirectory(prefix="kvstore-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        cmd = [self.exe, "--port", str(self.port), "--bind", self.host, "--save", ""]
        cmd += ["--appendonly", "no", "--dir", self.dir.name, "--loglevel", "warning"]
        if self.host != "127.0.0.1":  # a test namespace's private link: no password needed
            cmd += ["--protected-mode", "no"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()  # a server that never answered is not left running
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        self.dir.cleanup()


@contextmanager
def redis_server(port: int | None = None, *, start: bool = True) -> Iterator[RedisServer]:
    server = RedisServer(port, start=start)
    try:
        yield server
    finally:
        server.close()


def serve_cmd(*flags: str) -> list[str]:
    """``kvstore serve`` on a free port, printing its start-up summary as JSON."""
    return [sys.executable, "-m", "kvstore", "serve", "--json", "--port", "0", *flags]


def start_serve(
    *flags: str,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    stderr: int | None = None,
) -> tuple[subprocess.Popen[str], dict[str, object]]:
    """A ``kvstore serve`` subprocess with ``flags``, once it is up, and its
    start-up summary (url, node, transfer endpoint, ...). ``prefix`` runs it
    under another command (``ip netns exec NS``); ``env`` is its whole
    environment when given."""
    proc = subprocess.Popen(
        [*prefix, *serve_cmd(*flags)], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
    )
    try:
        return proc, read_summary(proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def read_summary(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        err = proc.communicate(timeout=30)[1] if proc.stderr is not None else ""
        raise RuntimeError(f"kvstore serve did not start: {err}")
    return dict(json.loads(line))
