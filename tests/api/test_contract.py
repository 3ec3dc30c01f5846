"""The API's contract over real HTTP: the OpenAPI document and its docs page, problem+json for
every kind of bad request (never a 500, never a stack trace), the rate limit, and Schemathesis
fuzzing every operation of the served document."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.core.result import Ok
from schemathesis.generation.modes import GenerationMode
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import response_schema_conformance
from schemathesis.specs.openapi.schemas import OpenApiSchema

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.dev.servers import ServerURLs
from adapters.processors.notifications import SIGNATURE_HEADER, event_body, signature_header
from api.http.app import MAX_BODY_BYTES
from api.settings import Settings
from application.disputes import DISPUTE_OPENED, ProcessorEvent
from tests.api.conftest import Api, disputed_payment, make_api, paid_payment, session_body
from tests.projections.test_reconciliations import reconcile_day

PROBLEM_JSON = "application/problem+json"
PROCESSOR_SECRET = "whsec_contract"  # what the sandbox processor (the in-process one, "sandbox") signs with

@pytest.fixture(scope="module")
def served(module_database: str, servers: ServerURLs) -> Iterator[Api]:
    """One API for the module, without a rate limit: the fuzzer sends a few thousand requests."""
    settings = Settings(hash_key=b"h" * 32, master_key=b"m" * 32, encryption_key=b"e" * 32, rate_limit_per_minute=0,
                        processor_webhook_secrets={"sandbox": (PROCESSOR_SECRET,)})
    running = make_api(settings, module_database, servers, ManualClock(), SandboxProcessor())
    served = next(running)
    try:
        yield served
        # The run's one Redis outlives this module: leave none of the fuzzer's data (its idempotency
        # records hold generated numbers) for a later test that scans Redis for card numbers.
        assert served.services.redis is not None
        served.services.redis.flushdb()
    finally:
        next(running, None)


@pytest.fixture(scope="module")
def document(served: Api) -> dict[str, Any]:
    response = httpx.get(f"{served.url}/schema/openapi.json")
    assert response.status_code == 200 and "json" in response.headers["content-type"]
    return response.json()


def _idem() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


def _assert_problem(response: httpx.Response, status: int, *codes: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON, response.headers
    body = response.json()
    assert body["status"] == status and body["code"] in codes, body
    assert body["title"] and body["detail"] and body["type"].startswith("https://")
    assert "Traceback" not in response.text and 'File "' not in response.text


# -- the document and the docs page ----------------------------------------------------------------


def test_the_openapi_document_is_served_as_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    assert document["info"]["title"] == "EchoTransact" and document["paths"]


def test_every_operation_has_an_id_and_a_security_requirement(document: dict[str, Any]) -> None:
    schemes = set(document["components"]["securitySchemes"])
    operation_ids = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation.get("operationId"), f"{method.upper()} {path} has no operationId"
            operation_ids.append(operation["operationId"])
            if path.startswith("/health/"):
                continue
            security = operation.get("security", document.get("security"))
            assert security, f"{method.upper()} {path} has no security requirement"
            assert all(set(requirement) <= schemes and requirement for requirement in security), security
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique"


def test_the_interactive_docs_are_served(served: Api) -> None:
    page = httpx.get(f"{served.url}/schema")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower() and "EchoTransact" in page.text


# -- bad requests: a problem with a stable code, never a 500 ---------------------------------------


@dataclass(frozen=True)
class BadRequest:
    method: str
    path: str
    status: int
    codes: tuple[str, ...]
    who: str | None = "a"
    content: bytes | None = None
    content_type: str | None = "application/json"
    params: dict[str, str] | None = None
    chunked: bool = False


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


SESSIONS = "/v1/payment-sessions"
BAD_REQUESTS: dict[str, Any] = {
    "body over 64 KiB": BadRequest("POST", SESSIONS, 413, ("request_too_large",),
                                   content=b'{"pad": "' + b"x" * MAX_BODY_BYTES + b'"}'),
    "body over 64 KiB, chunked": BadRequest("POST", SESSIONS, 413, ("request_too_large",),
                                            content=b" " * (MAX_BODY_BYTES + 1024), chunked=True),
    # Who is calling is checked before the body is read.
    "body over 64 KiB, no key": BadRequest("POST", SESSIONS, 401, ("unauthorized",), who=None,
                                           content=b" " * (MAX_BODY_BYTES + 1)),
    "text/plain": BadRequest("POST", SESSIONS, 415, ("unsupported_media_type",), content=b"pizza",
                             content_type="text/plain"),
    "form": BadRequest("POST", SESSIONS, 415, ("unsupported_media_type",), content=b"amount=1",
                       content_type="application/x-www-form-urlencoded"),
    "body without a content type": BadRequest("POST", SESSIONS, 415, ("unsupported_media_type",),
                                              content=b'{"amount": 1}', content_type=None),
    "unknown route": BadRequest("GET", "/v1/pizzas", 404, ("not_found",)),
    "unknown route, no key": BadRequest("GET", "/v1/pizzas", 404, ("not_found",), who=None),
    "not a uuid in the path": BadRequest("GET", "/v1/payments/not-a-uuid", 404, ("not_found",)),
    "method not allowed": BadRequest("DELETE", "/v1/payments", 405, ("method_not_allowed",)),
    "malformed JSON": BadRequest("POST", SESSIONS, 400, ("validation_error", "bad_request"),
                                 content=b'{"amount": '),
    "malformed JSON, charset": BadRequest("POST", SESSIONS, 400, ("validation_error", "bad_request"),
                                          content=b'{"amount": 1,}',
                                          content_type="application/json; charset=utf-8"),
    "a JSON array": BadRequest("POST", SESSIONS, 400, ("validation_error",), content=b"[1, 2]"),
    "JSON null": BadRequest("POST", SESSIONS, 400, ("validation_error",), content=b"null"),
    "an integer beyond 64 bits": BadRequest("POST", SESSIONS, 400, ("validation_error",),
                                            content=b'{"amount": 100000000000000000000000000000}'),
    "not a number in the query": BadRequest("GET", "/v1/payments", 400, ("validation_error",),
                                            params={"limit": "many"}),
    "a date that does not exist": BadRequest("GET", "/v1/analytics/funnel", 400, ("validation_error",),
                                             params={"from": "2026-13-01", "to": "2026-01-01"}),
    "an Idempotency-Key with a tab": BadRequest("POST", f"/v1/payments/{uuid.UUID(int=1)}/void", 400,
                                                ("invalid_idempotency_key",), content=b"{}"),
    "bytes that are not UTF-8": BadRequest("POST", SESSIONS, 400, ("validation_error", "bad_request"),
                                           content=b'{"amount": 1, "currency": "\xff\xfe"}'),
    "JSON nested 5000 deep": BadRequest("POST", SESSIONS, 400, ("validation_error", "bad_request"),
                                        content=_nested(5000)),
    "an audit export to the last day there is": BadRequest("GET", "/v1/audit/export", 400, ("validation_error",),
                                                           who="compliance", params={"to": "9999-12-31"}),
}


def _send(served: Api, case: BadRequest) -> httpx.Response:
    headers = {**_idem()}
    if case.content_type:
        headers["Content-Type"] = case.content_type
    if case.codes == ("invalid_idempotency_key",):
        headers["Idempotency-Key"] = "tab\there"
    content: Any = case.content
    if case.chunked and case.content is not None:
        data = case.content
        content = (data[i:i + 8192] for i in range(0, len(data), 8192))  # no Content-Length
    with served.client(case.who) as client:
        return client.request(case.method, case.path, content=content, headers=headers, params=case.params)


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_a_problem_never_a_500(served: Api, case: BadRequest) -> None:
    _assert_problem(_send(served, case), case.status, *case.codes)


@pytest.mark.parametrize("field", ["order reference", "metadata value", "merchant name"])
def test_a_nul_character_is_refused_before_it_can_stop_the_read_models(api: Api, field: str) -> None:
    body = session_body()
    if field == "order reference":
        body["order"]["reference"] = "ORDER\x00-1"
        who, path = "a", SESSIONS
    elif field == "metadata value":
        body["metadata"] = {"note": "ring\x00twice"}
        who, path = "a", SESSIONS
    else:
        body, who, path = {"name": "Pizza\x00Palace"}, "admin", "/v1/merchants"
    with api.client(who) as client:
        response = client.post(path, json=body, headers=_idem())
    if response.status_code in (200, 201):
        api.project()  # accepted (perhaps cleaned): then it must not stop the projections
    else:
        assert response.status_code in (400, 422), response.text


# -- the rate limit --------------------------------------------------------------------------------


@pytest.fixture
def limited_api(settings: Settings, database_url: str, servers: ServerURLs, clock: ManualClock,
                processor: SandboxProcessor) -> Iterator[Api]:
    yield from make_api(settings.replace(rate_limit_per_minute=3), database_url, servers, clock,
                        processor)


def test_the_fourth_request_in_a_minute_is_rate_limited(limited_api: Api) -> None:
    # Fresh keys: the limiter counts in the shared Redis by key id, and the fixture's keys have the
    # same ids in every test database.
    ledger = limited_api.services.ledger
    key, other_key = (ledger.issue_api_key(f"rate-{uuid.uuid4()}", role="merchant",
                                           merchant_id=limited_api.merchants["a"])[1] for _ in range(2))
    if time.time() % 60 > 50:  # the limiter counts per clock minute: keep all four in one window
        time.sleep(61 - time.time() % 60)
    with httpx.Client(base_url=limited_api.url, headers={"Authorization": f"Bearer {key}"}) as client:
        allowed = [client.get("/v1/balances").status_code for _ in range(3)]
        limited = client.get("/v1/balances")
        command = client.post(SESSIONS, json=session_body(), headers=_idem())
    assert allowed == [200, 200, 200]
    _assert_problem(limited, 429, "rate_limited")
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    _assert_problem(command, 429, "rate_limited")  # refused before it runs
    with psycopg.connect(limited_api.services.health.database_url) as conn:
        opened = conn.execute(
            "SELECT count(*) FROM command_log WHERE command_name = 'open_session'").fetchone()
    assert opened == (0,)
    other = httpx.get(f"{limited_api.url}/v1/balances", headers={"Authorization": f"Bearer {other_key}"})
    assert other.status_code == 200  # the limit is per key


# -- every operation's success response matches the document ---------------------------------------


@dataclass(frozen=True)
class ValidCall:
    who: str | None  # None: no key (a processor's notification, signed instead: ``signed``)
    prepare: Callable[[Api], tuple[dict[str, Any], Any, dict[str, Any]]]  # path parameters, body, query
    signed: bool = False  # the body (bytes) gets the processor's signature


def _window() -> dict[str, str]:
    today = datetime.now(UTC).date()
    return {"from": (today - timedelta(days=7)).isoformat(), "to": (today + timedelta(days=1)).isoformat()}


def _session(api: Api) -> str:
    with api.client("a") as client:
        opened = client.post(SESSIONS, json=session_body(), headers=_idem())
    assert opened.status_code == 201, opened.text
    return str(opened.json()["id"])


def _payment(api: Api, captured: bool = False) -> str:
    payment = paid_payment(api, "a", tag=uuid.uuid4().hex)
    if captured:
        api.services.ledger.capture_payment(f"capture-{payment}", payment, amount_minor=None,
                                            merchant_id=api.merchants["a"])
    api.project()
    return str(payment)


def _balance_history(api: Api) -> dict[str, Any]:
    """Merchant A's payable by the hour over the last two, after a capture of its own (from a phone
    of its own: the module's many payments of the usual phone trip the velocity rule)."""
    payment = paid_payment(api, "a", tag=uuid.uuid4().hex, phone="+14155550166")
    api.services.ledger.capture_payment(f"capture-{payment}", payment)
    api.project()
    now = datetime.now(UTC)
    return {"account": f"merchant:{api.merchants['a']}:payable", "from": (now - timedelta(hours=2)).isoformat(),
            "to": now.isoformat(), "granularity": "hour"}


