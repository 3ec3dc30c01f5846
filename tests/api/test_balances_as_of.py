"""Balances and payments as of a moment over real HTTP: ``GET /v1/balances?as_of=``,
``GET /v1/balances/history`` and ``GET /v1/payments/{id}?as_of=``, with the problems they answer for
times they cannot answer for, and merchant isolation."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
import pytest

from projections.views import MAX_HISTORY_POINTS
from tests.api.conftest import Api, paid_payment

PROBLEM_JSON = "application/problem+json"


def _field_problem(response: httpx.Response, field: str) -> str:
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["code"] == "validation_error" and field in {e["field"] for e in body["errors"]}, body
    assert "Traceback" not in response.text
    return str(body["detail"])


def _at(moment: datetime) -> str:
    return moment.isoformat()


@pytest.fixture
def story(api: Api) -> dict[str, Any]:
    """Merchant A's payment, authorized, captured, then partly refunded, with a moment between each."""
    payment = paid_payment(api, "a", amount=4_000, tag=uuid.uuid4().hex)
    authorized = datetime.now(UTC)
    api.services.ledger.capture_payment(f"capture-{payment}", payment)
    captured = datetime.now(UTC)
    api.services.ledger.refund_payment(f"refund-{payment}", payment, amount_minor=1_000)
    refunded = datetime.now(UTC)
    api.project()
    return {"payment": payment, "authorized": authorized, "captured": captured, "refunded": refunded}


