"""Who may call the node, and which tenants' namespaces each caller may touch."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from kvstore.config import ServerConfig
from kvstore.errors import AuthError, PermissionDeniedError
from kvstore.keys import Namespace
from kvstore.wire import AUTH_HEADER

ALL_TENANTS = None  # what ``tenants_of`` returns for an unrestricted caller
Tenants = frozenset[str] | None


class Authorizer:
    def __init__(self, config: ServerConfig) -> None:
        self._admin = config.token
        self._tenant_tokens = dict(config.tenant_tokens)
        self._open = not config.secured

    def tenants_of(self, metadata: Iterable[tuple[str, str | bytes]]) -> Tenants:
        """The tenants a call may use, from its ``authorization`` header."""
        if self._open:
            return ALL_TENANTS
        token = ""
        for k, v in metadata:
            if k == AUTH_HEADER:
                value = v.decode() if isinstance(v, bytes) else v
                token = value.removeprefix("Bearer ").strip()
        if not token:
            raise AuthError("this node needs a token: pass token= or set KVSTORE_TOKEN")
        if self._admin and hmac.compare_digest(token, self._admin):
            return ALL_TENANTS
        granted = frozenset(
            tenant for tenant, tok in self._tenant_tokens.items() if hmac.compare_digest(token, tok)
        )
        if not granted:
            raise AuthError("wrong token")
        return granted

    @staticmethod
    def check(tenants: Tenants, ns: Namespace) -> None:
        if tenants is not ALL_TENANTS and ns.tenant not in tenants:
            raise PermissionDeniedError(
                f"this token does not grant tenant {ns.tenant!r} (namespace {ns.name})"
            )
