"""The console's server-side sessions, in Redis with a time to live.

Logging in checks the API key once, through the API's own path (``Ledger.authenticate``: the
keyed hash in the event store), and keeps only who it names (key id, role, merchant). The cookie
holds a random session id; Redis keeps the session under a hash of that id, so not even a copy
of Redis gives anyone a cookie. Each session has its own CSRF token (the synchronizer pattern):
every form carries it and every POST is checked against it. A revoked key's sessions end with it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any
from uuid import UUID

SESSION_TTL_S = 8 * 3600
COOKIE_NAME = "et_console"
LOGIN_COOKIE_NAME = "et_console_login"  # the login form's own CSRF token (double submit): no session yet
_PREFIX = "console:session:"
_BY_KEY = "console:key-sessions:"


@dataclass(frozen=True)
class ConsoleSession:
    session_hash: str
    key_id: UUID
    role: str
    merchant_id: UUID | None
    csrf: str
    label: str

    def csrf_ok(self, sent: str) -> bool:
        return bool(sent) and hmac.compare_digest(sent.encode(), self.csrf.encode())


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class SessionStore:
    """Sessions in Redis (``client``: a redis.Redis), each living ``ttl_s`` from login."""

    def __init__(self, client: Any, ttl_s: int = SESSION_TTL_S) -> None:
        self.client = client
        self.ttl_s = ttl_s

    def create(self, key_id: UUID, role: str, merchant_id: UUID | None, label: str = "") -> tuple[str, ConsoleSession]:
        """A new session: (the id for the cookie, the session)."""
        session_id = secrets.token_urlsafe(32)
        session = ConsoleSession(_hash(session_id), key_id, role, merchant_id, secrets.token_urlsafe(32), label)
        record = {"key_id": str(key_id), "role": role, "merchant_id": str(merchant_id) if merchant_id else None,
                  "csrf": session.csrf, "label": label}
        pipe = self.client.pipeline()
        pipe.set(_PREFIX + session.session_hash, json.dumps(record), ex=self.ttl_s)
        pipe.sadd(_BY_KEY + str(key_id), session.session_hash)
        pipe.expire(_BY_KEY + str(key_id), self.ttl_s)
        pipe.execute()
        return session_id, session

    def get(self, session_id: str | None) -> ConsoleSession | None:
        if not session_id or len(session_id) > 100:
            return None
        session_hash = _hash(session_id)
        raw = self.client.get(_PREFIX + session_hash)
        if raw is None:
            return None
        record = json.loads(raw)
        return ConsoleSession(session_hash, UUID(record["key_id"]), record["role"],
                              UUID(record["merchant_id"]) if record["merchant_id"] else None, record["csrf"],
                              record.get("label", ""))

    def delete(self, session: ConsoleSession) -> None:
        pipe = self.client.pipeline()
        pipe.delete(_PREFIX + session.session_hash)
        pipe.srem(_BY_KEY + str(session.key_id), session.session_hash)
        pipe.execute()

    def end_sessions_of_key(self, key_id: UUID) -> int:
        """End every session opened with this key (it was revoked)."""
        hashes = self.client.smembers(_BY_KEY + str(key_id))
        names = [_PREFIX + (h.decode() if isinstance(h, bytes) else h) for h in hashes]
        pipe = self.client.pipeline()
        for name in names:
            pipe.delete(name)
        pipe.delete(_BY_KEY + str(key_id))
        pipe.execute()
        return len(names)
