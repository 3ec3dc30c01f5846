"""The PaymentProcessor port over HTTP (adapters/dev/processor_server.py speaks the same API), with a
circuit breaker per processor, retries for retryable errors only, and failover between two.

Why each failure is handled the way it is:

- Connection refused, connect/pool timeout, 5xx: retried with exponential backoff and jitter,
  always with the same idempotency key, so a retry of a request the processor did handle (a
  lost 500) gets the recorded answer instead of moving money again. When the retries run out
  the outcome is ``Decision.UNKNOWN``: a 5xx may have come after the money moved.
- Read timeout or a connection dropped mid-answer: ``Decision.UNKNOWN`` at once, never retried.
  The request may still be running at the processor; the ledger settles it later by asking
  ``status`` with the same key (``Ledger.resolve_authorization``), not by charging again.
- Declines (402/422 with a decline code): ``Decision.DECLINED``, never retried.
- Circuit open: ``Decision.UNKNOWN`` (reason ``circuit_open``) without a request.
- ``ProcessorOutcome.sent`` is False when no attempt got past connecting (refused, connect
  timeout, circuit open): the processor has nothing, so the ledger may send the authorization
  to the other processor with the same key (``Ledger.authorize_payment``).
- Other 4xx (malformed request, key reused for a different request): ``ProcessorProtocolError``,
  a bug on our side, not something a retry or failover can fix.

The breaker counts every failed attempt (5xx, unreachable, timeout); an answer of any kind,
decline included, counts as success: the processor is alive.
"""

from __future__ import annotations

import random
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self
from urllib.parse import quote

import httpx
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from adapters.backoff import EQUAL_JITTER, backoff_s
from adapters.processors.circuit_breaker import CircuitBreaker, CircuitState
from application.errors import ProcessorUnavailable
from application.ports import Decision, ProcessorOutcome

DECLINE_STATUSES = (402, 422)


class _BreakerStates(Collector):
    """Each live processor's circuit state, read when Prometheus scrapes (open turns half-open
    by the clock, not by a call, so a gauge set on changes would go stale)."""

    def __init__(self) -> None:
        self.processors: weakref.WeakSet[HttpProcessor] = weakref.WeakSet()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily("echotransact_processor_circuit_state", "1 for each processor's current circuit "
                                   "breaker state (closed, open, half_open), 0 for the others",
                                   labels=["processor", "state"])
        failures = GaugeMetricFamily("echotransact_processor_consecutive_failures",
                                     "Consecutive failed calls counted by each processor's breaker",
                                     labels=["processor"])
        for processor in list(self.processors):
            current = processor.breaker.state
            for state in CircuitState:
                states.add_metric([processor.name, state.value], 1 if state == current else 0)
            failures.add_metric([processor.name], processor.breaker.consecutive_failures)
        yield states
        yield failures


BREAKER_STATES = _BreakerStates()
REGISTRY.register(BREAKER_STATES)


class ProcessorProtocolError(RuntimeError):
    """The processor rejected the request itself (400, 404, 409 idempotency_key_reused): a
    programming or configuration error, so it is raised rather than retried or failed over."""

    def __init__(self, message: str, *, status_code: int, error_code: str = "") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_code = error_code


@dataclass(frozen=True)
class _Attempted:
    """What the retry loop ended with: a response, or why there is none."""

    response: httpx.Response | None
    reason_code: str = ""  # timeout | processor_unavailable | circuit_open
    message: str = ""
    sent: bool = True  # False: no attempt got past connecting, so the processor has nothing


