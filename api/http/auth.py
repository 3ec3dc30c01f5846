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

    def get(self, token: str, load: Any) -> Principal | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(digest)
        if hit and hit[0] > now:
            return hit[1]
        key = load(token)
        principal = Principal(key.id, key.role, key.merchant_id) if key is not None else None
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[digest] = (now + CACHE_TTL_S, principal)
        return principal


_cache = KeyCache()


def authenticate(request: Request[Any, Any, Any], services: ApiServices) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiProblem(401, "unauthorized", "send your API key as 'Authorization: Bearer <key>'",
                         headers={"WWW-Authenticate": 'Bearer realm="echotransact"'})
    principal = _cache.get(token.strip(), services.ledger.authenticate)
    if principal is None:
        raise ApiProblem(401, "unauthorized", "the API key is not valid or was revoked",
                         headers={"WWW-Authenticate": 'Bearer realm="echotransact", error="invalid_token"'})
    decision = services.rate_limiter.hit(str(principal.key_id))
    if not decision.allowed:
        raise ApiProblem(429, "rate_limited", "too many requests for this key; slow down",
                         headers={"Retry-After": str(decision.retry_after_s)})
    request.state.principal = principal
    return principal


def require(principal: Principal, *roles: str) -> None:
    if principal.role not in roles:
        raise ApiProblem(403, "forbidden", f"this needs a {' or '.join(roles)} key; yours is {principal.role}")


def merchant_scope(principal: Principal) -> UUID:
    """The merchant a merchant key acts for (merchant-only endpoints)."""
    require(principal, "merchant")
    assert principal.merchant_id is not None
    return principal.merchant_id
