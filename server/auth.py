"""Authentication (SPEC §6): bearer API key, admin key for mutating routes, the loopback rule.

With ``api_key`` set every route but /health, /ready and /metrics needs ``Authorization: Bearer <key>``
(the admin key works too). Mutating routes need ``admin_key``; with none set they are served only when
the server is bound to a loopback address (403 otherwise). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request

from .config import ServerConfig
from .errors import AuthError

__all__ = ["check_admin", "check_api_key", "is_loopback"]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, key: str | None) -> bool:
    return token is not None and key is not None and hmac.compare_digest(token.encode(), key.encode())


def is_loopback(host: str) -> bool:
    """Whether ``host`` (the bind address) is loopback only."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_key(config: ServerConfig, request: Request) -> None:
    """Raise :class:`AuthError` (401) unless the request carries the API key (or the admin key)."""
    key = config.api_key
    if key is None:
        return
    token = _bearer(request)
    if token is None:
        raise AuthError(401, "missing API key: send Authorization: Bearer <key>")
    if not (_matches(token, key) or _matches(token, config.admin_key)):
        raise AuthError(401, "invalid API key")


def check_admin(config: ServerConfig, request: Request) -> None:
    """Raise :class:`AuthError` (401 or 403) unless the request may use a mutating route."""
    admin = config.admin_key
    if admin is None:
        check_api_key(config, request)
        if not is_loopback(config.host):
            raise AuthError(403, "mutating routes are disabled: set STEERSERVE_ADMIN_KEY or bind to loopback")
        return
    token = _bearer(request)
    if token is None:
        raise AuthError(401, "missing admin key: send Authorization: Bearer <admin key>")
    if _matches(token, admin):
        return
    if _matches(token, config.api_key):
        raise AuthError(403, "this route needs the admin key")
    raise AuthError(401, "invalid admin key")
