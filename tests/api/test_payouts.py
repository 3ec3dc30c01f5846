"""Payouts over HTTP: a merchant's payout schedule and reserve (PATCH /v1/merchants/{id}), a
manual payout, the payouts list and one payout with its lines (JSON and CSV), the balance split;
each merchant sees only its own."""

from __future__ import annotations

import csv
import io
from uuid import UUID

from tests.api.conftest import Api, paid_payment, session_body


def settled_payment(api: Api, tag: str) -> UUID:
    payment_id = paid_payment(api, "a", amount=4_000, tag=tag)
    ledger = api.services.ledger
    ledger.capture_payment(f"{tag}-capture", payment_id)
    ledger.settle_payment(payment_id, f"sandbox:{tag}")
    api.project()
    return payment_id


def test_a_manual_payout_pays_what_is_available_and_each_merchant_sees_only_its_own(api: Api) -> None:
    merchant = api.merchants["a"]
    with api.client("admin") as admin:
        changed = admin.patch(f"/v1/merchants/{merchant}", json={"payout_schedule": "manual",
                                                                  "reserve": {"percent_bps": 0, "days": 0}},
                              headers={"Idempotency-Key": "po-schedule"})
        assert changed.status_code == 200, changed.text
        assert changed.json()["payout_schedule"] == "manual"
        refused = admin.patch(f"/v1/merchants/{merchant}", json={"reserve": {"percent_bps": 500, "days": 0}},
                              headers={"Idempotency-Key": "po-bad-reserve"})
        assert refused.status_code == 422 and refused.json()["code"] == "invalid_field"
        unknown = admin.patch(f"/v1/merchants/{merchant}", json={"payout_schedule": "hourly"},
                              headers={"Idempotency-Key": "po-bad-schedule"})
        assert unknown.status_code == 400
        in_euros = admin.patch(f"/v1/merchants/{api.merchants['b']}", json={"settlement_currency": "EUR"},
                               headers={"Idempotency-Key": "po-fx"})
        assert in_euros.status_code == 200 and in_euros.json()["settlement_currency"] == "EUR"
        no_such = admin.patch(f"/v1/merchants/{api.merchants['b']}", json={"settlement_currency": "XXX"},
                              headers={"Idempotency-Key": "po-fx-bad"})
        assert no_such.status_code == 422 and no_such.json()["code"] == "unknown_currency"
        back = admin.patch(f"/v1/merchants/{api.merchants['b']}", json={"settlement_currency": ""},
                           headers={"Idempotency-Key": "po-fx-back"})
        assert back.status_code == 200 and back.json()["settlement_currency"] is None
    payment_id = settled_payment(api, "po-api")
    payment = api.services.ledger.get_payment(payment_id)
    net = payment.captured_minor - payment.fee_minor

    with api.client("a") as a:
        made = a.post("/v1/payouts", json={"currency": "USD"}, headers={"Idempotency-Key": "po-now"})
        assert made.status_code == 201, made.text
        payout = made.json()
        assert (payout["status"], payout["amount"], payout["line_count"]) == ("created", net, 1)
        assert payout["lines"] == [{"payment_id": str(payment_id), "gross": payment.captured_minor,
                                    "fee": payment.fee_minor, "shares": 0, "refunds": 0, "disputes": 0,
                                    "net": net}]
        again = a.post("/v1/payouts", json={"currency": "USD"}, headers={"Idempotency-Key": "po-now-again"})
        assert again.status_code == 201 and again.json()["id"] == payout["id"]  # one payout a day
        api.project()
        listed = a.get("/v1/payouts").json()
        assert [p["id"] for p in listed["data"]] == [payout["id"]] and listed["has_more"] is False
        assert a.get("/v1/payouts", params={"status": "paid"}).json()["data"] == []
        assert a.get("/v1/payouts", params={"status": "lost"}).status_code == 400
        one = a.get(f"/v1/payouts/{payout['id']}").json()
        assert one["lines"][0]["net"] == net and one["status"] == "created"
        lines = a.get(f"/v1/payouts/{payout['id']}/lines.csv")
        assert lines.status_code == 200 and lines.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(lines.text)))
        assert [(r["payment_id"], int(r["net_minor"])) for r in rows] == [(str(payment_id), net)]
        split = {(m["merchant_id"], m["currency"]): m for m in a.get("/v1/balances").json()["merchants"]}
        assert split[(str(merchant), "USD")] == {"merchant_id": str(merchant), "currency": "USD", "pending": 0,
                                                 "available": 0, "reserved": 0, "in_transit": net}
    with api.client("b") as b:
        assert b.get("/v1/payouts").json()["data"] == []
        assert b.get(f"/v1/payouts/{payout['id']}").status_code == 404
        assert b.get(f"/v1/payouts/{payout['id']}/lines.csv").status_code == 404
        assert b.get("/v1/payouts", params={"starting_after": payout["id"]}).status_code == 400
        nothing = b.post("/v1/payouts", json={"currency": "USD"}, headers={"Idempotency-Key": "po-b"})
        assert nothing.status_code == 422 and nothing.json()["code"] == "nothing_to_pay_out"
    with api.client("admin") as admin:
        assert admin.get(f"/v1/payouts/{payout['id']}").status_code == 200
        assert admin.post("/v1/payouts", json={"currency": "USD"},
                          headers={"Idempotency-Key": "po-admin"}).status_code == 403
    with api.client("analyst") as analyst:
        assert analyst.get("/v1/payouts").status_code == 403


def test_a_session_carries_splits_checked_when_it_opens(api: Api) -> None:
    partner = str(api.merchants["b"])
    with api.client("a") as a:
        opened = a.post("/v1/payment-sessions", headers={"Idempotency-Key": "split-open"}, json=session_body(
            4_000, splits=[{"party": partner, "percent_bps": 1_000}, {"party": "platform", "amount": 200}]))
        assert opened.status_code == 201, opened.text
        session = api.services.ledger.get_session(UUID(opened.json()["id"]))
        assert session.splits == [{"party": partner, "amount_minor": None, "percent_bps": 1_000},
                                  {"party": "platform", "amount_minor": 200, "percent_bps": None}]
        for splits, why in (
            ([{"party": "platform", "amount": 5_000}], "more than the amount"),
            ([{"party": str(api.merchants["a"]), "amount": 1}], "own merchant"),
            ([{"party": "f" * 36, "amount": 1}], "neither 'platform' nor a merchant"),
            ([{"party": partner, "amount": 1, "percent_bps": 1}], "not both"),
        ):
            refused = a.post("/v1/payment-sessions", headers={"Idempotency-Key": f"split-refused-{len(why)}"},
                             json=session_body(4_000, splits=splits))
            assert refused.status_code == 422, refused.text
            assert refused.json()["code"] == "invalid_split" and why in refused.json()["detail"]
