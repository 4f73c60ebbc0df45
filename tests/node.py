"""Start ``kvstore serve`` as a real subprocess on a free port, for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import start_serve


@dataclass
class NodeProcess:
    proc: subprocess.Popen[str]
    summary: dict[str, Any]

    @property
    def url(self) -> str:
        return str(self.summary["url"])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # the node dumps every thread's stack
            time.sleep(1)
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"node did not stop in {timeout} s:\n{err[-8000:]}") from None
        return self.proc.returncode, err


def start_node(
    ssd: Path | None,
    *flags: str,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> NodeProcess:
    """``prefix`` runs the node under another command (``ip netns exec NS``)."""
    proc, summary = start_serve(
        "--dram-capacity", "64MiB", "--ssd-path", str(ssd) if ssd else "none", *flags,
        env={**os.environ, **(env or {})},
        prefix=prefix,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    return NodeProcess(proc, summary)


@contextmanager
def running_node(
    ssd: Path | None, *flags: str, env: dict[str, str] | None = None
) -> Iterator[NodeProcess]:
    node = start_node(ssd, *flags, env=env)
    try:
        yield node
    finally:
        if node.proc.poll() is None:
            rc, err = node.stop()
            assert rc == 0, err