def _projected_session(api: Api) -> str:
    session = _session(api)
    api.project()
    return session


NO_BODY = NOT_SET


def _listed_payment(api: Api) -> dict[str, str]:
    _payment(api)
    return {}


def _reconciliation(api: Api) -> str:
    """A processor's day with a discrepancy, saved through the ledger (a new day each time)."""
    day = datetime.now(UTC).date() - timedelta(days=1 + len(_reconciled_days))
    _reconciled_days.append(day)
    reconciliation = reconcile_day(api.services.ledger, day=day, mismatched=1, late=1)
    api.project()
    return str(reconciliation)


_reconciled_days: list[date] = []


def _payout(api: Api) -> str:
    """Merchant A's payout of today (made over a newly settled payment the first time)."""
    if id(api) in _payouts:  # one a day, and every new payment counts against the phone's velocity
        return _payouts[id(api)]
    ledger = api.services.ledger
    # A phone of its own: the module's many payments of the usual phone trip the velocity rule.
    payment = paid_payment(api, "a", tag=f"payout-{uuid.uuid4().hex}", phone="+14155550188")
    ledger.capture_payment(f"capture-{payment}", payment)
    ledger.settle_payment(payment, "sandbox:deposit")
    api.project()
    payout = ledger.create_payout(api.merchants["a"], "USD", datetime.now(UTC).date()).result["payout_id"]
    api.project()
    _payouts[id(api)] = str(payout)
    return str(payout)


