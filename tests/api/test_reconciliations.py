"""GET /v1/reconciliations and /v1/reconciliations/{id} over real HTTP, on reconciliations saved
through the ledger and projected: filters, cursor pagination, a day with every finding
(discrepancies first), who may read them (compliance and admin), and the problems."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from uuid import UUID

import httpx
import pytest

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.dev.servers import ServerURLs
from api.settings import Settings
from tests.api.conftest import Api, make_api
from tests.projections.test_reconciliations import DAY, reconcile_day

PROBLEM_JSON = "application/problem+json"
D1, D2, D3 = DAY - timedelta(days=2), DAY - timedelta(days=1), DAY


@pytest.fixture(scope="module")
def api(module_database: str, servers: ServerURLs) -> Iterator[Api]:
    settings = Settings(hash_key=b"h" * 32, master_key=b"m" * 32, encryption_key=b"e" * 32, rate_limit_per_minute=0)
    yield from make_api(settings, module_database, servers, ManualClock(), SandboxProcessor())


@pytest.fixture(scope="module")
def days(api: Api) -> dict[str, UUID]:
    """Five reconciled days of two processors in two currencies; the tests only read them."""
    ledger = api.services.ledger
    made = {
        "primary-usd-d3": reconcile_day(ledger, processor="primary", day=D3, currency="USD", mismatched=1),
        "primary-usd-d2": reconcile_day(ledger, processor="primary", day=D2, currency="USD", matched=3),
        "secondary-eur-d3": reconcile_day(ledger, processor="secondary", day=D3, currency="EUR", missing=1),
        "secondary-usd-d1": reconcile_day(ledger, processor="secondary", day=D1, currency="USD", late=1),
        "primary-eur-d1": reconcile_day(ledger, processor="primary", day=D1, currency="EUR", matched=1, unknown=2,
                                        mismatched=1, missing=1, late=1),
    }
    api.project()
    return made


def newest_first(days: dict[str, UUID], *names: str) -> list[str]:
    """The ids of these days in the list's order: newest day first, then by id, descending."""
    when = {"d1": D1, "d2": D2, "d3": D3}
    chosen = [(when[name.rsplit("-", 1)[1]], str(days[name])) for name in names or days]
    return [i for _, i in sorted(chosen, reverse=True)]


def listed(api: Api, who: str = "compliance", **params: Any) -> httpx.Response:
    with api.client(who) as client:
        return client.get("/v1/reconciliations", params=params)


def ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [r["id"] for r in response.json()["data"]]


def is_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert (body["status"], body["code"]) == (status, code), body
    return body


