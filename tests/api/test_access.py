"""Who may call what, over real HTTP: every endpoint without a key, with a bad key and with each
role's key (one table, the issue's role rules), and a merchant's key against another merchant's
data, which must look exactly like data that does not exist."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
import pytest

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.dev.servers import ServerURLs
from api.settings import Settings
from projections.views import Scope
from tests.api.conftest import Api, disputed_payment, make_api, paid_payment, session_body
from tests.projections.test_reconciliations import reconcile_day

PROBLEM_JSON = "application/problem+json"
PHONE = "+14155550123"
# A phone number in clear (+14155550123) or masked (+1******0123): an analyst sees neither.
PHONE_LIKE = re.compile(r"\+\d[\d*]{5,}|\*{4,}")
ROLES = ("a", "analyst", "compliance", "admin")  # "a" is merchant A's key


# -- one API for the module: every case below is a request or two, not a new server -------------


@pytest.fixture(scope="module")
def api(module_database: str, servers: ServerURLs) -> Iterator[Api]:
    # No rate limit: its counters live in the run's one Redis under key ids that are the same in
    # every test database, and this module alone sends a few hundred requests.
    settings = Settings(hash_key=b"h" * 32, master_key=b"m" * 32, encryption_key=b"e" * 32, rate_limit_per_minute=0)
    yield from make_api(settings, module_database, servers, ManualClock(), SandboxProcessor())


@dataclass(frozen=True)
class World:
    """Merchant A's resources that every case may point at (forbidden calls never change them)."""

    session: UUID
    payment: UUID
    merchant: UUID
    reconciliation: UUID  # the platform's, no merchant's
    payout: UUID
    dispute: UUID

    def ids(self) -> dict[str, str]:
        return {"session": str(self.session), "payment": str(self.payment), "merchant": str(self.merchant),
                "reconciliation": str(self.reconciliation), "payout": str(self.payout), "dispute": str(self.dispute)}


@pytest.fixture(scope="module")
def world(api: Api) -> World:
    with api.client("a") as client:
        opened = client.post("/v1/payment-sessions", json=session_body(), headers=_idem())
        assert opened.status_code == 201, opened.text
    payment = paid_payment(api, "a", tag=f"world-{uuid.uuid4().hex}")
    reconciliation = reconcile_day(api.services.ledger, mismatched=1)
    api.project()
    payout = UUID(today_payout(api)["payout_id"])
    api.project()
    return World(UUID(opened.json()["id"]), payment, api.merchants["a"], reconciliation, payout,
                 UUID(_open_dispute(api)["dispute"]))


def _open_dispute(api: Api) -> dict[str, str]:
    """A dispute of merchant A, notified by the processor, on a payment of its own."""
    return {"dispute": str(disputed_payment(api, "+14155550177"))}


def today_payout(api: Api) -> dict[str, Any]:
    """Merchant A's payout of today, over a payment settled for it."""
    ledger = api.services.ledger
    payment = paid_payment(api, "a", tag=f"payout-{uuid.uuid4().hex}")
    ledger.capture_payment(f"capture-{payment}", payment)
    ledger.settle_payment(payment, "sandbox:deposit")
    api.project()
    return ledger.create_payout(api.merchants["a"], "USD", datetime.now(UTC).date()).result


def _idem() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


# -- fresh resources for a command that is allowed to run (it changes what it acts on) -----------


def _open_session(api: Api) -> dict[str, str]:
    with api.client("a") as client:
        opened = client.post("/v1/payment-sessions", json=session_body(), headers=_idem())
    assert opened.status_code == 201, opened.text
    return {"session": opened.json()["id"]}


def _authorized_payment(api: Api) -> dict[str, str]:
    return {"payment": str(paid_payment(api, "a", tag=uuid.uuid4().hex))}


def _captured_payment(api: Api) -> dict[str, str]:
    payment = paid_payment(api, "a", tag=uuid.uuid4().hex)
    with api.client("a") as client:
        captured = client.post(f"/v1/payments/{payment}/capture", headers=_idem())
    assert captured.status_code == 200, captured.text
    return {"payment": str(payment)}


