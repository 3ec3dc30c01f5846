"""The merchant's commerce backend: where a completed session becomes an order.

The order is POSTed to the merchant's ``commerce_backend_uri`` with an ``Idempotency-Key`` (the
session id), so a retried call, after a timeout or a crash between the call and our record of
it, creates no second order: the backend answers the retry with the order it already made.
A call without the key is refused here, before anything is sent.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
import msgspec

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"


class MissingIdempotencyKey(ValueError):
    """A commerce order without an idempotency key: a bug, since a retry could order twice."""


class CommerceOrder(msgspec.Struct, frozen=True, kw_only=True):
    """What the commerce backend receives: the order as the voice conversation took it."""

    reference: str
    items: list[dict[str, Any]]
    amount_minor: int
    currency: str
    payment_id: UUID
    session_id: UUID
    merchant_id: UUID


_encoder = msgspec.json.Encoder()


def encode_order(order: CommerceOrder) -> bytes:
    return _encoder.encode(order)


def decode_order(body: bytes) -> CommerceOrder:
    return msgspec.json.decode(body, type=CommerceOrder)


@dataclass(frozen=True)
class CommerceResponse:
    """One call's outcome: a status code, or an error when no response came."""

    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def created(self) -> bool:
        """The order exists now (made by this call or by an earlier one with the same key)."""
        return self.status_code is not None and 200 <= self.status_code < 300


class CommerceBackend(ABC):
    """The port: create one order per idempotency key in the merchant's backend."""

    @abstractmethod
    def create_order(
        self, uri: str, order_body: bytes, *, idempotency_key: str, headers: Mapping[str, str] | None = None
    ) -> CommerceResponse:
        """POST the encoded ``CommerceOrder``; ``headers`` adds the signature and event id."""


def describe_error(error: Exception) -> str:
    """A short, stable description of a failed HTTP call for the delivery log."""
    kind = (
        "timeout" if isinstance(error, httpx.TimeoutException)
        else "connect_error" if isinstance(error, httpx.ConnectError)
        else type(error).__name__
    )
    return f"{kind}: {error}"[:500]


def post(
    client: httpx.Client, url: str, body: bytes, headers: Mapping[str, str]
) -> tuple[int | None, str | None]:
    """POST without following redirects and without reading the response body (only the
    status matters, and a receiver must not make us buffer megabytes)."""
    try:
        request = client.build_request("POST", url, content=body, headers=dict(headers))
        response = client.send(request, stream=True, follow_redirects=False)
        response.close()
        return response.status_code, None if response.is_success else f"HTTP {response.status_code}"
    except httpx.HTTPError as error:
        return None, describe_error(error)


class HttpCommerceBackend(CommerceBackend):
    def __init__(self, *, timeout_s: float = 5.0, client: httpx.Client | None = None) -> None:
        self._client = client or httpx.Client(timeout=timeout_s, follow_redirects=False)

    def create_order(
        self, uri: str, order_body: bytes, *, idempotency_key: str, headers: Mapping[str, str] | None = None
    ) -> CommerceResponse:
        if not idempotency_key:
            raise MissingIdempotencyKey("a commerce order is never sent without an idempotency key")
        sent_headers = {
            "Content-Type": "application/json",
            **(headers or {}),
            IDEMPOTENCY_KEY_HEADER: idempotency_key,
        }
        started = time.perf_counter()
        status_code, error = post(self._client, uri, order_body, sent_headers)
        return CommerceResponse(status_code, error, round((time.perf_counter() - started) * 1000))

    def close(self) -> None:
        self._client.close()
