"""API keys: ``--api-key`` keys may use every adapter, ``--tenant-key KEY=a,b`` keys
only the base and the adapters listed (others answer 404, so their existence does not
leak), ``--admin-key`` also loads and unloads adapters. With no inference key set,
inference is open; with no admin key set, loading and unloading are off."""
from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from .errors import APIError

ALL = None  # the scope of a key that may use every adapter


@dataclass
class Keys:
    api_keys: list[str] = field(default_factory=list)
    tenants: dict[str, frozenset] = field(default_factory=dict)
    admin_key: str | None = None

    @property
    def open(self) -> bool:
        return not self.api_keys and not self.tenants

    def scope(self, authorization: str | None):
        """The adapters the caller may use (ALL or a set); 401 without a valid key."""
        token = _bearer(authorization)
        if self.admin_key and token is not None and _same(token, self.admin_key):
            return ALL
        if self.open:
            return ALL
        if token is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        for key in self.api_keys:
            if _same(token, key):
                return ALL
        for key, adapters in self.tenants.items():
            if _same(token, key):
                return adapters
        raise APIError(401, "invalid API key", code="invalid_api_key")

    def admin(self, authorization: str | None) -> None:
        if not self.admin_key:
            raise APIError(401, "loading and unloading adapters is off: start the server with --admin-key",
                           code="invalid_api_key")
        token = _bearer(authorization)
        if token is None or not _same(token, self.admin_key):
            raise APIError(401, "loading and unloading adapters needs the admin key", code="invalid_api_key")


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    kind, _, token = authorization.partition(" ")
    return token.strip() if kind.lower() == "bearer" and token.strip() else None


def _same(a: str, b: str) -> bool:  # constant time; bytes, so any header text compares
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))