def _window() -> dict[str, str]:
    today = datetime.now(UTC).date()
    return {"from": (today - timedelta(days=30)).isoformat(), "to": (today + timedelta(days=1)).isoformat()}


@dataclass(frozen=True)
class Endpoint:
    operation_id: str
    method: str
    path: str  # {session}, {payment} and {merchant} are filled in from the world
    allowed: frozenset[str]
    success: int = 200
    body: dict[str, Any] | None = None
    params: dict[str, str] = field(default_factory=dict)
    fresh: Callable[[Api], dict[str, str]] | None = None  # what an allowed command acts on

    @property
    def is_command(self) -> bool:
        return self.method in ("POST", "PATCH")

    def send(self, client: httpx.Client, ids: dict[str, str]) -> httpx.Response:
        headers = _idem() if self.is_command else {}
        # Parameters may name the world's ids too, and {now}: the moment of the request.
        params = {k: v.format(**ids, now=datetime.now(UTC).isoformat()) for k, v in self.params.items()}
        return client.request(self.method, self.path.format(**ids), json=self.body, params=params,
                              headers=headers)


MERCHANT = frozenset({"a"})
MERCHANT_READS = frozenset({"a", "admin"})
ANALYTICS = frozenset({"a", "analyst", "admin"})
COMPLIANCE = frozenset({"compliance"})
ADMIN = frozenset({"admin"})
PLATFORM = frozenset({"compliance", "admin"})
PAYOUT_READS = frozenset({"a", "compliance", "admin"})

