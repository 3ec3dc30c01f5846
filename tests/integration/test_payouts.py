"""Payouts through the Ledger (application/payouts.py) on the real PostgreSQL, with the sandbox
processor and the sandbox bank as real HTTP services: a reconciled day's money is paid out once,
through timeouts and refusals; refunds after a payout carry a negative balance forward; a
rolling reserve holds and releases; two runs at once pay a payment once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest

from adapters.banks.http import HttpBank
from adapters.clock import ManualClock
from adapters.dev.bank_server import SandboxBankServer
from adapters.dev.processor_server import SandboxProcessorServer
from adapters.processors.client import HttpProcessor
from api.bootstrap import build_ledger
from api.settings import Settings
from application.ledger import Ledger
from domain.errors import InvalidSplit, NothingToPayOut
from domain.fx import FxRate
from domain.ledger import PLATFORM_PARTY, Split
from domain.payout import payout_id
from tests.application.flows import new_merchant, open_session, pay
from tests.projections.test_views import catch_up


@pytest.fixture
def today(away_from_midnight: None) -> date:
    """The day a test pays out, taken once when it starts (not at import: a run that crosses UTC
    midnight before this module would otherwise reconcile a day the sandbox never closed)."""
    return datetime.now(UTC).date()


@pytest.fixture
def sandbox(today: date) -> Iterator[SandboxProcessorServer]:
    with SandboxProcessorServer("primary") as server:
        server.close_day(today)  # so that today's report is final, as tomorrow's reconciler would see it
        yield server


@pytest.fixture
def bank() -> Iterator[SandboxBankServer]:
    # A timed-out transfer answers after 3 s; the client gives up at 1.5 s, long enough that a
    # stall of this loaded machine (the bank runs in this process) never times out a normal one.
    with SandboxBankServer(timeout_delay_s=3.0) as server:
        yield server


@pytest.fixture
def ledger(settings: Settings, database_url: str, clock: ManualClock, sandbox: SandboxProcessorServer,
           bank: SandboxBankServer) -> Iterator[Ledger]:
    built = build_ledger(settings.replace(processors={"primary": sandbox.url}), database_url, clock=clock,
                         processor=HttpProcessor("primary", sandbox.url), bank=HttpBank(bank.url, timeout_s=1.5))
    yield built
    built.close()


def captured(ledger: Ledger, merchant_id: UUID, name: str, amount: int = 10_000) -> UUID:
    payment_id = pay(ledger, open_session(ledger, merchant_id, command_id=f"po-open-{name}", amount_minor=amount),
                     prefix=f"po-{name}-")
    ledger.authorize_payment(payment_id)
    ledger.capture_payment(f"po-capture-{name}", payment_id)
    return payment_id


def reconciled(ledger: Ledger, database_url: str, settings: Settings, today: date) -> None:
    catch_up(database_url, settings)
    ledger.reconcile("primary", today, "USD")
    catch_up(database_url, settings)


def owed(database_url: str, merchant_id: UUID) -> dict[str, int]:
    """The merchant's buckets as the read side has them: what we owe it in each."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT account, balance_minor FROM ledger_balances WHERE merchant_id = %s",
                            (merchant_id,)).fetchall()
    return {account.rsplit(":", 1)[1]: -balance for account, balance in rows}


def share(ledger: Ledger, *payment_ids: UUID) -> int:
    return sum((p := ledger.get_payment(i)).captured_minor - p.fee_minor - p.refunded_minor for i in payment_ids)


def payout_row(database_url: str, the_payout: UUID) -> dict[str, Any]:
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute("SELECT * FROM payouts WHERE payout_id = %s", (the_payout,)).fetchone()
        assert row is not None
        row["lines"] = cur.execute("SELECT * FROM payout_lines WHERE payout_id = %s ORDER BY line_no",
                                   (the_payout,)).fetchall()
        return row