def balances(api: Api, who: str, **params: str) -> dict[str, Any]:
    with api.client(who) as client:
        response = client.get("/v1/balances", params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_balances_as_of_a_moment_are_those_of_then(api: Api, story: dict[str, Any]) -> None:
    merchant = api.merchants["a"]
    payable = f"merchant:{merchant}:payable"
    before_capture = balances(api, "a", as_of=_at(story["authorized"]))
    assert before_capture == {"data": [], "merchants": []}
    after_capture = balances(api, "a", as_of=_at(story["captured"]))
    (owed,) = after_capture["merchants"]
    assert owed["merchant_id"] == str(merchant) and owed["pending"] > 0
    after_refund = balances(api, "a", as_of=_at(story["refunded"]))
    assert after_refund["merchants"][0]["pending"] == owed["pending"] - 1_000
    assert after_refund == balances(api, "a")  # nothing moved since: as of now is now
    assert {b["account"] for b in after_capture["data"]} == {payable}  # its own accounts only

    for moment in ("authorized", "captured", "refunded"):
        admin = balances(api, "admin", as_of=_at(story[moment]))
        totals: dict[str, int] = defaultdict(int)
        for b in admin["data"]:
            totals[b["currency"]] += b["balance"]
        assert all(total == 0 for total in totals.values()), (moment, admin)
        assert (moment == "authorized") == (payable not in {b["account"] for b in admin["data"]})


@pytest.mark.parametrize(("as_of", "says"), [
    ("yesterday", ""),
    ("2026-02-30T10:00:00Z", ""),
    ("2026-01-01T10:00:00", "time zone"),  # no offset: RFC 3339 needs one
    ("2999-01-01T00:00:00Z", "in the future"),
    ("2001-01-01T00:00:00Z", "before merchant"),
])
def test_a_time_the_balances_cannot_answer_for_is_a_problem_naming_as_of(api: Api, as_of: str, says: str) -> None:
    with api.client("a") as client:
        detail = _field_problem(client.get("/v1/balances", params={"as_of": as_of}), "as_of")
    assert says in detail


def test_a_balance_history_charts_the_account_by_the_hour(api: Api, story: dict[str, Any]) -> None:
    account = f"merchant:{api.merchants['a']}:payable"
    now = datetime.now(UTC)
    params = {"account": account, "from": _at(now - timedelta(hours=5)), "to": _at(now), "granularity": "hour"}
    with api.client("a") as client:
        response = client.get("/v1/balances/history", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["account"], body["granularity"]) == (account, "hour")
    (usd,) = body["series"]
    assert usd["currency"] == "USD" and len(usd["points"]) in (6, 7)  # the hour of `from` to the hour of `to`
    assert usd["points"][0]["balance"] == 0  # before the payment
    current = {b["account"]: b["balance"] for b in balances(api, "a")["data"]}
    assert usd["points"][-1]["balance"] == current[account]
    assert datetime.fromisoformat(usd["points"][-1]["as_of"]) == now

    with api.client("admin") as admin, api.client("b") as other:
        assert admin.get("/v1/balances/history", params=params).json() == body
        theirs = other.get("/v1/balances/history", params=params)
        missing = other.get("/v1/balances/history", params={**params, "account": "merchant:nobody:payable"})
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["detail"].replace(account, "<account>") == missing.json()["detail"].replace(
        "merchant:nobody:payable", "<account>")


def test_a_history_it_cannot_chart_is_a_problem_naming_the_parameter(api: Api, story: dict[str, Any]) -> None:
    account = f"merchant:{api.merchants['a']}:payable"
    now = datetime.now(UTC)
    window = {"account": account, "from": _at(now - timedelta(hours=1)), "to": _at(now)}
    cases = [
        ({"from": "soon"}, "from"),
        ({"to": _at(now + timedelta(days=1))}, "to"),
        ({"from": _at(now), "to": _at(now - timedelta(hours=1))}, "from"),
        ({"from": _at(now - timedelta(days=3)), "to": _at(now - timedelta(days=2))}, "to"),  # before the account
        ({"from": _at(now - timedelta(hours=MAX_HISTORY_POINTS + 1)), "granularity": "hour"}, "to"),
        ({"granularity": "minute"}, "granularity"),
    ]
    with api.client("a") as client:
        for change, field in cases:
            _field_problem(client.get("/v1/balances/history", params={**window, **change}), field)
        missing = client.get("/v1/balances/history", params={"from": window["from"], "to": window["to"]})
    assert missing.status_code == 400 and missing.json()["code"] == "validation_error"
    assert "'account'" in missing.json()["detail"]  # Litestar's words for a missing parameter


def test_a_payment_as_of_a_moment_is_rebuilt_from_its_events_up_to_then(api: Api, story: dict[str, Any]) -> None:
    payment: UUID = story["payment"]
    with api.client("a") as client:
        def as_of(moment: datetime) -> dict[str, Any]:
            response = client.get(f"/v1/payments/{payment}", params={"as_of": _at(moment)})
            assert response.status_code == 200, response.text
            return dict(response.json())

        authorized, captured, refunded = (as_of(story[m]) for m in ("authorized", "captured", "refunded"))
        now = client.get(f"/v1/payments/{payment}").json()
    assert (authorized["status"], authorized["captured_amount"]) == ("authorized", 0)
    assert (captured["status"], captured["captured_amount"], captured["refunded_amount"]) == ("captured", 4_000, 0)
    assert (refunded["captured_amount"], refunded["refunded_amount"]) == (4_000, 1_000)
    assert {k: refunded[k] for k in ("status", "amount", "fee", "updated_at")} == {
        k: now[k] for k in ("status", "amount", "fee", "updated_at")}
    types = [t["event_type"] for t in authorized["timeline"]]
    assert types[-1] == "payment.authorized" and "payment.captured" not in types
    assert [t["event_type"] for t in refunded["timeline"]] == [t["event_type"] for t in now["timeline"]]


def test_a_payment_as_of_a_time_it_cannot_answer_for(api: Api, story: dict[str, Any]) -> None:
    payment: UUID = story["payment"]
    with api.client("a") as client:
        before = client.get(f"/v1/payments/{payment}", params={"as_of": "2001-01-01T00:00:00Z"})
        future = client.get(f"/v1/payments/{payment}", params={"as_of": _at(datetime.now(UTC) + timedelta(hours=1))})
        garbled = client.get(f"/v1/payments/{payment}", params={"as_of": "noon"})
    assert "before payment" in _field_problem(before, "as_of")
    assert "in the future" in _field_problem(future, "as_of")
    _field_problem(garbled, "as_of")
    # Another merchant's payment, at any time, is as missing as a payment that does not exist.
    with api.client("b") as other:
        theirs = other.get(f"/v1/payments/{payment}", params={"as_of": "2001-01-01T00:00:00Z"})
        missing_id = uuid.uuid4()
        missing = other.get(f"/v1/payments/{missing_id}", params={"as_of": "2001-01-01T00:00:00Z"})
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["detail"].replace(str(payment), "<id>") == missing.json()["detail"].replace(
        str(missing_id), "<id>")