ENDPOINTS = [
    Endpoint("getPaymentSession", "GET", "/v1/payment-sessions/{session}", MERCHANT_READS),
    Endpoint("createPaymentSession", "POST", "/v1/payment-sessions", MERCHANT, 201, body=session_body()),
    Endpoint("cancelPaymentSession", "POST", "/v1/payment-sessions/{session}/cancel", MERCHANT,
             body={"reason": "customer hung up"}, fresh=_open_session),
    Endpoint("listPayments", "GET", "/v1/payments", MERCHANT_READS),
    Endpoint("getPayment", "GET", "/v1/payments/{payment}", MERCHANT_READS),
    Endpoint("capturePayment", "POST", "/v1/payments/{payment}/capture", MERCHANT, body={},
             fresh=_authorized_payment),
    Endpoint("voidPayment", "POST", "/v1/payments/{payment}/void", MERCHANT, body={"reason": "out of stock"},
             fresh=_authorized_payment),
    Endpoint("refundPayment", "POST", "/v1/payments/{payment}/refunds", MERCHANT, 201,
             body={"amount": 100, "reason": "cold"}, fresh=_captured_payment),
    Endpoint("listBalances", "GET", "/v1/balances", MERCHANT_READS),
    Endpoint("getBalanceHistory", "GET", "/v1/balances/history", MERCHANT_READS,
             params={"account": "merchant:{merchant}:payable",
                     "from": (datetime.now(UTC) - timedelta(days=30)).isoformat(), "to": "{now}"}),
    Endpoint("listDisputes", "GET", "/v1/disputes", PAYOUT_READS),
    Endpoint("getDispute", "GET", "/v1/disputes/{dispute}", PAYOUT_READS),
    Endpoint("getDisputeEvidencePack", "GET", "/v1/disputes/{dispute}/evidence-pack", MERCHANT_READS),
    Endpoint("submitDisputeEvidence", "POST", "/v1/disputes/{dispute}/evidence", MERCHANT,
             body={"product_description": "Large pizza", "submit": False}, fresh=_open_dispute),
    Endpoint("acceptDispute", "POST", "/v1/disputes/{dispute}/accept", MERCHANT, fresh=_open_dispute),
    Endpoint("getDisputeRates", "GET", "/v1/analytics/disputes", ANALYTICS, params=_window()),
    Endpoint("listPayouts", "GET", "/v1/payouts", PAYOUT_READS),
    Endpoint("getPayout", "GET", "/v1/payouts/{payout}", PAYOUT_READS),
    Endpoint("getPayoutLinesCsv", "GET", "/v1/payouts/{payout}/lines.csv", PAYOUT_READS),
    # Today's payout exists (the world's): asking again answers it.
    Endpoint("createPayout", "POST", "/v1/payouts", MERCHANT, 201, body={"currency": "USD"}),
    Endpoint("getFunnel", "GET", "/v1/analytics/funnel", ANALYTICS, params=_window()),
    Endpoint("getVolume", "GET", "/v1/analytics/volume", ANALYTICS, params=_window()),
    Endpoint("listAuditEvents", "GET", "/v1/audit/events", COMPLIANCE),
    Endpoint("verifyAudit", "GET", "/v1/audit/verify", COMPLIANCE),
    Endpoint("exportAudit", "GET", "/v1/audit/export", COMPLIANCE),
    Endpoint("listReconciliations", "GET", "/v1/reconciliations", PLATFORM),
    Endpoint("getReconciliation", "GET", "/v1/reconciliations/{reconciliation}", PLATFORM),
    Endpoint("createMerchant", "POST", "/v1/merchants", ADMIN, 201, body={"name": "Trattoria"}),
    Endpoint("getMerchant", "GET", "/v1/merchants/{merchant}", ADMIN),
    Endpoint("updateMerchant", "PATCH", "/v1/merchants/{merchant}", ADMIN, body={"name": "Renamed"}),
    Endpoint("createMerchantKey", "POST", "/v1/merchants/{merchant}/keys", ADMIN, 201,
             body={"label": "till 2"}),
    # Merchant A rotates its own secret; an admin any merchant's (the world's is A).
    Endpoint("rotateWebhookSecret", "POST", "/v1/merchants/{merchant}/webhook-secret/rotate", MERCHANT_READS, 201,
             body={}),
    # A phone nobody used: the erasure records nothing, the export finds nothing.
    Endpoint("eraseCustomer", "POST", "/v1/customers/erasures", ADMIN,
             body={"customer_phone": "+14155550199", "reason": "asked by phone"}),
    Endpoint("exportCustomer", "POST", "/v1/customers/exports", ADMIN, body={"customer_phone": "+14155550199"}),
]
BY_ID = {e.operation_id: e for e in ENDPOINTS}
# Processors sign their notifications instead of sending a key: no role reaches this one or is
# refused it, so it is outside the role matrix (its signatures: tests/integration/test_processor_events.py).
SIGNED_BY_PROCESSORS = frozenset({"receiveProcessorEvent"})


def _is_problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert (body["status"], body["code"]) == (status, code), body
    assert "Traceback" not in response.text


def test_the_table_covers_every_operation_of_the_api(api: Api) -> None:
    document = httpx.get(f"{api.url}/schema/openapi.json").json()
    operations = {op["operationId"] for path, item in document["paths"].items()
                  if not path.startswith("/health") for op in item.values()}
    assert operations == set(BY_ID) | SIGNED_BY_PROCESSORS


# -- no key, a bad key -----------------------------------------------------------------------------


BAD_CREDENTIALS = {
    "no key": {},
    "unknown key": {"Authorization": "Bearer et_live_not-a-key-we-issued"},
    "bearer without a key": {"Authorization": "Bearer"},
    "not bearer": {"Authorization": "Basic YTpi"},
}


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS))
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.operation_id)
def test_no_key_or_a_bad_key_is_401_with_a_challenge(api: Api, world: World, endpoint: Endpoint,
                                                     credentials: str) -> None:
    with httpx.Client(base_url=api.url, headers=BAD_CREDENTIALS[credentials]) as client:
        response = endpoint.send(client, world.ids())
    _is_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer ")
    if credentials == "unknown key":
        assert 'error="invalid_token"' in response.headers["www-authenticate"]


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e.is_command], ids=lambda e: e.operation_id)
def test_without_a_key_even_a_malformed_body_is_401(api: Api, world: World, endpoint: Endpoint) -> None:
    path = endpoint.path.format(**world.ids())
    with httpx.Client(base_url=api.url) as client:
        response = client.request(endpoint.method, path, content=b'{"amount": ',
                                  headers={"Content-Type": "application/json", **_idem()})
    _is_problem(response, 401, "unauthorized")