def test_a_reconciled_day_is_paid_out_once(
    ledger: Ledger, database_url: str, settings: Settings, bank: SandboxBankServer, today: date,
) -> None:
    merchant = new_merchant(ledger, "po-once")
    first, second = captured(ledger, merchant, "once-1"), captured(ledger, merchant, "once-2", amount=5_000)
    ledger.refund_payment("po-once-refund", second, amount_minor=1_000)
    catch_up(database_url, settings)
    assert ledger.run_payouts(today).created == []  # nothing settled yet: nothing to pay out
    reconciled(ledger, database_url, settings, today)
    expected = share(ledger, first, second)
    assert owed(database_url, merchant)["available"] == expected
    assert owed(database_url, merchant)["payable"] == 0

    run = ledger.run_payouts(today)
    the_payout = payout_id(merchant, "USD", today)
    assert [c["payout_id"] for c in run.created] == [str(the_payout)]
    assert [(s["status"], s["amount_minor"]) for s in run.sent] == [("paid", expected)]
    assert bank.paid_total(str(merchant), "USD") == expected
    catch_up(database_url, settings)
    row = payout_row(database_url, the_payout)
    assert (row["status"], row["amount_minor"], row["line_count"]) == ("paid", expected, 2)
    assert sorted(line["payment_id"] for line in row["lines"]) == sorted([first, second])
    assert {line["payment_id"]: line["refunds_minor"] for line in row["lines"]}[second] == 1_000
    assert owed(database_url, merchant) == {"payable": 0, "available": 0, "in_transit": 0}

    again = ledger.run_payouts(today)
    assert again.sent == [] and again.created == []  # nothing is owed any more: nothing to do
    assert bank.money_movements(f"payout:{the_payout}") == 1
    with pytest.raises(NothingToPayOut):
        ledger.create_payout(merchant, "USD", today + timedelta(days=1))


def test_a_bank_timeout_is_sent_again_with_the_same_key_and_pays_once(
    ledger: Ledger, database_url: str, settings: Settings, bank: SandboxBankServer, today: date,
) -> None:
    merchant = new_merchant(ledger, "po-timeout")
    payment = captured(ledger, merchant, "timeout-1")
    reconciled(ledger, database_url, settings, today)
    bank.time_out_next(1)
    run = ledger.run_payouts(today)
    the_payout = str(payout_id(merchant, "USD", today))
    assert list(run.unsent) == [the_payout] and run.sent == []
    catch_up(database_url, settings)
    assert payout_row(database_url, UUID(the_payout))["status"] == "created"
    assert owed(database_url, merchant)["in_transit"] == share(ledger, payment)
    run = ledger.run_payouts(today)  # the loop's next round: the unsent payout, the same key
    assert [s["status"] for s in run.sent] == ["paid"]
    assert bank.money_movements(f"payout:{the_payout}") == 1
    assert bank.paid_total(str(merchant), "USD") == share(ledger, payment)


def test_a_refused_payout_fails_and_its_amount_goes_in_the_next_one(
    ledger: Ledger, database_url: str, settings: Settings, bank: SandboxBankServer, today: date,
) -> None:
    merchant = new_merchant(ledger, "po-refused")
    payment = captured(ledger, merchant, "refused-1")
    reconciled(ledger, database_url, settings, today)
    bank.reject_account(str(merchant))
    run = ledger.run_payouts(today)
    assert [(s["status"], s["failure_reason"] is not None) for s in run.sent] == [("failed", True)]
    catch_up(database_url, settings)
    assert owed(database_url, merchant)["available"] == share(ledger, payment)
    assert bank.paid_total(str(merchant), "USD") == 0

    with SandboxBankServer() as other_bank:  # the merchant fixed its account: a bank that pays it
        ledger.bank = HttpBank(other_bank.url)
        tomorrow = ledger.create_payout(merchant, "USD", today + timedelta(days=1))
        assert tomorrow.result["amount_minor"] == share(ledger, payment)
        assert tomorrow.result["lines"] == 0  # the payment was in the failed payout; its money is carried
        assert ledger.send_payout(UUID(tomorrow.result["payout_id"])).result["status"] == "paid"
        assert other_bank.paid_total(str(merchant), "USD") == share(ledger, payment)
    catch_up(database_url, settings)
    assert owed(database_url, merchant)["available"] == 0


