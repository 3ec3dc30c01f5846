"""Money out through `echotransact run`, by its loops alone: journeys are paid, captured and partly
refunded over HTTP; once the sandbox processor closes the day, the reconciler settles every
payment from the processor's report and the payout loop pays the merchant's share to the
sandbox bank, once."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_chaos import Record, System, journey, run_system

# These tests take today's date from the clock and need it to stay today (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("away_from_midnight")

WAIT_S = 90.0


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    yield from run_system(tmp_path, {
        "ECHOTRANSACT_RATE_LIMIT_PER_MINUTE": "0",
        # Today is reconciled as soon as the processor closes it; the loops look every second or two.
        "ECHOTRANSACT_RECONCILE_DELAY_DAYS": "0", "ECHOTRANSACT_RECONCILE_EVERY_S": "1",
        "ECHOTRANSACT_PAYOUT_EVERY_S": "2",
    })


def keys(system: System) -> dict[str, str]:
    return dict(re.findall(r"^\s+(\w+)\s+key: (\S+)$", system.output.read_text(), re.MULTILINE))


def until(what: str, system: System, check: Any) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"{what} did not happen in {WAIT_S:.0f} s:\n{system.tail()}")


def test_a_days_payments_are_reconciled_and_paid_out_by_the_loops_alone(system: System) -> None:
    record = Record()
    for _ in range(3):
        journey(system, record, time.monotonic() + WAIT_S)
    assert record.journeys == 3 and not record.problems, record.problems
    merchant = httpx.Client(base_url=system.url, headers={"Authorization": f"Bearer {system.merchant_key}"},
                            timeout=30)
    compliance = httpx.Client(base_url=system.url, headers={"Authorization": f"Bearer {keys(system)['compliance']}"},
                              timeout=30)

    def refunds_shown() -> list[dict[str, Any]] | None:
        """The payments once the read model shows their refunds: a refund is acknowledged before
        the read side applies it, and what is owed counts it."""
        found = [merchant.get(f"/v1/payments/{p}").json() for p in sorted(record.refunded)]
        return found if all(p["refunded_amount"] > 0 for p in found) else None

    payments = until("the refunds in the read model", system, refunds_shown)
    owed = sum(p["captured_amount"] - p["fee"] - p["refunded_amount"] for p in payments)
    state = json.loads((system.data_dir / "running.json").read_text())
    today = datetime.now(UTC).date()
    time.sleep(3)  # a few rounds of the reconciler meet today's report still open: they settle nothing
    assert all(merchant.get(f"/v1/payments/{p['id']}").json()["status"] != "settled" for p in payments)
    assert merchant.get("/v1/payouts").json()["data"] == []

    for url in state["processors"].values():  # the processors close the day
        assert httpx.post(f"{url}/v1/sandbox/close-day", json={"day": today.isoformat()}).status_code == 200

    paid = until("a paid payout", system, lambda: [
        p for p in merchant.get("/v1/payouts").json()["data"] if p["status"] == "paid"])
    assert [p["amount"] for p in paid] == [owed]
    payout = merchant.get(f"/v1/payouts/{paid[0]['id']}").json()
    assert sorted(line["payment_id"] for line in payout["lines"]) == sorted(p["id"] for p in payments)
    assert all(merchant.get(f"/v1/payments/{p['id']}").json()["status"] == "settled" for p in payments)
    bank = httpx.get(f"{state['bank_url']}/v1/sandbox/counters").json()
    assert bank["money_movements"] == {f"payout:{paid[0]['id']}": 1}
    split = until("the balances to show the payout", system, lambda: [
        m for m in merchant.get("/v1/balances").json()["merchants"] if m["currency"] == "USD"
        and m["in_transit"] == 0 and m["available"] == 0])
    assert split[0]["pending"] == 0 and split[0]["reserved"] == 0
    days = until("the reconciliations in the read model", system, lambda: compliance.get(
        "/v1/reconciliations", params={"date_from": today.isoformat()}).json()["data"])
    assert sum(d["counts"]["matched"] for d in days) == 2 * len(payments)  # each capture and its refund
    assert all(d["discrepancies"] == 0 for d in days)
    time.sleep(4)  # more rounds of both loops change nothing
    assert httpx.get(f"{state['bank_url']}/v1/sandbox/counters").json()["money_movements"] == bank["money_movements"]
    assert len(merchant.get("/v1/payouts").json()["data"]) == 1