@pytest.mark.parametrize("who", [None, *ROLES])
def test_a_key_is_no_signature_for_the_processors_endpoint(api: Api, who: str | None) -> None:
    with api.client(who) as client:
        response = client.post("/v1/processor-events/sandbox", json={"id": "evt_1"}, headers=_idem())
    _is_problem(response, 401, "invalid_signature")
    assert response.headers["www-authenticate"].startswith("Processor-Signature ")  # no key would do


# -- each role against each endpoint ---------------------------------------------------------------


@pytest.mark.parametrize("who", ROLES)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.operation_id)
def test_each_role_reaches_only_its_endpoints(api: Api, world: World, endpoint: Endpoint, who: str) -> None:
    allowed = who in endpoint.allowed
    ids = world.ids()
    if allowed and endpoint.fresh is not None:
        ids |= endpoint.fresh(api)
    with api.client(who) as client:
        response = endpoint.send(client, ids)
    if allowed:
        assert response.status_code == endpoint.success, response.text
    else:
        _is_problem(response, 403, "forbidden")
    if who == "analyst":
        assert not PHONE_LIKE.search(response.text), response.text


def test_analysts_see_numbers_without_personal_data(api: Api, world: World) -> None:
    with api.client("analyst") as client:
        funnel = client.get("/v1/analytics/funnel", params=_window())
        by_platform = client.get("/v1/analytics/funnel", params={**_window(), "voice_platform": "alexa",
                                                                 "merchant_id": str(api.merchants["a"])})
        volume = client.get("/v1/analytics/volume", params={**_window(), "granularity": "month"})
    assert funnel.status_code == by_platform.status_code == volume.status_code == 200
    assert sum(row["opened"] for row in funnel.json()["data"]) >= 1  # there is data to leak, and none leaks
    assert by_platform.json()["data"] and volume.json()["data"]
    for response in (funnel, by_platform, volume):
        assert not PHONE_LIKE.search(response.text), response.text


def test_compliance_reads_the_audit_trail_with_the_phone_masked(api: Api, world: World) -> None:
    with api.client("compliance") as client:
        events = client.get("/v1/audit/events", params={"aggregate_id": str(world.session)})
        export = client.get("/v1/audit/export", params={"aggregate_id": str(world.session)})
        verified = client.get("/v1/audit/verify")
    assert events.status_code == export.status_code == verified.status_code == 200
    assert events.json()["data"] and export.text.strip()
    assert export.headers["content-type"].startswith("application/x-ndjson")
    assert verified.json()["ok"] is True
    for response in (events, export):
        assert PHONE not in response.text


def test_the_audit_reports_read_through_the_views_as_the_callers_scope(api: Api, world: World) -> None:
    """Verify and export run as the reader role under row-level security, like every other read:
    a merchant's scope exports its own rows only, and cannot verify a chain it sees only part of."""
    views, other = api.services.views, api.merchants["b"]  # B has its registration's rows, nothing more
    everything = list(views.audit_export(Scope("compliance")))
    mine = list(views.audit_export(Scope("merchant", world.merchant)))
    assert {row["merchant_id"] for row in mine} == {str(world.merchant)}
    assert str(other) in {row["merchant_id"] for row in everything}
    assert [row["position"] for row in mine] == sorted(row["position"] for row in mine)
    assert {row["position"] for row in mine} < {row["position"] for row in everything}
    with pytest.raises(ValueError, match="audit chain"):
        views.verify_audit_chain(Scope("merchant", world.merchant))
    report = views.verify_audit_chain(Scope("compliance"))
    assert report.ok and report.rows_checked + report.unchained == len(everything)