def test_a_refund_after_the_payout_carries_a_negative_balance_forward(
    ledger: Ledger, database_url: str, settings: Settings, bank: SandboxBankServer, today: date,
) -> None:
    merchant = new_merchant(ledger, "po-negative")
    payment = captured(ledger, merchant, "negative-1")
    reconciled(ledger, database_url, settings, today)
    ledger.run_payouts(today)
    ledger.refund_payment("po-negative-refund", payment, amount_minor=3_000)
    catch_up(database_url, settings)
    assert owed(database_url, merchant)["available"] == -3_000
    day2 = today + timedelta(days=1)
    carried = ledger.create_payout(merchant, "USD", day2).result
    assert (carried["status"], carried["amount_minor"]) == ("carried_forward", -3_000)
    assert ledger.run_payouts(day2).sent == []  # nothing goes to the bank

    later = captured(ledger, merchant, "negative-2")
    ledger.settle_payment(later, "primary:a-later-deposit")  # today is reconciled already: settled by hand
    catch_up(database_url, settings)
    day3 = day2 + timedelta(days=1)
    result = ledger.create_payout(merchant, "USD", day3).result
    assert result["amount_minor"] == share(ledger, later) - 3_000
    ledger.send_payout(UUID(result["payout_id"]))
    # The first payout paid the payment before its refund; the refund came out of the second.
    assert bank.paid_total(str(merchant), "USD") == share(ledger, payment) + share(ledger, later)
    catch_up(database_url, settings)
    assert owed(database_url, merchant) == {"payable": 0, "available": 0, "in_transit": 0}


def test_a_rolling_reserve_holds_part_of_a_payout_and_releases_it_after_its_days(
    ledger: Ledger, database_url: str, settings: Settings, bank: SandboxBankServer, today: date,
) -> None:
    merchant = new_merchant(ledger, "po-reserve")
    ledger.change_merchant_settings("po-reserve-settings", merchant, reserve_percent_bps=1_000, reserve_days=2,
                                    payout_schedule="manual")
    payment = captured(ledger, merchant, "reserve-1")
    reconciled(ledger, database_url, settings, today)
    assert ledger.run_payouts(today).created == []  # manual: the loop makes no payout
    net = share(ledger, payment)
    first = ledger.create_payout(merchant, "USD", today).result
    held = net // 10
    assert first["amount_minor"] == net - held
    catch_up(database_url, settings)
    assert owed(database_url, merchant)["reserved"] == held
    with pytest.raises(NothingToPayOut):  # the hold is not due yet
        ledger.create_payout(merchant, "USD", today + timedelta(days=1))
    released = ledger.create_payout(merchant, "USD", today + timedelta(days=2)).result
    assert released["amount_minor"] == held
    catch_up(database_url, settings)
    assert len(ledger.run_payouts(today + timedelta(days=2)).sent) == 2  # a manual payout goes with the loop
    assert bank.paid_total(str(merchant), "USD") == net
    catch_up(database_url, settings)
    assert owed(database_url, merchant)["reserved"] == 0


def test_two_runs_at_once_make_one_payout_that_pays_each_payment_once(
    ledger: Ledger, database_url: str, settings: Settings, bank: SandboxBankServer, today: date,
) -> None:
    merchant = new_merchant(ledger, "po-race")
    payments = [captured(ledger, merchant, f"race-{n}", amount=2_000 + n) for n in range(4)]
    reconciled(ledger, database_url, settings, today)
    results: list[Any] = []
    barrier = threading.Barrier(3)

    def run() -> None:
        barrier.wait()
        results.append(ledger.run_payouts(today))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 3
    assert {c["payout_id"] for r in results for c in r.created} == {str(payout_id(merchant, "USD", today))}
    assert bank.paid_total(str(merchant), "USD") == share(ledger, *payments)
    assert all(len(ledger.get_payment(p).payout_ids) == 1 for p in payments)