_payouts: dict[int, str] = {}


def _dispute(api: Api) -> str:
    """A new dispute of merchant A (a payment of its own on a phone of its own), notified by the processor."""
    _disputes.append(str(disputed_payment(api, f"+1415555{len(_disputes) + 101:04d}")))
    return _disputes[-1]


_disputes: list[str] = []


def _listed_dispute(api: Api) -> dict[str, str]:
    _dispute(api)
    return {}


def _listed_payout(api: Api) -> dict[str, str]:
    _payout(api)
    return {}


def _processor_event(api: Api) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    """A dispute the sandbox processor notifies on a payment captured through it."""
    ledger = api.services.ledger
    # A phone of its own: the module's many payments of the usual phone trip the velocity rule.
    paid = paid_payment(api, "a", tag=f"dispute-{uuid.uuid4().hex}", phone="+14155550177")
    ledger.capture_payment(f"capture-{paid}", paid)
    api.project()
    payment = ledger.get_payment(paid)
    assert payment.capture_reference is not None
    now = datetime.now(UTC)
    event = ProcessorEvent(event_id=f"evt_{uuid.uuid4().hex}", type=DISPUTE_OPENED, created_at=now,
                           payment_reference=payment.capture_reference, dispute_id=f"dp_{uuid.uuid4().hex}",
                           reason="fraudulent", amount_minor=500, currency=payment.currency,
                           due_by=now + timedelta(days=7))
    return {"processor": "sandbox"}, event_body(event), {}