# -- another merchant's data is indistinguishable from missing data --------------------------------


def _normalized(response: httpx.Response, *ids: str) -> dict[str, Any]:
    body = {k: v for k, v in response.json().items() if k not in ("instance", "request_id")}
    text = repr(body)
    for value in ids:
        text = text.replace(value, "<id>")
    return {"status": response.status_code, "content_type": response.headers["content-type"], "body": text}


CROSS_MERCHANT = ["getPaymentSession", "cancelPaymentSession", "getPayment", "capturePayment", "voidPayment",
                  "refundPayment", "getBalanceHistory"]


@pytest.mark.parametrize("operation_id", CROSS_MERCHANT)
def test_another_merchants_resource_answers_exactly_like_a_missing_one(api: Api, world: World,
                                                                       operation_id: str) -> None:
    endpoint = BY_ID[operation_id]
    missing = {"session": str(uuid.uuid4()), "payment": str(uuid.uuid4()), "merchant": str(uuid.uuid4())}
    with api.client("b") as client:
        theirs = endpoint.send(client, world.ids())
        absent = endpoint.send(client, missing)
    assert theirs.status_code == 404 and theirs.json()["code"] == "not_found", theirs.text
    assert _normalized(theirs, *world.ids().values()) == _normalized(absent, *missing.values())


def test_waiting_for_a_position_does_not_reveal_another_merchants_session(api: Api, world: World) -> None:
    # This read falls back to the write model when the read model is behind: the fallback must
    # apply the merchant's scope too.
    missing = str(uuid.uuid4())
    with api.client("b") as client:
        theirs = client.get(f"/v1/payment-sessions/{world.session}", params={"wait_for_position": 1})
        absent = client.get(f"/v1/payment-sessions/{missing}", params={"wait_for_position": 1})
    assert theirs.status_code == 404, theirs.text
    assert _normalized(theirs, str(world.session)) == _normalized(absent, missing)


def test_another_merchants_ids_and_numbers_stay_out_of_reach(api: Api, world: World) -> None:
    with api.client("b") as client:
        cursor_theirs = client.get("/v1/payments", params={"starting_after": str(world.payment)})
        cursor_missing = client.get("/v1/payments", params={"starting_after": str(uuid.uuid4())})
        listed = client.get("/v1/payments")
        balances = client.get("/v1/balances")
        funnel = client.get("/v1/analytics/funnel", params={**_window(), "merchant_id": str(world.merchant)})
        volume = client.get("/v1/analytics/volume", params={**_window(), "merchant_id": str(world.merchant)})
    assert cursor_theirs.status_code == 400
    missing_cursor = cursor_missing.url.params["starting_after"]
    assert _normalized(cursor_theirs, str(world.payment)) == _normalized(cursor_missing, missing_cursor)
    assert listed.json()["data"] == [] and balances.json()["data"] == []
    # Asking for A's analytics with B's key gives B's own (empty) numbers, not A's.
    assert funnel.json()["data"] == [] and volume.json()["data"] == []
    with api.client("a") as client:  # ...while A does have numbers there
        assert client.get("/v1/analytics/funnel", params=_window()).json()["data"]


def test_another_merchants_failed_commands_change_nothing(api: Api, world: World) -> None:
    ledger = api.services.ledger
    before = (ledger.get_session(world.session).version, ledger.get_payment(world.payment).version)
    with api.client("b") as client:
        for operation_id in ("cancelPaymentSession", "capturePayment", "voidPayment", "refundPayment"):
            assert BY_ID[operation_id].send(client, world.ids()).status_code == 404
    assert (ledger.get_session(world.session).version, ledger.get_payment(world.payment).version) == before
    assert ledger.get_payment(world.payment).status == "authorized"


def test_a_missing_merchant_is_404_for_an_admin(api: Api) -> None:
    with api.client("admin") as client:
        response = client.get(f"/v1/merchants/{uuid.uuid4()}")
    _is_problem(response, 404, "not_found")

