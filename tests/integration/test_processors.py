"""The HTTP processor client, circuit breaker and failover against two real sandbox processor
servers on loopback, and the Ledger driven end to end through them on real PostgreSQL.

The breakers use a stepped clock, so "after the reset timeout" costs no waiting; the client's
backoff sleeps are recorded (and tiny) so a test can check that only retryable errors wait.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest

from adapters.clock import ManualClock
from adapters.dev.processor_server import SandboxProcessorServer
from adapters.processors.circuit_breaker import CircuitBreaker, CircuitState
from adapters.processors.client import FailoverRouter, HttpProcessor, ProcessorProtocolError
from api.bootstrap import build_ledger
from api.settings import Settings
from application.errors import ProcessorUnavailable
from application.ledger import Ledger
from application.ports import Decision
from tests.application.flows import new_merchant, open_session, pay

REPO_ROOT = Path(__file__).resolve().parents[2]
# Long enough that a call meant to succeed is not timed out by a stall of the loaded machine
# (the sandbox servers share this process's CPU and GIL); a call meant to time out costs a second.
CLIENT_TIMEOUT_S = 1.0
TIMEOUT_CARD_DELAY_S = 2.0  # the 0119 card answers this late, well after the client gave up
FAILURES_TO_OPEN = 3
RESET_TIMEOUT_S = 30.0


class SteppedClock:
    """A monotonic clock for the breakers that moves only when told."""

    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordedSleep:
    def __init__(self, then: Callable[[], None] | None = None) -> None:
        self.delays: list[float] = []
        self.then = then

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.then is not None:
            self.then()


@pytest.fixture
def monotonic() -> SteppedClock:
    return SteppedClock()


@pytest.fixture
def primary_server() -> Iterator[SandboxProcessorServer]:
    with SandboxProcessorServer("primary", timeout_card_delay_s=TIMEOUT_CARD_DELAY_S) as server:
        yield server


@pytest.fixture
def secondary_server() -> Iterator[SandboxProcessorServer]:
    with SandboxProcessorServer("secondary", timeout_card_delay_s=TIMEOUT_CARD_DELAY_S) as server:
        yield server


@pytest.fixture
def connect(monotonic: SteppedClock) -> Iterator[Callable[..., HttpProcessor]]:
    """Make an HttpProcessor for a server: short timeout, tiny seeded backoff, stepped breaker."""
    made: list[HttpProcessor] = []

    def make(server: SandboxProcessorServer, **overrides: Any) -> HttpProcessor:
        options: dict[str, Any] = {
            "timeout_s": CLIENT_TIMEOUT_S, "retries": 2, "backoff_base_s": 0.004,
            "breaker": CircuitBreaker(FAILURES_TO_OPEN, RESET_TIMEOUT_S, clock=monotonic, name=server.name),
            "rng": random.Random(7), "sleep": RecordedSleep(),
        }
        options.update(overrides)
        processor = HttpProcessor(server.name, server.url, **options)
        made.append(processor)
        return processor

    yield make
    for processor in made:
        processor.close()


@pytest.fixture
def primary(primary_server: SandboxProcessorServer, connect: Callable[..., HttpProcessor]) -> HttpProcessor:
    return connect(primary_server)


@pytest.fixture
def secondary(
    secondary_server: SandboxProcessorServer, connect: Callable[..., HttpProcessor]
) -> HttpProcessor:
    return connect(secondary_server)


def authorize(processor: HttpProcessor, key: str, last4: str = "4242", amount_minor: int = 2_500,
              **overrides: Any) -> Any:
    request: dict[str, Any] = {
        "idempotency_key": key, "amount_minor": amount_minor, "currency": "USD",
        "card_token": f"tok_{last4}", "card_last4": last4, "merchant_id": "m-1",
    }
    request.update(overrides)
    return processor.authorize(**request)


def sleeps(processor: HttpProcessor) -> list[float]:
    return processor._sleep.delays  # type: ignore[attr-defined]


# -- the test cards ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last4", "decision", "reason_code", "moved"),
    [
        ("4242", Decision.APPROVED, "", 1),
        ("0002", Decision.DECLINED, "insufficient_funds", 0),
        ("0019", Decision.DECLINED, "suspected_fraud", 0),
    ],
)
def test_test_cards_approve_or_decline_once_without_retries(
    primary: HttpProcessor, primary_server: SandboxProcessorServer, last4: str, decision: Decision,
    reason_code: str, moved: int,
) -> None:
    outcome = authorize(primary, "k-card", last4)
    assert (outcome.decision, outcome.reason_code, outcome.processor) == (decision, reason_code, "primary")
    if decision == Decision.APPROVED:
        assert outcome.reference.startswith("primary_") and outcome.amount_minor == 2_500
        assert outcome.expires_at is not None
    assert primary_server.requests("k-card") == 1 and sleeps(primary) == []
    assert primary_server.money_movements("k-card") == moved
    # A decline is an answer: the processor is healthy.
    assert primary.breaker.state == CircuitState.CLOSED and primary.breaker.consecutive_failures == 0
    assert primary.status(idempotency_key="k-card") == outcome


def test_the_same_key_returns_the_first_answer_and_moves_money_once(
    primary: HttpProcessor, primary_server: SandboxProcessorServer
) -> None:
    first = authorize(primary, "k-same", cvv="123")
    again = authorize(primary, "k-same")  # a retry does not carry the CVV; still the same request
    assert again == first
    assert primary_server.requests("k-same") == 2 and primary_server.money_movements("k-same") == 1
    response = httpx.post(f"{primary_server.url}/v1/authorizations", headers={"Idempotency-Key": "k-same"},
                          json={"amount_minor": 2_500, "currency": "USD", "card_token": "tok_4242",
                                "card_last4": "4242", "merchant_id": "m-1"})
    assert response.headers["Idempotent-Replayed"] == "true"
    assert response.json()["reference"] == first.reference


def test_the_same_key_for_a_different_request_is_a_conflict_not_a_charge(
    primary: HttpProcessor, primary_server: SandboxProcessorServer
) -> None:
    authorize(primary, "k-conflict", amount_minor=2_500)
    with pytest.raises(ProcessorProtocolError) as raised:
        authorize(primary, "k-conflict", amount_minor=9_999)
    assert (raised.value.status_code, raised.value.error_code) == (409, "idempotency_key_reused")
    assert primary_server.money_movements("k-conflict") == 1
    assert primary.breaker.consecutive_failures == 0


def test_every_post_needs_an_idempotency_key(primary_server: SandboxProcessorServer) -> None:
    response = httpx.post(f"{primary_server.url}/v1/authorizations", json={
        "amount_minor": 100, "currency": "USD", "card_token": "t", "card_last4": "4242", "merchant_id": "m"})
    assert response.status_code == 400 and response.json()["error"] == "idempotency_key_required"
    malformed = httpx.post(f"{primary_server.url}/v1/authorizations", headers={"Idempotency-Key": "k-bad"},
                           json={"amount_minor": 1.5, "currency": "USD"})
    assert malformed.status_code == 400 and malformed.json()["error"] == "invalid_request"
    assert primary_server.total_money_movements() == 0


# -- retries -------------------------------------------------------------------------------------


def test_a_lost_answer_is_retried_with_the_same_key_and_moves_money_once(
    primary: HttpProcessor, primary_server: SandboxProcessorServer
) -> None:
    # Card 0259: the server records the approval, then answers 500 (the answer is lost).
    outcome = authorize(primary, "k-lost", "0259")
    assert outcome.decision == Decision.APPROVED
    assert primary_server.requests("k-lost") == 2  # the first attempt and one retry
    assert primary_server.money_movements("k-lost") == 1
    assert len(sleeps(primary)) == 1 and 0.002 <= sleeps(primary)[0] <= 0.004
    assert primary.breaker.consecutive_failures == 0  # the success reset it


def test_persistent_server_errors_end_unknown_after_backing_off_and_status_tells_the_truth(
    connect: Callable[..., HttpProcessor], primary_server: SandboxProcessorServer
) -> None:
    primary_server.server_error_attempts = 10
    processor = connect(primary_server, breaker=CircuitBreaker(10, RESET_TIMEOUT_S))
    outcome = authorize(processor, "k-500", "0259")
    assert (outcome.decision, outcome.reason_code) == (Decision.UNKNOWN, "processor_unavailable")
    assert primary_server.requests("k-500") == 3  # 1 + retries, never more
    first, second = sleeps(processor)
    assert 0.002 <= first <= 0.004 and 0.004 <= second <= 0.008  # exponential, with jitter
    resolved = processor.status(idempotency_key="k-500")
    assert resolved is not None and resolved.decision == Decision.APPROVED
    assert primary_server.money_movements("k-500") == 1


def test_an_outage_during_the_backoff_is_ridden_out_with_the_same_key(
    connect: Callable[..., HttpProcessor], primary_server: SandboxProcessorServer
) -> None:
    primary_server.set_down(True)
    processor = connect(primary_server, sleep=RecordedSleep(then=lambda: primary_server.set_down(False)))
    outcome = authorize(processor, "k-outage")
    assert outcome.decision == Decision.APPROVED
    assert len(sleeps(processor)) == 1
    assert primary_server.money_movements("k-outage") == 1


def test_concurrent_calls_with_one_key_move_money_once(
    primary: HttpProcessor, primary_server: SandboxProcessorServer
) -> None:
    primary_server.set_latency(30)
    references: list[str] = []
    threads = [threading.Thread(target=lambda: references.append(authorize(primary, "k-race").reference))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(references) == 8 and len(set(references)) == 1
    assert primary_server.money_movements("k-race") == 1


# -- timeouts and latency ------------------------------------------------------------------------


def test_a_timeout_is_unknown_never_retried_and_status_gives_the_real_outcome(
    primary: HttpProcessor, primary_server: SandboxProcessorServer
) -> None:
    started = time.monotonic()
    outcome = authorize(primary, "k-timeout", "0119")
    assert time.monotonic() - started < TIMEOUT_CARD_DELAY_S
    assert (outcome.decision, outcome.reason_code) == (Decision.UNKNOWN, "timeout")
    assert primary_server.requests("k-timeout") == 1 and sleeps(primary) == []
    resolved = primary.status(idempotency_key="k-timeout")
    assert resolved is not None and resolved.decision == Decision.APPROVED
    assert primary.status(idempotency_key="k-never-sent") is None
    # Asking again with the same key (what the ledger does when status says "never seen") is safe.
    assert authorize(primary, "k-timeout", "0119").reference == resolved.reference
    assert primary_server.money_movements("k-timeout") == 1


def test_latency_is_adjustable_and_a_slow_processor_times_out(
    primary: HttpProcessor, primary_server: SandboxProcessorServer, connect: Callable[..., HttpProcessor]
) -> None:
    patient = connect(primary_server, timeout_s=5.0)
    primary_server.set_latency(200)
    started = time.monotonic()
    assert authorize(patient, "k-slow").decision == Decision.APPROVED
    assert time.monotonic() - started >= 0.2

    primary_server.set_latency(int(CLIENT_TIMEOUT_S * 1000) + 150)
    assert authorize(primary, "k-too-slow").decision == Decision.UNKNOWN
    primary_server.set_latency(0)
    deadline = time.monotonic() + 5
    while (resolved := primary.status(idempotency_key="k-too-slow")) is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the delayed request is still on its way to being recorded
    assert resolved is not None and resolved.decision == Decision.APPROVED

    started = time.monotonic()
    authorize(patient, "k-fast")
    assert time.monotonic() - started < CLIENT_TIMEOUT_S + 0.15  # the last latency set is gone
    assert primary_server.money_movements("k-too-slow") == 1


# -- capture, void, refund -----------------------------------------------------------------------


def test_capture_void_and_refund_move_money_within_what_the_authorization_allows(
    primary: HttpProcessor, secondary: HttpProcessor, primary_server: SandboxProcessorServer
) -> None:
    held = authorize(primary, "k-auth-1", amount_minor=2_500)
    captured = primary.capture(idempotency_key="k-cap-1", authorization_reference=held.reference,
                               amount_minor=2_000, currency="USD")
    assert (captured.decision, captured.amount_minor) == (Decision.APPROVED, 2_000)
    too_much = primary.capture(idempotency_key="k-cap-2", authorization_reference=held.reference,
                               amount_minor=501, currency="USD")
    assert (too_much.decision, too_much.reason_code) == (Decision.DECLINED, "amount_exceeds_authorized")
    refunded = primary.refund(idempotency_key="k-ref-1", authorization_reference=held.reference,
                              amount_minor=1_500, currency="USD")
    assert refunded.decision == Decision.APPROVED
    over = primary.refund(idempotency_key="k-ref-2", authorization_reference=held.reference,
                          amount_minor=501, currency="USD")
    assert (over.decision, over.reason_code) == (Decision.DECLINED, "amount_exceeds_captured")
    not_voidable = primary.void(idempotency_key="k-void-1", authorization_reference=held.reference)
    assert (not_voidable.decision, not_voidable.reason_code) == (Decision.DECLINED, "already_captured")

    other = authorize(primary, "k-auth-2")
    assert primary.void(idempotency_key="k-void-2", authorization_reference=other.reference).decision == (
        Decision.APPROVED
    )
    after_void = primary.capture(idempotency_key="k-cap-3", authorization_reference=other.reference,
                                 amount_minor=100, currency="USD")
    assert after_void.reason_code == "authorization_voided"
    # An authorization lives at the processor that made it.
    elsewhere = secondary.capture(idempotency_key="k-cap-4", authorization_reference=other.reference,
                                  amount_minor=100, currency="USD")
    assert (elsewhere.decision, elsewhere.reason_code) == (Decision.DECLINED, "authorization_not_found")
    moved = primary_server.counters()["money_movements"]
    assert moved == {"k-auth-1": 1, "k-cap-1": 1, "k-ref-1": 1, "k-auth-2": 1, "k-void-2": 1}
    assert primary.breaker.consecutive_failures == 0


# -- circuit breaker and failover ----------------------------------------------------------------


def test_an_unreachable_processor_opens_its_circuit_and_is_then_not_called_at_all(
    primary: HttpProcessor, primary_server: SandboxProcessorServer, monotonic: SteppedClock
) -> None:
    primary_server.stop()  # connection refused
    outcome = authorize(primary, "k-refused")
    assert (outcome.decision, outcome.reason_code) == (Decision.UNKNOWN, "processor_unavailable")
    assert primary.breaker.state == CircuitState.OPEN  # three refused attempts
    assert len(sleeps(primary)) == 2

    started = time.monotonic()
    fast = authorize(primary, "k-while-open")
    assert (fast.decision, fast.reason_code) == (Decision.UNKNOWN, "circuit_open")
    assert time.monotonic() - started < 0.2 and len(sleeps(primary)) == 2
    status = primary.status(idempotency_key="k-refused")
    assert status is not None and status.decision == Decision.UNKNOWN  # never None: unknown is unknown

    primary_server.start()  # back on the same port
    monotonic.advance(RESET_TIMEOUT_S)
    assert primary.breaker.state == CircuitState.HALF_OPEN
    assert authorize(primary, "k-after").decision == Decision.APPROVED  # the trial
    assert primary.breaker.state == CircuitState.CLOSED
    assert primary_server.requests("k-while-open") == 0 and primary_server.money_movements("k-refused") == 0


def test_an_unknown_outcome_says_whether_the_request_can_have_reached_the_processor(
    connect: Callable[..., HttpProcessor], primary_server: SandboxProcessorServer
) -> None:
    """Only "never got past connecting" (refused, circuit open) is safe to send elsewhere."""
    processor = connect(primary_server, breaker=CircuitBreaker(10, RESET_TIMEOUT_S))
    timed_out = authorize(processor, "k-sent-timeout", "0119")
    primary_server.server_error_attempts = 10
    server_error = authorize(processor, "k-sent-500", "0259")
    primary_server.server_error_attempts = 0
    primary_server.stop()
    refused = authorize(processor, "k-refused")
    assert [(o.decision, o.sent) for o in (timed_out, server_error, refused)] == [
        (Decision.UNKNOWN, True), (Decision.UNKNOWN, True), (Decision.UNKNOWN, False)]
    processor.breaker = CircuitBreaker(1, RESET_TIMEOUT_S)
    processor.breaker.record_failure()
    open_circuit = authorize(processor, "k-open")
    assert (open_circuit.reason_code, open_circuit.sent) == ("circuit_open", False)


def test_failover_to_the_secondary_while_the_primary_is_open_and_back_after_a_good_trial(
    primary: HttpProcessor, secondary: HttpProcessor, primary_server: SandboxProcessorServer,
    secondary_server: SandboxProcessorServer, monotonic: SteppedClock,
) -> None:
    router = FailoverRouter(primary, secondary)
    assert router.select() is primary
    primary_server.set_down(True)
    assert authorize(router.select(), "k-f1").decision == Decision.UNKNOWN
    assert primary.breaker.state == CircuitState.OPEN

    chosen = router.select()
    assert chosen is secondary
    outcome = authorize(chosen, "k-f2")
    assert (outcome.decision, outcome.processor) == (Decision.APPROVED, "secondary")
    assert router.named("primary") is primary and router.named("secondary") is secondary

    monotonic.advance(RESET_TIMEOUT_S)  # half-open, but the primary is still down
    assert router.select() is primary
    assert authorize(primary, "k-f3").decision == Decision.UNKNOWN  # the trial fails
    assert primary.breaker.state == CircuitState.OPEN and router.select() is secondary

    primary_server.set_down(False)
    monotonic.advance(RESET_TIMEOUT_S)
    assert router.select() is primary
    assert authorize(router.select(), "k-f4").decision == Decision.APPROVED
    assert primary.breaker.state == CircuitState.CLOSED and router.select() is primary
    assert primary_server.money_movements("k-f1") == 0 and secondary_server.money_movements("k-f2") == 1


def test_with_both_circuits_open_there_is_nothing_to_select(
    primary: HttpProcessor, secondary: HttpProcessor, primary_server: SandboxProcessorServer,
    secondary_server: SandboxProcessorServer,
) -> None:
    router = FailoverRouter(primary, secondary)
    primary_server.set_down(True)
    secondary_server.set_down(True)
    authorize(primary, "k-b1")
    authorize(secondary, "k-b2")
    with pytest.raises(ProcessorUnavailable):
        router.select()
    with pytest.raises(ProcessorUnavailable):
        router.named("sandbox")
    with pytest.raises(ValueError):
        FailoverRouter(primary, primary)


def test_the_server_runs_as_a_process_with_http_controls(connect: Callable[..., HttpProcessor]) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "adapters.dev.processor_server", "--name", "primary", "--port", "0"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        match = re.search(r"listening on (http://\S+)", process.stdout.readline())
        assert match, "the server prints its URL first"
        url = match.group(1)
        processor = HttpProcessor("primary", url, timeout_s=2.0, retries=0)
        assert authorize(processor, "k-proc").decision == Decision.APPROVED
        assert httpx.post(f"{url}/v1/sandbox/down", json={"down": True}).json()["down"] is True
        assert authorize(processor, "k-proc-down").reason_code == "processor_unavailable"
        httpx.post(f"{url}/v1/sandbox/down", json={"down": False})
        assert httpx.post(f"{url}/v1/sandbox/latency", json={"latency_ms": 5}).json()["latency_ms"] == 5
        counters = httpx.get(f"{url}/v1/sandbox/counters").json()
        assert counters["money_movements"] == {"k-proc": 1}
        processor.close()
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


# -- the Ledger, end to end ----------------------------------------------------------------------


@pytest.fixture
def router(primary: HttpProcessor, secondary: HttpProcessor) -> FailoverRouter:
    return FailoverRouter(primary, secondary)


@pytest.fixture
def http_ledger(
    settings: Settings, database_url: str, clock: ManualClock, router: FailoverRouter
) -> Iterator[Ledger]:
    app = build_ledger(settings, database_url, clock=clock, processor=router)  # type: ignore[arg-type]
    yield app
    app.close()


def new_payment(ledger: Ledger, merchant_id: UUID, n: int, last4: str = "4242") -> UUID:
    return pay(ledger, open_session(ledger, merchant_id, command_id=f"open-{n}"), last4, prefix=f"p{n}-")


def test_ledger_authorizes_captures_and_refunds_through_the_http_processor(
    http_ledger: Ledger, primary_server: SandboxProcessorServer, secondary_server: SandboxProcessorServer
) -> None:
    payment_id = new_payment(http_ledger, new_merchant(http_ledger), 1)
    assert http_ledger.authorize_payment(payment_id, cvv="123").result["status"] == "authorized"
    http_ledger.capture_payment("capture-1", payment_id)
    http_ledger.refund_payment("refund-1", payment_id, amount_minor=500)
    http_ledger.capture_payment("capture-1", payment_id)  # a retried command: no second call
    payment = http_ledger.get_payment(payment_id)
    assert (payment.processor, payment.status, payment.captured_minor) == ("primary", "captured", 2_500)
    assert (payment.authorization_reference or "").startswith("primary_")
    moved = primary_server.counters()["money_movements"]
    assert moved[f"authorize:{payment_id}"] == 1 and moved[f"capture:{payment_id}"] == 1
    assert sum(moved.values()) == 3 and secondary_server.total_money_movements() == 0


def test_ledger_fails_over_new_payments_and_keeps_later_calls_on_the_authorizing_processor(
    http_ledger: Ledger, router: FailoverRouter, primary_server: SandboxProcessorServer,
    secondary_server: SandboxProcessorServer, monotonic: SteppedClock,
) -> None:
    merchant_id = new_merchant(http_ledger)
    stuck = new_payment(http_ledger, merchant_id, 1)
    moved_over = new_payment(http_ledger, merchant_id, 2)

    primary_server.set_down(True)
    with pytest.raises(ProcessorUnavailable):
        http_ledger.authorize_payment(stuck)  # sent to the primary: its outcome is unknown
    assert http_ledger.get_payment(stuck).processor == "primary"
    assert router.primary.breaker.state == CircuitState.OPEN

    assert http_ledger.authorize_payment(moved_over).result["status"] == "authorized"
    assert http_ledger.get_payment(moved_over).processor == "secondary"
    http_ledger.capture_payment("capture-2", moved_over)
    assert secondary_server.money_movements(f"capture:{moved_over}") == 1
    assert primary_server.requests(f"capture:{moved_over}") == 0

    # The primary recovers; the unknown authorization is settled at the primary, never moved.
    primary_server.set_down(False)
    monotonic.advance(RESET_TIMEOUT_S)
    assert http_ledger.resolve_authorization(stuck).result["status"] == "authorized"
    assert http_ledger.get_payment(stuck).processor == "primary"
    assert primary_server.money_movements(f"authorize:{stuck}") == 1
    assert secondary_server.requests(f"authorize:{stuck}") == 0
    assert router.primary.breaker.state == CircuitState.CLOSED

    after = new_payment(http_ledger, merchant_id, 3)
    http_ledger.authorize_payment(after)
    assert http_ledger.get_payment(after).processor == "primary"


def test_a_payment_sent_to_a_primary_that_refuses_connections_is_rerouted_at_once(
    http_ledger: Ledger, router: FailoverRouter, primary_server: SandboxProcessorServer,
    secondary_server: SandboxProcessorServer,
) -> None:
    """The primary went down after its circuit last let calls through: the first payment is
    recorded as sent to it, the connection is refused (so it provably has nothing), and the
    same call sends it to the secondary with the same key instead of leaving it waiting."""
    payment_id = new_payment(http_ledger, new_merchant(http_ledger), 1)
    primary_server.stop()
    assert http_ledger.authorize_payment(payment_id).result["status"] == "authorized"
    payment = http_ledger.get_payment(payment_id)
    assert payment.processor == "secondary"
    names = [type(e).__name__ for e in http_ledger.events.get(payment_id)]
    assert names[-3:] == ["ProcessingStarted", "ProcessingRerouted", "Authorized"]
    key = f"authorize:{payment_id}"
    assert secondary_server.money_movements(key) == 1 and primary_server.requests(key) == 0
    # Asking again changes nothing and calls nobody.
    assert http_ledger.authorize_payment(payment_id).replayed
    assert secondary_server.requests(key) == 1


def test_two_callers_authorizing_one_payment_at_once_ask_the_processor_once(
    settings: Settings, database_url: str, clock: ManualClock, connect: Callable[..., HttpProcessor],
    primary_server: SandboxProcessorServer, secondary_server: SandboxProcessorServer,
    request: pytest.FixtureRequest,
) -> None:
    """A double submit, a page reload or the resolver may authorize the same payment while a
    call is with the processor: the per-payment lock makes them wait and read its answer."""
    # A patient client: the processor's answer takes 0.3 s, long after the second caller has
    # come, and still well inside the client's timeout on a loaded machine.
    router = FailoverRouter(connect(primary_server, timeout_s=5.0), connect(secondary_server, timeout_s=5.0))
    http_ledger = build_ledger(settings, database_url, clock=clock, processor=router)  # type: ignore[arg-type]
    request.addfinalizer(http_ledger.close)
    payment_id = new_payment(http_ledger, new_merchant(http_ledger), 1)
    http_ledger.authorize_payment(new_payment(http_ledger, new_merchant(http_ledger, "m2"), 2))  # warm up
    primary_server.set_latency(300)
    results: list[str] = []

    def authorize() -> None:
        results.append(http_ledger.authorize_payment(payment_id).result["status"])

    first = threading.Thread(target=authorize)
    first.start()
    time.sleep(0.05)  # the first call is with the processor now
    authorize()
    first.join()
    assert results == ["authorized", "authorized"]
    key = f"authorize:{payment_id}"
    assert primary_server.requests(key) == 1 and secondary_server.requests(key) == 0


def test_ledger_settles_a_timed_out_authorization_by_asking_not_by_charging_again(
    http_ledger: Ledger, primary_server: SandboxProcessorServer
) -> None:
    payment_id = new_payment(http_ledger, new_merchant(http_ledger), 1, last4="0119")
    with pytest.raises(ProcessorUnavailable):
        http_ledger.authorize_payment(payment_id)
    assert http_ledger.get_payment(payment_id).status == "processing"
    assert http_ledger.resolve_authorization(payment_id).result["status"] == "authorized"
    key = f"authorize:{payment_id}"
    assert primary_server.requests(key) == 1 and primary_server.money_movements(key) == 1
    recorded = primary_server.counters()
    assert recorded["requests"] == {key: 1}


def test_ledger_records_nothing_when_no_processor_can_be_selected(
    http_ledger: Ledger, router: FailoverRouter, primary_server: SandboxProcessorServer,
    secondary_server: SandboxProcessorServer,
) -> None:
    merchant_id = new_merchant(http_ledger)
    payment_id = new_payment(http_ledger, merchant_id, 1)
    for server, processor in ((primary_server, router.primary), (secondary_server, router.secondary)):
        server.set_down(True)
        authorize(processor, f"k-open-{server.name}")
    with pytest.raises(ProcessorUnavailable):
        http_ledger.authorize_payment(payment_id)
    payment = http_ledger.get_payment(payment_id)
    assert (payment.status, payment.processor) == ("initiated", None)
