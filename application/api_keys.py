"""Use cases of API keys: issue one (its secret shown once), revoke it, and authenticate a request
by its key (only a keyed hash of the secret is ever recorded)."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from application.errors import NotFound
from application.unit_of_work import CommandResult, LedgerBase
from domain.api_key import ApiKey

API_KEY_PREFIX = "et"


class ApiKeyCommands(LedgerBase):
    def issue_api_key(
        self, command_id: str, *, role: str, merchant_id: UUID | None = None, label: str = ""
    ) -> tuple[CommandResult, str]:
        """Issue a key; returns the result and the key itself, which is never stored and so is
        shown only by this call (a replay of the same command returns an empty key)."""
        key_id = self._derived_id(command_id, "api_key")
        secret = secrets.token_urlsafe(32)

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            if merchant_id is not None:
                merchant = self.get_merchant(merchant_id)
                if not merchant.active:
                    raise NotFound(f"no merchant {merchant_id}")
            key = ApiKey.issue(
                key_id, role=role, merchant_id=merchant_id,
                key_hash=self.keyed_hash("api_key", key_id, secret), label=label,
            )
            return [key], {"key_id": str(key_id), "role": role,
                           "merchant_id": str(merchant_id) if merchant_id else None}

        request = {"role": role, "merchant_id": str(merchant_id) if merchant_id else None, "label": label}
        result = self._execute(command_id, "issue_api_key", request, key_id, decide)
        token = "" if result.replayed else f"{API_KEY_PREFIX}_{key_id.hex}_{secret}"
        return result, token

    def revoke_api_key(self, command_id: str, key_id: UUID, *, reason: str) -> CommandResult:
        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            key = self._get(ApiKey, key_id)
            key.revoke(reason)
            return [key], {"key_id": str(key_id), "revoked": True}

        return self._execute(command_id, "revoke_api_key", {"key_id": str(key_id), "reason": reason},
                             key_id, decide)

    def authenticate(self, token: str) -> ApiKey | None:
        """The live key this token names, or None (malformed, unknown, revoked or wrong secret)."""
        prefix, _, rest = token.partition("_")
        key_hex, _, secret = rest.partition("_")
        if prefix != API_KEY_PREFIX or len(key_hex) != 32 or not secret:
            return None
        try:
            key_id = UUID(hex=key_hex)
        except ValueError:
            return None
        key = self.live_api_key(key_id)
        if key is None or not hmac.compare_digest(key.key_hash, self.keyed_hash("api_key", key_id, secret)):
            return None
        return key

    def live_api_key(self, key_id: UUID) -> ApiKey | None:
        """The key if it exists and is not revoked: the check of every authentication, also
        asked on each request of a console session made from the key (which holds no secret)."""
        try:
            key = self._get(ApiKey, key_id)
        except NotFound:
            return None
        return None if key.revoked else key
