"""Authentication (SPEC §6, §9.3): bearer API key, admin key for mutating routes, the loopback rule.

Checked by the edge middleware (:mod:`server.edge`) from the request line and headers alone, before any
byte of the body is read. With ``api_key`` set every route but /health, /ready and /metrics needs
``Authorization: Bearer <key>`` (the admin key works too) — /docs, /redoc and /openapi.json included;
the /playground page and its files are public (static, no data: the page sends the key the user types).
Mutating routes (POST, PUT, PATCH, DELETE under /v1/vectors and /v1/profiles) need ``admin_key``; with
none set they are served only when the server is bound to a loopback address (403 otherwise; ``--host ""``
binds every interface and is not loopback). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from typing import Literal

from .config import ServerConfig
from .errors import AuthError

__all__ = ["ADMIN_PREFIXES", "PUBLIC_PATHS", "Access", "access_of", "authorize", "is_loopback"]

Access = Literal["public", "api", "admin"]

#: Paths anyone may call: probes and scrapers.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})
#: The playground page and its static files: public, the page asks for the key and sends it itself.
PLAYGROUND = "/playground"
#: Path prefixes whose mutating methods need the admin key.
ADMIN_PREFIXES = ("/v1/vectors", "/v1/profiles")
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def access_of(method: str, path: str) -> Access:
    """Who may call ``method path``: anyone, holders of the API key, or holders of the admin key."""
    if path in PUBLIC_PATHS or path == PLAYGROUND or path.startswith(PLAYGROUND + "/"):
        return "public"
    if method in _MUTATING and any(path == p or path.startswith(p + "/") for p in ADMIN_PREFIXES):
        return "admin"
    return "api"


def _bearer(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _matches(token: str | None, key: str | None) -> bool:
    return token is not None and key is not None and hmac.compare_digest(token.encode(), key.encode())


def is_loopback(host: str) -> bool:
    """Whether ``host`` (the bind address) is loopback only; ``""`` means every interface (not loopback)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_api_key(config: ServerConfig, token: str | None) -> None:
    if config.api_key is None:
        return
    if token is None:
        raise AuthError(401, "missing API key: send Authorization: Bearer <key>")
    if not (_matches(token, config.api_key) or _matches(token, config.admin_key)):
        raise AuthError(401, "invalid API key")


def _check_admin(config: ServerConfig, token: str | None) -> None:
    admin = config.admin_key
    if admin is None:
        _check_api_key(config, token)
        if not is_loopback(config.host):
            raise AuthError(403, "mutating routes are disabled: set STEERSERVE_ADMIN_KEY or bind to loopback")
        return
    if token is None:
        raise AuthError(401, "missing admin key: send Authorization: Bearer <admin key>")
    if _matches(token, admin):
        return
    if _matches(token, config.api_key):
        raise AuthError(403, "this route needs the admin key")
    raise AuthError(401, "invalid admin key")


def authorize(config: ServerConfig, method: str, path: str, headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Raise :class:`AuthError` (401 or 403) unless the headers may call ``method path``."""
    access = access_of(method, path)
    if access == "public":
        return
    token = _bearer(headers)
    if access == "admin":
        _check_admin(config, token)
    else:
        _check_api_key(config, token)
