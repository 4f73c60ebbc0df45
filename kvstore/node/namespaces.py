"""The namespaces a node has been asked to serve, by id, kept across restarts.

Blocks on SSD carry only a 32-bit namespace tag; the registry remembers what
each id means (model, layout, tenant) so a restarted node still knows whose
blocks it holds, can check payload sizes, and can list names to operators.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from kvstore.errors import KVStoreError, NotFoundError, StorageError
from kvstore.keys import Namespace
from kvstore.proto import kvstore_pb2 as pb
from kvstore.wire import namespace_from_spec, namespace_spec

FILE_NAME = "namespaces.json"


class NamespaceRegistry:
    """Thread-safe; persisted (atomically rewritten) to ``path`` when given."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._by_id: dict[bytes, Namespace] = {}
        if path is not None and os.path.lexists(path):
            for ns in _load(path):
                self._by_id[ns.root] = ns

    def open(self, ns: Namespace) -> bool:
        """Record ``ns``; True if it was new."""
        with self._lock:
            if ns.root in self._by_id:
                return False
            self._by_id[ns.root] = ns
            self._save()
            return True

    def get(self, namespace_id: bytes) -> Namespace:
        ns = self._by_id.get(namespace_id)
        if ns is None:
            raise NotFoundError(
                f"unknown namespace {namespace_id.hex()[:32] or '(empty id)'}: "
                "call OpenNamespace (Client.connect does) first"
            )
        return ns

    def all(self) -> list[Namespace]:
        with self._lock:
            return list(self._by_id.values())

    def _save(self) -> None:
        if self.path is None:
            return
        specs = []
        for ns in self._by_id.values():
            msg = namespace_spec(ns)
            specs.append({"model": msg.model, "tenant": msg.tenant, "layout_json": msg.layout_json})
        tmp = self.path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)  # never write through a link left there
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(specs, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _load(path: Path) -> list[Namespace]:
    """The namespaces saved in ``path``; a damaged file is an error that names it."""
    hint = "move it aside to start with no namespaces (clients reopen theirs)"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            text = f.read()
    except OSError as e:
        raise StorageError(path, f"cannot read: {e.strerror} (a link is never followed)") from None
    try:
        specs = json.loads(text)
        if not isinstance(specs, list):
            raise TypeError("not a JSON list")
        return [namespace_from_spec(pb.NamespaceSpec(**spec)) for spec in specs]
    except (ValueError, TypeError, KVStoreError) as e:
        raise StorageError(path, f"is damaged ({e}); {hint}") from None
