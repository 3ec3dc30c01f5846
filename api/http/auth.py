"""Who is calling: ``Authorization: Bearer <key>`` to a principal (role and merchant), with a
rate limit per key. Keys are checked against their keyed hash in the event store; a short
in-process cache saves that read on every request (a revoked key stops working within
``CACHE_TTL_S``)."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from litestar import Request

from api.http.problems import ApiProblem
from api.http.services import ApiServices

CACHE_TTL_S = 30.0


@dataclass(frozen=True)
class Principal:
    key_id: UUID
    role: str
    merchant_id: UUID | None

    @property
    def idempotency_scope(self) -> str:
        return f"merchant:{self.merchant_id}" if self.merchant_id else f"key:{self.key_id}"


class KeyCache:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def peek(self, token: str) -> tuple[bool, Principal | None]:
        """(whether the cache knows this key now, its principal or None for a refused key)."""
        with self._lock:
            hit = self._entries.get(self._digest(token))
        if hit and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def get(self, token: str, load: Any) -> Principal | None:
        known, principal = self.peek(token)
        if known:
            return principal
        key = load(token)
        principal = Principal(key.id, key.role, key.merchant_id) if key is not None else None
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[self._digest(token)] = (time.monotonic() + CACHE_TTL_S, principal)
        return principal

    @staticmethod
    def _digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()


_cache = KeyCache()


def _token(request: Request[Any, Any, Any]) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiProblem(401, "unauthorized", "send your API key as 'Authorization: Bearer <key>'",
                         headers={"WWW-Authenticate": 'Bearer realm="echotransact"'})
    return token.strip()


def _admit(request: Request[Any, Any, Any], services: ApiServices, principal: Principal | None) -> Principal:
    if principal is None:
        raise ApiProblem(401, "unauthorized", "the API key is not valid or was revoked",
                         headers={"WWW-Authenticate": 'Bearer realm="echotransact", error="invalid_token"'})
    decision = services.rate_limiter.hit(str(principal.key_id))
    if not decision.allowed:
        raise ApiProblem(429, "rate_limited", "too many requests for this key; slow down",
                         headers={"Retry-After": str(decision.retry_after_s)})
    request.state.principal = principal
    return principal


def authenticate(request: Request[Any, Any, Any], services: ApiServices) -> Principal:
    """Blocking: may read the key from the event store and count the request in Redis."""
    return _admit(request, services, _cache.get(_token(request), services.ledger.authenticate))


def authenticate_at_once(request: Request[Any, Any, Any], services: ApiServices) -> bool:
    """Authenticate without waiting on anything (on the event loop, no thread hand-off) when
    that is possible: a key the cache knows, and no rate limit to count in Redis. False when
    ``authenticate`` has to run instead."""
    if services.rate_limiter.counts:
        return False
    known, principal = _cache.peek(_token(request))
    if not known:
        return False
    _admit(request, services, principal)
    return True


def require(principal: Principal, *roles: str) -> None:
    if principal.role not in roles:
        raise ApiProblem(403, "forbidden", f"this needs a {' or '.join(roles)} key; yours is {principal.role}")


def merchant_scope(principal: Principal) -> UUID:
    """The merchant a merchant key acts for (merchant-only endpoints)."""
    require(principal, "merchant")
    assert principal.merchant_id is not None
    return principal.merchant_id
