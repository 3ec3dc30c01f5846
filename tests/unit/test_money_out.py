"""Money out, as a state machine: payments of one merchant, some split with a partner merchant
and the platform, are captured, refunded, reconciled against processor reports (which settle
them), and paid out to both merchants at cut-offs with a rolling reserve, through a bank that
sometimes refuses. At every step:

- every posting set balances per currency;
- for the merchant, paid out + in transit + available + pending + reserved = captures - our
  fees - the splits' shares - refunds; for the partner, the same sum = its shares;
- no payment settles twice, no payout pays a payment's part twice;
- the ledger's accounts agree with the aggregates (available with what payouts have not taken).
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any
from uuid import uuid4

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from domain.errors import DomainError
from domain.ledger import PLATFORM_PARTY, FeeSchedule, Posting, Split, imbalance
from domain.payment import Payment
from domain.payout import Payout, PayoutAccount, PayoutLine, PayoutStatus, payout_id
from domain.reconciliation import LATE, MATCHED, Deposit, Expected, ReportLine, SettlementReport, match

from .builders import EXPIRES_AT, NOW, clear_risk, fake_seal

START = date(2026, 11, 2)
PROCESSOR_FEE_BPS = 190


def _processor_fee(gross: int) -> int:
    return (gross * PROCESSOR_FEE_BPS + 5_000) // 10_000 + 20


SPLITS = [
    (),
    (Split("PARTNER", amount_minor=300),),
    (Split("PARTNER", percent_bps=1_500), Split(PLATFORM_PARTY, percent_bps=500)),
]


class MoneyOut(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.merchant_id = uuid4()
        self.partner_id = uuid4()
        self.payments: list[Payment] = []
        self.events: list[Any] = []
        self.accounts = {m: PayoutAccount.open(m, "USD") for m in (self.merchant_id, self.partner_id)}
        self.payouts: list[Payout] = []
        self.day = START
        self.reported: set[tuple[str, str]] = set()  # (reference, kind) a report listed
        self.refund_days: dict[str, date] = {}
        self.capture_days: dict[str, date] = {}
        self.reserve = (0, 0)
        self.disputes: dict[Any, tuple[int, int]] = {}
        self.collect(*self.accounts.values())

    def collect(self, *aggregates: Any) -> None:
        for aggregate in aggregates:
            self.events.extend(aggregate.collect_events())

    # -- rules ---------------------------------------------------------------------------------

    @rule(splits=st.sampled_from(range(len(SPLITS))))
    def capture_a_payment(self, splits: int) -> None:
        chosen = [Split(str(self.partner_id), s.amount_minor, s.percent_bps) if s.party == "PARTNER" else s
                  for s in SPLITS[splits]]
        payment = _captured_for(self.merchant_id, len(self.payments), chosen)
        self.payments.append(payment)
        self.capture_days[payment.capture_reference or ""] = self.day
        self.collect(payment)

    @precondition(lambda self: bool(self.payments))
    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        payment = self.payments[data.draw(st.integers(0, len(self.payments) - 1))]
        if payment.refundable_minor <= 0 or payment.open_disputes:  # no refund while disputed
            return
        amount = data.draw(st.integers(1, payment.refundable_minor))
        reference = f"re_{payment.id.hex[:8]}_{len(payment.refund_ids)}"
        payment.refund(refund_id=reference, amount_minor=amount, reason="", processor_reference=reference,
                       seal=fake_seal)
        self.refund_days[reference] = self.day
        self.collect(payment)

    @precondition(lambda self: bool(self.payments))
    @rule(data=st.data())
    def a_cardholder_disputes(self, data: st.DataObject) -> None:
        payment = self.payments[data.draw(st.integers(0, len(self.payments) - 1))]
        if payment.open_disputes or payment.dispute_moves:
            return  # one dispute per payment here
        amount = data.draw(st.integers(1, payment.captured_minor))
        payment.open_dispute(f"dp_{payment.id.hex[:8]}", amount, 1_500)
        self.disputes[payment.id] = (amount, 1_500)
        self.collect(payment)

    @precondition(lambda self: any(p.open_disputes for p in self.payments))
    @rule(data=st.data(), outcome=st.sampled_from(["won", "lost", "accepted"]), fee_back=st.booleans())
    def the_processor_rules(self, data: st.DataObject, outcome: str, fee_back: bool) -> None:
        open_ = [p for p in self.payments if p.open_disputes]
        payment = open_[data.draw(st.integers(0, len(open_) - 1))]
        amount, fee = self.disputes[payment.id]
        payment.close_dispute(payment.open_disputes[0], outcome, amount_minor=amount, fee_minor=fee,
                              fee_returned_on_win=fee_back)
        self.collect(payment)

    @rule()
    def reconcile_the_day(self) -> None:
        """The processor reports the day: every capture and refund of it, with its fee."""
        expected = []
        for p in self.payments:
            if p.capture_reference and self.capture_days.get(p.capture_reference) == self.day:
                expected.append(Expected(p.capture_reference, "capture", p.captured_minor, "USD", p.id, self.day))
            for reference, amount in p.refund_amounts.items():
                if self.refund_days[reference] == self.day:
                    expected.append(Expected(reference, "refund", -amount, "USD", p.id, self.day))
        lines = tuple(
            ReportLine(e.processor_reference, e.kind, e.amount_minor,
                       fee := (_processor_fee(e.amount_minor) if e.kind == "capture" else 0),
                       e.amount_minor - fee, "dep_1", self.day)
            for e in expected
        )
        report = SettlementReport("primary", self.day, "USD", lines,
                                  (Deposit("dep_1", sum(line.net_minor for line in lines)),) if lines else ())
        by_id = {p.id: p for p in self.payments}
        for finding in match(report, expected):
            assert finding.outcome in (MATCHED, LATE)
            payment = by_id[finding.payment_id]  # type: ignore[index]
            if finding.kind == "capture":
                payment.settle("primary:dep_1", finding.fee_minor or 0)
            else:
                payment.settle_refund(finding.processor_reference, "primary:dep_1", finding.fee_minor or 0)
            self.collect(payment)
        self.day += timedelta(days=1)

    @rule(percent=st.sampled_from([0, 1_000]), days=st.sampled_from([1, 3]))
    def change_the_reserve(self, percent: int, days: int) -> None:
        self.reserve = (percent, days if percent else 0)

    @rule(to_partner=st.booleans())
    def pay_out(self, to_partner: bool) -> None:
        party = self.partner_id if to_partner else self.merchant_id
        account = self.accounts[party]
        the_payout = str(payout_id(party, "USD", self.day))
        lines = []
        for payment in self.payments:
            gross, fee, shares, refunds, disputes = payment.include_in_payout(the_payout, str(party))
            if gross or fee or shares or refunds or disputes:
                lines.append(PayoutLine(str(payment.id), gross, fee, refunds, shares, disputes))
            self.collect(payment)
        if not lines and not account.has_anything_due(self.day):
            return
        payout = account.plan(self.day, lines, reserve_percent_bps=self.reserve[0], reserve_days=self.reserve[1])
        self.payouts.append(payout)
        self.collect(payout, account)
        self.day += timedelta(days=1)

    @precondition(lambda self: any(p.status == PayoutStatus.CREATED for p in self.payouts))
    @rule(data=st.data(), refuses=st.booleans())
    def the_bank_answers(self, data: st.DataObject, refuses: bool) -> None:
        waiting = [p for p in self.payouts if p.status == PayoutStatus.CREATED]
        payout = waiting[data.draw(st.integers(0, len(waiting) - 1))]
        account = self.accounts[payout.merchant_id]
        if refuses:
            payout.fail("account_closed")
            account.carry(payout)
        else:
            payout.mark_paid(f"bank_{payout.id.hex[:8]}")
        self.collect(payout, account)

    @precondition(lambda self: bool(self.payouts))
    @rule(data=st.data())
    def a_decided_payout_cannot_be_decided_again(self, data: st.DataObject) -> None:
        payout = self.payouts[data.draw(st.integers(0, len(self.payouts) - 1))]
        if payout.status != PayoutStatus.CREATED:
            for attempt in (lambda: payout.mark_paid("again"), lambda: payout.fail("again")):
                try:
                    attempt()
                except DomainError:
                    continue
                raise AssertionError("a decided payout changed")

    # -- invariants ----------------------------------------------------------------------------

    def owed(self) -> dict[str, int]:
        """Per account, credits minus debits (what we owe on it)."""
        totals: dict[str, int] = {}
        for event in self.events:
            for d in getattr(event, "postings", ()) or ():
                signed = d["amount_minor"] if d["direction"] == "credit" else -d["amount_minor"]
                totals[d["account"]] = totals.get(d["account"], 0) + signed
        return totals

    @invariant()
    def every_posting_set_balances(self) -> None:
        for event in self.events:
            postings = [Posting.from_dict(d) for d in getattr(event, "postings", ()) or ()]
            assert imbalance(postings) == {}, event

    @invariant()
    def each_merchants_money_is_all_accounted_for(self) -> None:
        owed = self.owed()
        merchant_net = sum(p.captured_minor - p.fee_minor - p.shares_minor - p.refunded_minor
                           - p._dispute_debits() for p in self.payments)
        partner_net = sum(a for p in self.payments for party, a in p.partner_shares() if party == str(self.partner_id))
        for m, net in ((self.merchant_id, merchant_net), (self.partner_id, partner_net)):
            pending, available, reserved, in_transit = (
                owed.get(f"merchant:{m}:{bucket}", 0) for bucket in ("payable", "available", "reserved", "in_transit"))
            theirs = [p for p in self.payouts if p.merchant_id == m]
            paid_out = sum(p.amount_minor for p in theirs if p.status == PayoutStatus.PAID)
            assert paid_out + in_transit + available + pending + reserved == net
            assert in_transit == sum(p.amount_minor for p in theirs if p.status == PayoutStatus.CREATED)
            assert reserved == self.accounts[m].reserved_minor >= 0
            # Available: what payments have due to it, plus what its payouts carried forward.
            due = sum(g - f - s - r - d for g, f, s, r, d in (p.payout_due(str(m)) for p in self.payments))
            assert available == due + self.accounts[m].carried_minor

    @invariant()
    def nothing_settles_or_pays_out_twice(self) -> None:
        settled = [e for e in self.events if isinstance(e, Payment.Settled)]
        assert len({e.originator_id for e in settled}) == len(settled)
        refunds = [(e.originator_id, e.processor_reference) for e in self.events
                   if isinstance(e, Payment.RefundSettled)]
        assert len(set(refunds)) == len(refunds)
        included = [(e.originator_id, e.payout_id) for e in self.events if isinstance(e, Payment.IncludedInPayout)]
        assert len(set(included)) == len(included)
        for payment in self.payments:
            assert payment.paid_out_gross_minor <= payment.captured_minor
            assert payment.paid_out_refunds_minor <= payment.refunded_minor

    @invariant()
    def clearing_is_what_the_processor_has_not_settled(self) -> None:
        owed = self.owed()
        unsettled = sum(p.captured_minor for p in self.payments if not p.settled)
        unsettled_refunds = sum(a for p in self.payments for r, a in p.refund_amounts.items()
                                if r not in p.settled_refund_references)
        # A lost dispute is a chargeback: the processor takes it back (its report would list it).
        charged_back = sum(self.disputes[e.originator_id][0] for e in self.events
                           if isinstance(e, Payment.DisputeClosed) and e.outcome != "won")
        assert -owed.get("processor_clearing", 0) == unsettled - unsettled_refunds - charged_back

    @invariant()
    def disputes_hold_what_is_open(self) -> None:
        held = sum(sum(self.disputes[p.id]) for p in self.payments if p.open_disputes)
        assert self.owed().get("platform:disputes_held", 0) == held


def _captured_for(merchant_id: Any, n: int, splits: list[Split]) -> Payment:
    amount = 1_000 + 937 * n % 9_000
    payment = Payment.initiate(uuid4(), merchant_id=merchant_id, session_id=None, amount_minor=amount, currency="USD",
                               card_token="tok_1", card_brand="visa", card_last4="4242", fee_schedule=FeeSchedule(),
                               splits=splits)
    clear_risk(payment)
    payment.start_processing("primary")
    payment.authorize(processor="primary", processor_reference=f"ch_{n}", amount_minor=amount, expires_at=EXPIRES_AT)
    payment.capture(amount_minor=None, processor_reference=f"cap_{payment.id.hex[:8]}", now=NOW)
    return payment


TestMoneyOut = MoneyOut.TestCase
TestMoneyOut.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                 suppress_health_check=[HealthCheck.too_slow])