def test_a_split_payment_pays_the_partner_its_share_and_the_merchant_the_rest(
    ledger: Ledger, database_url: str, settings: Settings, bank: SandboxBankServer, today: date,
) -> None:
    merchant, partner = new_merchant(ledger, "po-split-m"), new_merchant(ledger, "po-split-p")
    with pytest.raises(InvalidSplit, match="neither 'platform' nor a merchant"):
        open_session(ledger, merchant, command_id="po-split-bad", splits=[Split(str(uuid4()), amount_minor=100)])
    session = open_session(ledger, merchant, command_id="po-split-session", amount_minor=10_000,
                           splits=[Split(str(partner), percent_bps=2_000), Split(PLATFORM_PARTY, amount_minor=250)])
    payment_id = pay(ledger, session, prefix="po-split-")
    ledger.authorize_payment(payment_id)
    ledger.capture_payment("po-split-capture", payment_id)
    ledger.refund_payment("po-split-refund", payment_id, amount_minor=1_000)
    reconciled(ledger, database_url, settings, today)
    payment = ledger.get_payment(payment_id)
    merchant_net = 10_000 - payment.fee_minor - 2_000 - 250 - 1_000
    assert owed(database_url, partner) == {"payable": 0, "available": 2_000}
    assert owed(database_url, merchant)["available"] == merchant_net

    run = ledger.run_payouts(today)
    assert sorted((s["merchant_id"], s["amount_minor"], s["status"]) for s in run.sent) == sorted([
        (str(merchant), merchant_net, "paid"), (str(partner), 2_000, "paid")])
    assert bank.paid_total(str(partner), "USD") == 2_000
    assert bank.paid_total(str(merchant), "USD") == merchant_net
    catch_up(database_url, settings)
    partner_line = payout_row(database_url, payout_id(partner, "USD", today))["lines"]
    assert [(line["payment_id"], line["gross_minor"], line["net_minor"]) for line in partner_line] == \
        [(payment_id, 2_000, 2_000)]
    (merchant_line,) = payout_row(database_url, payout_id(merchant, "USD", today))["lines"]
    assert (merchant_line["shares_minor"], merchant_line["refunds_minor"]) == (2_250, 1_000)
    assert ledger.run_payouts(today).sent == []  # both paid: nothing is due to either
    assert owed(database_url, partner) == {"payable": 0, "available": 0, "in_transit": 0}
    assert owed(database_url, merchant) == {"payable": 0, "available": 0, "in_transit": 0}
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT due_minor FROM partner_dues WHERE payment_id = %s", (payment_id,)).fetchone() \
            == (0,)
        assert conn.execute("SELECT payout_due_minor FROM payment_status WHERE payment_id = %s",
                            (payment_id,)).fetchone() == (0,)


def test_a_merchant_that_settles_in_euros_is_paid_out_in_euros(
    ledger: Ledger, database_url: str, settings: Settings, bank: SandboxBankServer, today: date,
) -> None:
    merchant = new_merchant(ledger, "po-fx")
    ledger.change_merchant_settings("po-fx-settings", merchant, settlement_currency="EUR")
    payment_id = captured(ledger, merchant, "fx-1")
    ledger.refund_payment("po-fx-refund-1", payment_id, amount_minor=1_000)
    reconciled(ledger, database_url, settings, today)
    payment = ledger.get_payment(payment_id)
    assert payment.fx is not None and payment.payout_currency == "EUR"
    rate = FxRate.from_dict(payment.fx)
    in_euros = rate.convert(10_000) - rate.convert(payment.fee_minor) - rate.convert(1_000)
    assert payment.fx["share_minor"] == in_euros
    with psycopg.connect(database_url) as conn:
        balances: dict[str, int] = dict(conn.execute(
            "SELECT currency, balance_minor FROM ledger_balances WHERE account = %s",
            (f"merchant:{merchant}:available",)).fetchall())
        assert balances == {"EUR": -in_euros}  # nothing of the merchant's is left in dollars
        assert conn.execute("SELECT currency, sum(balance_minor) FROM ledger_balances GROUP BY currency"
                            " HAVING sum(balance_minor) <> 0").fetchall() == []
    ledger.refund_payment("po-fx-refund-2", payment_id, amount_minor=500)  # after settlement: out of euros
    catch_up(database_url, settings)
    run = ledger.run_payouts(today)
    assert [(s["currency"], s["amount_minor"]) for s in run.sent] == [("EUR", in_euros - rate.convert(500))]
    assert bank.paid_total(str(merchant), "EUR") == in_euros - rate.convert(500)
    assert bank.paid_total(str(merchant), "USD") == 0
    catch_up(database_url, settings)
    assert owed(database_url, merchant) == {"payable": 0, "available": 0, "in_transit": 0}