def test_compliance_and_admin_list_every_day_newest_first(api: Api, days: dict[str, UUID]) -> None:
    for who in ("compliance", "admin"):
        response = listed(api, who)
        assert ids(response) == newest_first(days)
        assert response.json()["has_more"] is False and response.json()["next_starting_after"] is None
    row = next(r for r in listed(api).json()["data"] if r["id"] == str(days["primary-eur-d1"]))
    deposit = f"primary-deposit-{D1}-EUR"
    assert row == {
        "id": str(days["primary-eur-d1"]), "processor": "primary", "day": D1.isoformat(), "currency": "EUR",
        "counts": {"matched": 1, "amount_mismatch": 1, "missing_from_report": 1, "unknown_to_us": 2, "late": 1},
        "discrepancies": 4, "deposits": [{"deposit_id": deposit, "amount": row["deposits"][0]["amount"]}],
        "reconciled_at": row["reconciled_at"], "position": row["position"],
        "links": {"self": f"/v1/reconciliations/{days['primary-eur-d1']}"}, "findings": None,
    }
    # The deposit pays the lines' nets: 1,000 + 2,100 + 4,000 + 4,001 + 5,000, less 1.9% + 20 each.
    gross = (1_000, 2_100, 4_000, 4_001, 5_000)
    assert row["deposits"][0]["amount"] == sum(g - (g * 19 // 1000 + 20) for g in gross)


@pytest.mark.parametrize(("params", "expected"), [
    ({"processor": "primary"}, ("primary-usd-d3", "primary-usd-d2", "primary-eur-d1")),
    ({"processor": "nobody"}, ()),
    ({"currency": "EUR"}, ("secondary-eur-d3", "primary-eur-d1")),
    ({"date_from": D2.isoformat()}, ("primary-usd-d3", "primary-usd-d2", "secondary-eur-d3")),
    ({"date_to": D2.isoformat()}, ("primary-usd-d2", "secondary-usd-d1", "primary-eur-d1")),
    ({"date_from": D2.isoformat(), "date_to": D2.isoformat()}, ("primary-usd-d2",)),
    ({"has_discrepancies": "true"}, ("primary-usd-d3", "secondary-eur-d3", "primary-eur-d1")),
    ({"has_discrepancies": "false"}, ("primary-usd-d2", "secondary-usd-d1")),  # late alone is no discrepancy
    ({"outcome": "late"}, ("secondary-usd-d1", "primary-eur-d1")),
    ({"outcome": "unknown_to_us"}, ("primary-eur-d1",)),
    ({"processor": "primary", "currency": "USD", "has_discrepancies": "true"}, ("primary-usd-d3",)),
])
def test_the_filters(api: Api, days: dict[str, UUID], params: dict[str, str], expected: tuple[str, ...]) -> None:
    assert ids(listed(api, **params)) == (newest_first(days, *expected) if expected else [])


@pytest.mark.parametrize("params", [{}, {"has_discrepancies": "true"}, {"processor": "primary"}])
def test_cursor_pagination_walks_every_page_once(api: Api, days: dict[str, UUID], params: dict[str, str]) -> None:
    everything = ids(listed(api, **params))
    seen: list[str] = []
    after: str | None = None
    while True:
        page = listed(api, **params, limit=2, **({"starting_after": after} if after else {})).json()
        seen += [r["id"] for r in page["data"]]
        assert len(page["data"]) <= 2
        if not page["has_more"]:
            assert page["next_starting_after"] is None
            break
        after = page["next_starting_after"]
        assert after == page["data"][-1]["id"]
    assert seen == everything and len(everything) >= 3


def test_a_day_with_every_finding_discrepancies_first(api: Api, days: dict[str, UUID]) -> None:
    reconciliation = days["primary-eur-d1"]
    for who in ("compliance", "admin"):
        with api.client(who) as client:
            response = client.get(f"/v1/reconciliations/{reconciliation}")
        assert response.status_code == 200, response.text
        body = response.json()
        summary = next(r for r in listed(api).json()["data"] if r["id"] == str(reconciliation))
        assert {k: v for k, v in body.items() if k != "findings"} == {k: v for k, v in summary.items()
                                                                       if k != "findings"}
        findings = body["findings"]
        assert [(f["outcome"], f["discrepancy"]) for f in findings] == [
            ("amount_mismatch", True), ("unknown_to_us", True), ("unknown_to_us", True),
            ("missing_from_report", True), ("matched", False), ("late", False)]
    short = findings[0]
    assert short == {
        "outcome": "amount_mismatch", "discrepancy": True, "processor_reference": short["processor_reference"],
        "kind": "capture", "payment_id": short["payment_id"], "expected_amount": 2_000, "reported_amount": 2_100,
        "fee": 2_100 * 19 // 1000 + 20, "deposit_id": f"primary-deposit-{D1}-EUR",
    }
    assert UUID(short["payment_id"])
    missing = findings[3]
    assert (missing["reported_amount"], missing["fee"], missing["deposit_id"]) == (None, None, None)
    assert missing["expected_amount"] == 3_000
    assert all(f["payment_id"] is None and f["expected_amount"] is None for f in findings[1:3])

    with api.client("compliance") as client:
        only = client.get(f"/v1/reconciliations/{reconciliation}", params={"outcome": "unknown_to_us"}).json()
        clean = client.get(f"/v1/reconciliations/{days['primary-usd-d2']}").json()
    assert [f["outcome"] for f in only["findings"]] == ["unknown_to_us"] * 2 and only["discrepancies"] == 4
    assert [f["discrepancy"] for f in clean["findings"]] == [False] * 3 and clean["discrepancies"] == 0


@pytest.mark.parametrize("who", ["a", "analyst"])
def test_merchants_and_analysts_are_forbidden(api: Api, days: dict[str, UUID], who: str) -> None:
    with api.client(who) as client:
        for path in ("/v1/reconciliations", f"/v1/reconciliations/{days['primary-usd-d3']}",
                     f"/v1/reconciliations/{uuid.uuid4()}"):
            body = is_problem(client.get(path), 403, "forbidden")
            assert "compliance or admin" in body["detail"]


def test_an_unknown_reconciliation_is_404(api: Api, days: dict[str, UUID]) -> None:
    with api.client("admin") as client:
        missing = uuid.uuid4()
        body = is_problem(client.get(f"/v1/reconciliations/{missing}"), 404, "not_found")
        assert str(missing) in body["detail"]
        is_problem(client.get("/v1/reconciliations/not-a-uuid"), 404, "not_found")


@pytest.mark.parametrize("params", [
    {"currency": "usd"},
    {"currency": "USDX"},
    {"processor": ""},
    {"processor": "p" * 51},
    {"date_from": "2025-13-01"},
    {"date_from": D3.isoformat(), "date_to": D1.isoformat()},
    {"has_discrepancies": "maybe"},
    {"outcome": "lost"},
    {"limit": "0"},
    {"limit": "101"},
    {"starting_after": "not-a-uuid"},
    {"starting_after": str(uuid.uuid4())},
])
def test_bad_filters_are_400(api: Api, days: dict[str, UUID], params: dict[str, str]) -> None:
    body = is_problem(listed(api, **params), 400, "validation_error")
    assert body["errors"] or body["detail"]


def test_a_bad_outcome_on_one_day_is_400(api: Api, days: dict[str, UUID]) -> None:
    with api.client("compliance") as client:
        response = client.get(f"/v1/reconciliations/{days['primary-usd-d3']}", params={"outcome": "lost"})
    body = is_problem(response, 400, "validation_error")
    assert body["errors"] == [{"field": "outcome", "message": "unknown outcome"}]


def test_the_openapi_document_describes_both_operations(api: Api) -> None:
    document = httpx.get(f"{api.url}/schema/openapi.json").json()
    listing = document["paths"]["/v1/reconciliations"]["get"]
    one = document["paths"]["/v1/reconciliations/{reconciliation_id}"]["get"]
    assert (listing["operationId"], one["operationId"]) == ("listReconciliations", "getReconciliation")
    assert {p["name"] for p in listing["parameters"]} == {
        "processor", "currency", "date_from", "date_to", "has_discrepancies", "outcome", "limit", "starting_after"}
    schemas = document["components"]["schemas"]

    def schema_of(operation: dict[str, Any]) -> dict[str, Any]:
        ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        return schemas[ref.rsplit("/", 1)[1]]

    assert set(schema_of(listing)["properties"]) == {"data", "has_more", "next_starting_after"}
    assert {"counts", "discrepancies", "deposits", "findings", "day", "processor"} <= set(
        schema_of(one)["properties"])
    for operation in (listing, one):
        for status in ("400", "401", "403", "404"):
            assert list(operation["responses"][status]["content"]) == [PROBLEM_JSON]