class HttpProcessor:
    """One processor behind its own circuit breaker. Thread-safe (httpx.Client is)."""

    def __init__(
        self,
        name: str,
        base_url: str,
        timeout_s: float = 2.0,
        retries: int = 2,
        backoff_base_s: float = 0.1,
        breaker: CircuitBreaker | None = None,
        *,
        backoff_max_s: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must not be negative, got {retries}")
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.breaker = breaker or CircuitBreaker(failure_threshold=5, reset_timeout_s=30.0, name=name)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._client = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout_s))
        BREAKER_STATES.processors.add(self)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def is_available(self) -> bool:
        """Whether the breaker would let a call through now (reserves nothing)."""
        return self.breaker.is_available()

    # -- the port ------------------------------------------------------------------------------

    def authorize(
        self,
        *,
        idempotency_key: str,
        amount_minor: int,
        currency: str,
        card_token: str,
        card_last4: str,
        merchant_id: str,
        cvv: str | None = None,
    ) -> ProcessorOutcome:
        body: dict[str, Any] = {
            "amount_minor": amount_minor, "currency": currency, "card_token": card_token,
            "card_last4": card_last4, "merchant_id": merchant_id,
        }
        if cvv is not None:
            body["cvv"] = cvv
        return self._operation("/v1/authorizations", idempotency_key, body)

    def capture(
        self, *, idempotency_key: str, authorization_reference: str, amount_minor: int, currency: str
    ) -> ProcessorOutcome:
        return self._operation("/v1/captures", idempotency_key, {
            "authorization_reference": authorization_reference, "amount_minor": amount_minor,
            "currency": currency,
        })

    def void(self, *, idempotency_key: str, authorization_reference: str) -> ProcessorOutcome:
        return self._operation(
            "/v1/voids", idempotency_key, {"authorization_reference": authorization_reference}
        )

    def refund(
        self, *, idempotency_key: str, authorization_reference: str, amount_minor: int, currency: str
    ) -> ProcessorOutcome:
        return self._operation("/v1/refunds", idempotency_key, {
            "authorization_reference": authorization_reference, "amount_minor": amount_minor,
            "currency": currency,
        })

    def status(self, *, idempotency_key: str) -> ProcessorOutcome | None:
        """The recorded answer for this key; None only when the processor says it never saw
        the key. If the processor cannot be asked, the outcome is still UNKNOWN (never None:
        None would invite a new authorization)."""
        attempted = self._attempt("GET", f"/v1/operations/{quote(idempotency_key, safe='')}")
        response = attempted.response
        if response is None:
            return self._unknown(attempted)
        if response.status_code == 404 and _error_code(response) == "operation_not_found":
            return None
        if response.status_code == 200:
            return self._outcome(response)
        raise _protocol_error(response)

    def submit_dispute_evidence(self, *, idempotency_key: str, dispute_id: str, evidence: dict[str, str]) -> None:
        """Send a dispute's evidence (``POST /v1/disputes/{id}/evidence``); the ruling comes back
        later as a notification. ProcessorUnavailable when it cannot be sent now (send again:
        the key makes a repeat harmless)."""
        attempted = self._attempt("POST", f"/v1/disputes/{quote(dispute_id, safe='')}/evidence",
                                  json={"evidence": evidence}, headers={"Idempotency-Key": idempotency_key})
        response = attempted.response
        if response is None:
            raise ProcessorUnavailable(attempted.message)
        if response.status_code != 200:
            raise _protocol_error(response)

    # -- internals -----------------------------------------------------------------------------

    def _operation(self, path: str, idempotency_key: str, body: dict[str, Any]) -> ProcessorOutcome:
        attempted = self._attempt("POST", path, json=body, headers={"Idempotency-Key": idempotency_key})
        response = attempted.response
        if response is None:
            return self._unknown(attempted)
        if response.status_code == 200:
            return self._outcome(response)
        if response.status_code in DECLINE_STATUSES and _json(response).get("decision") == "declined":
            return self._outcome(response)
        raise _protocol_error(response)

    def _attempt(self, method: str, path: str, **request: Any) -> _Attempted:
        """Send once, and again after a backoff for retryable failures, same request each time."""
        failure = _Attempted(None, "circuit_open", f"the circuit to processor {self.name} is open", sent=False)
        sent = False
        for attempt in range(self.retries + 1):
            if attempt:
                if not self.breaker.is_available():
                    break  # the failures so far opened the circuit: give up without waiting
                self._sleep(self._backoff_s(attempt - 1))
            if not self.breaker.try_acquire():
                break
            try:
                response = self._client.request(method, path, **request)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
                # Nothing reached the processor: retrying cannot double anything.
                self.breaker.record_failure()
                failure = _Attempted(None, "processor_unavailable", f"{self.name} unreachable: {error}",
                                     sent=sent)
                continue
            except httpx.TimeoutException as error:
                self.breaker.record_failure()
                return _Attempted(
                    None, "timeout", f"{self.name} did not answer in {self.timeout_s}s: {error!r}"
                )
            except httpx.TransportError as error:
                # The connection broke after the request went out: as unknown as a timeout.
                self.breaker.record_failure()
                return _Attempted(None, "timeout", f"{self.name} dropped the connection: {error!r}")
            sent = True
            if response.status_code >= 500:
                self.breaker.record_failure()
                failure = _Attempted(
                    None, "processor_unavailable",
                    f"{self.name} answered {response.status_code} {_error_code(response)}".rstrip(),
                )
                continue
            self.breaker.record_success()
            return _Attempted(response)
        return failure if not sent else _Attempted(None, failure.reason_code, failure.message, sent=True)

    def _backoff_s(self, retry: int) -> float:
        # Equal jitter: retries from many callers spread out, but none retries at once (a
        # processor that just failed is unlikely to be back within a millisecond).
        return backoff_s(retry, base_s=self.backoff_base_s, cap_s=self.backoff_max_s, jitter=EQUAL_JITTER,
                         rng=self._rng)

    def _unknown(self, attempted: _Attempted) -> ProcessorOutcome:
        return ProcessorOutcome(
            Decision.UNKNOWN, self.name, reason_code=attempted.reason_code, message=attempted.message,
            sent=attempted.sent,
        )

    def _outcome(self, response: httpx.Response) -> ProcessorOutcome:
        data = _json(response)
        try:
            decision = Decision(data["decision"])
            expires_at = data.get("expires_at")
            return ProcessorOutcome(
                decision,
                # Our name, not the server's: the ledger routes later calls by this name.
                self.name,
                reference=str(data.get("reference") or ""),
                amount_minor=int(data.get("amount_minor") or 0),
                reason_code=str(data.get("reason_code") or ""),
                message=str(data.get("message") or ""),
                expires_at=datetime.fromisoformat(expires_at) if expires_at else None,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ProcessorProtocolError(
                f"processor {self.name} sent an unreadable answer: {error}", status_code=response.status_code
            ) from None

    def __repr__(self) -> str:
        return (
            f"HttpProcessor(name={self.name!r}, base_url={self.base_url!r}, "
            f"breaker={self.breaker.state.value})"
        )


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _error_code(response: httpx.Response) -> str:
    return str(_json(response).get("error") or "")


def _protocol_error(response: httpx.Response) -> ProcessorProtocolError:
    data = _json(response)
    code = str(data.get("error") or data.get("reason_code") or "")
    return ProcessorProtocolError(
        f"processor refused the request: {response.status_code} {code} {data.get('message', '')}".strip(),
        status_code=response.status_code, error_code=code,
    )


class FailoverRouter:
    """New authorizations go to the primary unless its circuit is open, then to the secondary;
    one the chosen processor provably never received (a refused connection) may go to the other
    (``alternative``); calls about an earlier authorization go to the processor named on the
    payment.

    When neither can take a call, ``select`` raises ProcessorUnavailable, so the ledger records
    nothing and sends nothing (the payment stays initiated and can be authorized later).
    """

    def __init__(self, primary: HttpProcessor, secondary: HttpProcessor) -> None:
        if primary.name == secondary.name:
            raise ValueError(f"primary and secondary need different names, both are {primary.name!r}")
        self.primary = primary
        self.secondary = secondary
        self._by_name = {primary.name: primary, secondary.name: secondary}

    def select(self) -> HttpProcessor:
        for processor in (self.primary, self.secondary):
            if processor.is_available():
                return processor
        raise ProcessorUnavailable(
            f"no processor is available: the circuits to {self.primary.name} and "
            f"{self.secondary.name} are open"
        )

    def alternative(self, name: str) -> HttpProcessor | None:
        """The other processor, if its circuit lets a call through now."""
        other = self.secondary if name == self.primary.name else self.primary
        return other if other.name != name and other.is_available() else None

    def named(self, name: str) -> HttpProcessor:
        try:
            return self._by_name[name]
        except KeyError:
            raise ProcessorUnavailable(
                f"no processor named {name!r} is configured (have {', '.join(self._by_name)})"
            ) from None

    def close(self) -> None:
        self.primary.close()
        self.secondary.close()
