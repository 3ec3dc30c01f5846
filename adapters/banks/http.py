"""The Bank port over HTTP (adapters/dev/bank_server.py speaks the same API): one POST
/v1/transfers per call, with the payout's key as the ``Idempotency-Key``.

Why each answer is handled the way it is (never retried here: the payout loop sends the same key
again in its next round, application/payouts.py):

- 2xx: paid; the bank's ``transfer_id`` is the reference. A 2xx without one is BankUnavailable,
  never a rejection: the money may have moved, and only the same key sent again may say so.
- Timeout, a refused or dropped connection, 5xx, 408, 425, 429: BankUnavailable. The outcome is
  unknown (a timed-out transfer may be paid), so the caller sends the same key again later.
- 401, 403, 404, 405 and redirects: BankUnavailable too. The bank did not consider the transfer
  (our URL or credentials are wrong); the payout waits for the configuration to be fixed instead
  of failing for a reason that is not the merchant's.
- 409 idempotency_key_reused, 400 idempotency_key_required: BankProtocolError (a RuntimeError):
  we never send a transfer without a key, nor reuse a key for another transfer; a bug to fix.
- 422 and the other 4xx (400 invalid_request included): BankTransferRejected with the bank's
  code and message; the bank refused this transfer for good and moved no money.

Nothing is logged here; the errors carry the key, the HTTP status and the bank's own code and
message (cut short), never the request's body.
"""

from __future__ import annotations

from typing import Any, Self

import httpx

from application.errors import BankTransferRejected, BankUnavailable
from application.ports import BankTransfer

# The bank cannot answer now; the same key later will.
RETRYABLE_STATUSES = frozenset({408, 425, 429})
# The bank never considered the transfer: our configuration is wrong, not the transfer.
NOT_CONSIDERED_STATUSES = frozenset({401, 403, 404, 405})
# Codes that say our request broke the idempotency contract: a bug on our side.
PROTOCOL_ERROR_CODES = frozenset({"idempotency_key_reused", "idempotency_key_required"})
MAX_MESSAGE_CHARS = 200


class BankProtocolError(RuntimeError):
    """The bank refused the request itself (a key reused for another transfer, or missing): a
    programming error, so it is raised rather than retried or recorded as a refusal."""

    def __init__(self, message: str, *, status_code: int, error_code: str = "") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_code = error_code


class HttpBank:
    """The platform's bank over HTTP. Thread-safe (httpx.Client is)."""

    def __init__(self, base_url: str, *, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(timeout=timeout_s, follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def transfer(
        self, *, key: str, merchant_id: str, amount_minor: int, currency: str, description: str
    ) -> BankTransfer:
        body = {"merchant_id": merchant_id, "amount_minor": amount_minor, "currency": currency,
                "description": description}
        try:
            response = self._client.post(f"{self.base_url}/v1/transfers", json=body,
                                         headers={"Idempotency-Key": key})
        except httpx.TimeoutException:
            raise BankUnavailable(f"the bank did not answer transfer {key!r} in time; its outcome is unknown "
                                  "until the same key is sent again") from None
        except httpx.HTTPError as error:
            raise BankUnavailable(f"the bank could not be asked for transfer {key!r}: "
                                  f"{type(error).__name__}") from None
        status = response.status_code
        if response.is_success:
            reference = _answer(response).get("transfer_id")
            if not isinstance(reference, str) or not reference:
                raise BankUnavailable(f"the bank answered {status} for transfer {key!r} without a transfer_id; "
                                      "its outcome is unknown until the same key is sent again")
            return BankTransfer(reference=reference)
        code, message = _error(response)
        why = ": ".join(part for part in (code, message) if part) or httpx.codes.get_reason_phrase(status)
        said = f"{status} {why}"
        if status >= 500 or status in RETRYABLE_STATUSES:
            raise BankUnavailable(f"the bank answered {said} for transfer {key!r}; send it again later")
        if status in NOT_CONSIDERED_STATUSES or response.is_redirect:
            raise BankUnavailable(f"the bank answered {said} for transfer {key!r}: check the bank's URL and "
                                  "credentials")
        if status == 409 or code in PROTOCOL_ERROR_CODES:
            raise BankProtocolError(f"the bank refused transfer {key!r} as a request: {said}",
                                    status_code=status, error_code=code)
        raise BankTransferRejected(f"the bank refused the transfer: {why}",
                                   status_code=status, error_code=code)


def _answer(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error(response: httpx.Response) -> tuple[str, str]:
    """The bank's error code and message, cut short; empty when it sent none."""
    body = _answer(response)
    code, message = body.get("error"), body.get("message")
    return (code[:MAX_MESSAGE_CHARS] if isinstance(code, str) else "",
            message[:MAX_MESSAGE_CHARS] if isinstance(message, str) else "")
