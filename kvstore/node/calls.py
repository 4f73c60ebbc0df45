"""What a node's service counts of its calls: per method, failures per gRPC
code, latency and payload bytes per transfer backend (the last two only with
``metrics.enabled``)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from kvstore.node.metrics import Histogram


class CallCounts:
    """Thread-safe: every gRPC worker thread counts here."""

    def __init__(self, *, detail: bool) -> None:
        self.detail = detail
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._errors: Counter[tuple[str, str]] = Counter()  # (method, gRPC code)
        self._latency: dict[str, Histogram] = {}
        self._moved: dict[str, Counter[str]] = {"in": Counter(), "out": Counter()}

    def call(self, method: str) -> None:
        with self._lock:
            self._calls[method] += 1

    def failed(self, method: str, code: str) -> None:
        with self._lock:
            self._errors[method, code] += 1

    def observe(self, method: str, seconds: float) -> None:
        """A call's latency."""
        if self.detail:
            with self._lock:
                self._latency.setdefault(method, Histogram()).observe(seconds)

    def moved(self, direction: str, via: str, nbytes: int) -> None:
        """Payload bytes in or out, per transfer backend ("grpc": inline)."""
        if self.detail and nbytes:
            with self._lock:
                self._moved[direction][via] += nbytes

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": dict(self._calls),
                "errors": _per_code(self._errors),
                "errors_by_method": _per_method(self._errors),
                "latency": {m: h.as_dict() for m, h in self._latency.items()},
                "transfer_bytes": {d: dict(c) for d, c in self._moved.items()},
            }


def _per_code(errors: Counter[tuple[str, str]]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for (_, code), n in errors.items():
        out[code] += n
    return dict(out)


def _per_method(errors: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (method, code), n in errors.items():
        out.setdefault(method, {})[code] = n
    return out