def _listed_reconciliation(api: Api) -> dict[str, str]:
    _reconciliation(api)
    return {}


VALID_CALLS: dict[str, ValidCall] = {
    "getLiveness": ValidCall("a", lambda api: ({}, NO_BODY, {})),
    "getReadiness": ValidCall("a", lambda api: ({}, NO_BODY, {})),
    "createPaymentSession": ValidCall("a", lambda api: ({}, session_body(), {})),
    "getPaymentSession": ValidCall("a", lambda api: ({"session_id": _projected_session(api)}, NO_BODY, {})),
    "cancelPaymentSession": ValidCall("a", lambda api: ({"session_id": _session(api)}, {"reason": "hung up"},
                                                        {})),
    "listPayments": ValidCall("a", lambda api: (_listed_payment(api), NO_BODY, {"limit": 5})),
    "getPayment": ValidCall("a", lambda api: ({"payment_id": _payment(api)}, NO_BODY, {})),
    "capturePayment": ValidCall("a", lambda api: ({"payment_id": _payment(api)}, {"amount": 1_000}, {})),
    "voidPayment": ValidCall("a", lambda api: ({"payment_id": _payment(api)}, {"reason": "no dough"}, {})),
    "refundPayment": ValidCall("a", lambda api: ({"payment_id": _payment(api, captured=True)},
                                                 {"amount": 500}, {})),
    "listBalances": ValidCall("a", lambda api: ({}, NO_BODY, {"as_of": datetime.now(UTC).isoformat()})),
    "getBalanceHistory": ValidCall("a", lambda api: ({}, NO_BODY, _balance_history(api))),
    "listPayouts": ValidCall("a", lambda api: (_listed_payout(api), NO_BODY, {"limit": 5, "currency": "USD"})),
    "getPayout": ValidCall("a", lambda api: ({"payout_id": _payout(api)}, NO_BODY, {})),
    "getPayoutLinesCsv": ValidCall("compliance", lambda api: ({"payout_id": _payout(api)}, NO_BODY, {})),
    "createPayout": ValidCall("a", lambda api: (_listed_payout(api), {"currency": "USD"}, {})),
    "listDisputes": ValidCall("a", lambda api: (_listed_dispute(api), NO_BODY, {"status": "needs_response"})),
    "getDispute": ValidCall("admin", lambda api: ({"dispute_id": _dispute(api)}, NO_BODY, {})),
    "getDisputeEvidencePack": ValidCall("a", lambda api: ({"dispute_id": _dispute(api)}, NO_BODY, {})),
    "submitDisputeEvidence": ValidCall("a", lambda api: ({"dispute_id": _dispute(api)},
                                                         {"product_description": "Pizza", "submit": True}, {})),
    "acceptDispute": ValidCall("a", lambda api: ({"dispute_id": _dispute(api)}, NO_BODY, {})),
    "getDisputeRates": ValidCall("analyst", lambda api: ({}, NO_BODY, _window())),
    "getFunnel": ValidCall("analyst", lambda api: ({}, NO_BODY, _window())),
    "getVolume": ValidCall("analyst", lambda api: ({}, NO_BODY, {**_window(), "granularity": "week"})),
    "listAuditEvents": ValidCall("compliance", lambda api: ({}, NO_BODY, {"limit": 5})),
    "verifyAudit": ValidCall("compliance", lambda api: ({}, NO_BODY, {})),
    "exportAudit": ValidCall("compliance", lambda api: ({}, NO_BODY, {})),
    "listReconciliations": ValidCall("compliance", lambda api: (_listed_reconciliation(api), NO_BODY,
                                                                {"has_discrepancies": True, "limit": 5})),
    "getReconciliation": ValidCall("admin", lambda api: ({"reconciliation_id": _reconciliation(api)}, NO_BODY, {})),
    "createMerchant": ValidCall("admin", lambda api: ({}, {"name": "Trattoria"}, {})),
    "eraseCustomer": ValidCall("admin", lambda api: ({}, {"customer_phone": "+14155557001",
                                                          "reason": "the customer asked"}, {})),
    "exportCustomer": ValidCall("admin", lambda api: ({}, {"customer_phone": "+14155557002"}, {})),
    "getMerchant": ValidCall("admin", lambda api: ({"merchant_id": str(api.merchants["b"])}, NO_BODY, {})),
    "updateMerchant": ValidCall("admin", lambda api: ({"merchant_id": str(api.merchants["b"])},
                                                      {"webhook_url": "https://b.example/hooks"}, {})),
    "createMerchantKey": ValidCall("admin", lambda api: ({"merchant_id": str(api.merchants["b"])},
                                                         {"label": "till 2"}, {})),
    "rotateWebhookSecret": ValidCall("a", lambda api: ({"merchant_id": str(api.merchants["a"])},
                                                       {"overlap_s": 3600}, {})),
    "receiveProcessorEvent": ValidCall(None, _processor_event, signed=True),
}


