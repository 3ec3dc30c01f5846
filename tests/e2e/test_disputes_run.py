"""A dispute through `echotransact run`: a voice journey is paid and captured; the sandbox
processor opens a dispute and notifies the API by a signed notification; the merchant reads the
evidence pack (JSON and PDF, read back with a PDF text extractor) and submits evidence through the
API, which the processor receives; the processor rules for the merchant, and the money held comes
back to the merchant's balance."""

from __future__ import annotations

import io
import json
import time

import httpx
import psycopg
from pypdf import PdfReader

from tests.e2e.test_chaos import REFUND, Record, System, journey
from tests.e2e.test_money_out import WAIT_S, system, until

__all__ = ["system"]  # the fixture, from the money-out test: `echotransact run` with fast loops


def test_a_disputed_voice_payment_is_answered_with_its_evidence_and_won(system: System) -> None:
    record = Record()
    journey(system, record, time.monotonic() + WAIT_S)
    assert record.journeys == 1 and not record.problems, record.problems
    (payment_id,) = record.refunded
    merchant = httpx.Client(base_url=system.url, headers={"Authorization": f"Bearer {system.merchant_key}"},
                            timeout=30)
    payment = until("the refund to reach the read model", system, lambda: (
        lambda p: p if p["refunded_amount"] == REFUND else None)(merchant.get(f"/v1/payments/{payment_id}").json()))
    state = json.loads((system.data_dir / "running.json").read_text())
    with psycopg.connect(state["migration_database_url"]) as conn:
        row = conn.execute("SELECT data->>'processor_reference' FROM audit_log WHERE aggregate_id = %s"
                           " AND event_type = 'payment.captured'", (payment_id,)).fetchone()
    assert row is not None
    processor = state["processors"][payment["processor"]]
    # The merchant's only payment here: what is pending for it before any dispute.
    pending_before = payment["captured_amount"] - payment["fee"] - payment["refunded_amount"]

    opened = httpx.post(f"{processor}/v1/sandbox/disputes", json={"capture_reference": row[0], "amount_minor": 1_000,
                                                                  "reason": "fraudulent"}).json()
    dispute = until("the dispute to reach the merchant", system, lambda: [
        d for d in merchant.get("/v1/disputes").json()["data"] if d["payment_id"] == payment_id])[0]
    assert (dispute["status"], dispute["amount"], dispute["reason"]) == ("needs_response", 1_000, "fraudulent")
    until("the amount and the fee to be held from the merchant", system, lambda: [
        m for m in merchant.get("/v1/balances").json()["merchants"]
        if m["currency"] == "USD" and m["pending"] == pending_before - 1_000 - dispute["fee"]])

    pack = merchant.get(f"/v1/disputes/{dispute['id']}/evidence-pack").json()
    whats = [line["what"].lower() for line in pack["timeline"]]
    assert any("code verified" in w for w in whats) and any("captured" in w for w in whats)
    pdf = merchant.get(f"/v1/disputes/{dispute['id']}/evidence-pack", params={"format": "pdf"})
    assert pdf.headers["content-type"] == "application/pdf"
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.content)).pages)
    assert pack["timeline"][0]["event_id"] in text and "echotransact audit verify" in text

    sent = merchant.post(f"/v1/disputes/{dispute['id']}/evidence", headers={"Idempotency-Key": "evidence-1"},
                         json={"customer_communication": "the customer confirmed the code sent to their phone",
                               "submit": True})
    assert sent.status_code == 200, sent.text
    assert sent.json()["status"] == "under_review"  # the processor took it (an error would have said so)

    httpx.post(f"{processor}/v1/sandbox/disputes/{opened['dispute_id']}/ruling", json={"outcome": "won"})
    until("the ruling to reach the merchant", system, lambda: merchant.get(
        f"/v1/disputes/{dispute['id']}").json()["status"] == "won")
    after = until("the amount to come back", system, lambda: [
        m for m in merchant.get("/v1/balances").json()["merchants"]
        if m["currency"] == "USD" and m["pending"] == pending_before - dispute["fee"]])
    assert after  # won: the amount is back, the dispute fee is kept