@pytest.fixture(scope="module")
def openapi(served: Api) -> OpenApiSchema:
    return schemathesis.openapi.from_url(f"{served.url}/schema/openapi.json")


@pytest.mark.parametrize("operation_id", list(VALID_CALLS))
def test_a_valid_call_gets_a_success_response_that_matches_the_document(served: Api, openapi: OpenApiSchema,
                                                                        operation_id: str) -> None:
    call = VALID_CALLS[operation_id]
    path_parameters, body, query = call.prepare(served)
    operation = openapi.find_operation_by_id(operation_id)
    case = operation.Case(path_parameters=path_parameters, body=body, query=query)
    headers = {"Authorization": f"Bearer {served.keys[call.who]}", **_idem()} if call.who else {}
    if call.signed:
        headers[SIGNATURE_HEADER] = signature_header(PROCESSOR_SECRET, body)
    response = case.call(base_url=served.url, headers=headers)
    assert 200 <= response.status_code < 300, response.text
    case.validate_response(response, checks=[response_schema_conformance])


def test_every_operation_has_a_valid_call_above(document: dict[str, Any]) -> None:
    operation_ids = {op["operationId"] for item in document["paths"].values() for op in item.values()}
    assert operation_ids == set(VALID_CALLS)


def test_the_errors_the_api_sends_are_documented_as_problems(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        if path.startswith("/health/"):
            continue
        for method, operation in item.items():
            responses = operation["responses"]
            for status in ("400", "401", "403", "429"):
                assert status in responses, f"{method.upper()} {path} does not document {status}"
                assert list(responses[status]["content"]) == [PROBLEM_JSON], (method, path, status)


# -- Schemathesis: every operation, generated input, merchant and admin keys ------------------------


MAX_EXAMPLES = 25


@dataclass
class Finding:
    operation: str
    check: str
    mode: str
    caller: str
    request: str
    status: int
    response: str
    message: str

    def __str__(self) -> str:
        return (f"{self.operation} [{self.check}] {self.mode} as {self.caller}: {self.request}"
                f" -> {self.status} {self.response[:300]}\n    {self.message[:500]}")


def _callers(path: str) -> tuple[str, ...]:
    # Merchant and admin keys for everything; the audit endpoints answer compliance keys only,
    # so without one they would never get past the 403.
    return ("a", "admin", "compliance") if path.startswith(("/v1/audit/", "/v1/reconciliations", "/v1/payouts")) \
        else ("a", "admin")


@dataclass
class Findings:
    new: dict[tuple[str, str], Finding] = dataclasses.field(default_factory=dict)


def _fuzz(served: Api, operation: APIOperation, operation_id: str, mode: str, strategy: Any,
          findings: Findings) -> None:
    """Sends each generated case with each key; keeps the first example of each (operation, check)
    instead of raising, so Hypothesis neither stops at the first failure nor spends time shrinking."""

    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        if operation_id == "getPaymentSession" and isinstance(case.query, dict):
            # A valid wait_for_position on a session that does not exist waits the full 5 s
            # (tested in test_access); keep the invalid ones, which answer at once.
            value = case.query.get("wait_for_position")
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                del case.query["wait_for_position"]
        for caller in _callers(operation.path):
            headers = {"Authorization": f"Bearer {served.keys[caller]}"}
            if operation.method.upper() in ("POST", "PATCH", "PUT"):
                headers.update(_idem())
            response = case.call(base_url=served.url, headers=headers, timeout=30)
            try:
                case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
            except (FailureGroup, Failure) as error:
                failures = error.exceptions if isinstance(error, FailureGroup) else (error,)
                for failure in failures:
                    finding = Finding(
                        operation.label, failure.title, mode, caller,
                        f"{case.method} {case.formatted_path} query={case.query} body={case.body!r:.300}",
                        response.status_code, response.text, failure.message)
                    target = findings.new
                    target.setdefault((finding.operation, finding.check), finding)

    run()


@pytest.fixture(scope="module")
def fuzz_findings(served: Api, openapi: OpenApiSchema, document: dict[str, Any]) -> Findings:
    """Schemathesis over every operation, once for the module: positive input, negative input, and
    positive again with the ids of merchant A's real session and payment (random ids only ever
    reach the 404)."""
    findings = Findings()
    operation_ids = {f"{method.upper()} {path}": op["operationId"]
                     for path, item in document["paths"].items() for method, op in item.items()}
    real_ids = {"session_id": _session(served), "payment_id": _payment(served),
                "merchant_id": str(served.merchants["b"]), "reconciliation_id": _reconciliation(served),
                "payout_id": _payout(served), "dispute_id": _dispute(served)}
    for result in openapi.get_all_operations():
        assert isinstance(result, Ok), result  # the document itself is valid
        operation = result.ok()
        strategies = {"positive": operation.as_strategy(GenerationMode.POSITIVE),
                      "negative": operation.as_strategy(GenerationMode.NEGATIVE)}
        ids = {name: value for name, value in real_ids.items() if f"{{{name}}}" in operation.path}
        if ids:
            strategies["positive, real ids"] = operation.as_strategy(GenerationMode.POSITIVE,
                                                                     path_parameters=ids)
        for mode, strategy in strategies.items():
            _fuzz(served, operation, operation_ids[operation.label], mode, strategy, findings)
    return findings


def test_schemathesis_finds_no_server_error(fuzz_findings: Findings) -> None:
    errors = [f for f in fuzz_findings.new.values() if f.status >= 500 or f.check == "Server error"]
    assert not errors, "\n".join(map(str, errors))


def test_schemathesis_finds_every_response_as_documented(fuzz_findings: Findings) -> None:
    assert not fuzz_findings.new, "\n".join(map(str, fuzz_findings.new.values()))
