"""Stateful property tests: random command sequences keep Payment and PaymentSession invariants."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from domain.errors import DomainError
from domain.ledger import FeeSchedule, Posting, imbalance
from domain.money import CURRENCY_EXPONENTS, max_amount_minor
from domain.payment import Payment
from domain.payment_session import PaymentSession

from .builders import EXPIRES_AT, NOW, clear_risk, fake_seal, line_items_for

STATEFUL = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Allowed status changes, written from the lifecycles in the product brief. Staying in the same
# status is always allowed (partial refunds, wrong codes, resends...).
PAYMENT_TRANSITIONS = {
    ("initiated", "processing"),
    ("initiated", "failed"),
    ("processing", "authorized"),
    ("processing", "failed"),
    ("authorized", "captured"),
    ("authorized", "voided"),
    ("authorized", "authorization_expired"),
    ("captured", "settled"),
    ("captured", "refunded"),
    ("settled", "refunded"),
}

SESSION_TRANSITIONS = {
    ("awaiting_customer", "link_sent"),
    ("link_sent", "link_opened"),
    ("link_sent", "code_verified"),
    ("link_opened", "code_verified"),
    ("link_sent", "locked"),
    ("link_opened", "locked"),
    ("code_verified", "identity_verified"),
    ("code_verified", "payment_method_attached"),
    ("identity_verified", "payment_method_attached"),
    ("payment_method_attached", "completed"),
    ("payment_method_attached", "code_verified"),  # declined, no identity check needed
    ("payment_method_attached", "identity_verified"),  # declined after an identity check
    *(
        (state, end)
        for state in ("awaiting_customer", "link_sent", "link_opened", "code_verified", "identity_verified")
        for end in ("expired", "cancelled", "failed")
    ),
    ("payment_method_attached", "failed"),
}


def session_step_allowed(before: str, after: str, identity_required: bool) -> bool:
    if before == after:
        return True
    if (before, after) not in SESSION_TRANSITIONS:
        return False
    ready = "identity_verified" if identity_required else "code_verified"
    if after == "payment_method_attached":
        return before == ready
    if before == "payment_method_attached" and after in ("code_verified", "identity_verified"):
        return after == ready
    if after == "identity_verified":
        return identity_required
    return True


def postings_balance(event: Any) -> bool:
    postings = getattr(event, "postings", None)
    if postings is None:
        return True
    parsed = [Posting.from_dict(p) for p in postings]
    return bool(parsed) and imbalance(parsed) == {} and all(p.amount_minor > 0 for p in parsed)


class EventSourcedMachine(RuleBasedStateMachine):
    """Runs commands on ``self.live``, keeps every event, and checks rejections change nothing."""

    live: Any
    events: list[Any]

    def run(self, command: Callable[[], Any]) -> list[Any]:
        """Run one command; return the events it recorded (none when it was rejected)."""
        before = copy.deepcopy(vars(self.live))
        try:
            command()
        except DomainError:
            assert self.live.collect_events() == [], "a rejected command recorded an event"
            assert vars(self.live) == before, "a rejected command changed the aggregate"
            return []
        new_events = self.live.collect_events()
        self.events.extend(new_events)
        return new_events

    def check_replay_and_steps(self, step_allowed: Callable[[str, str], bool]) -> None:
        aggregate = None
        status = None
        for event in self.events:
            aggregate = event.mutate(aggregate)
            if status is not None:
                assert step_allowed(status, aggregate.status), (
                    f"{status} -> {aggregate.status} by {type(event).__name__}"
                )
            status = aggregate.status
        assert aggregate is not None
        assert vars(aggregate) == vars(self.live)


@st.composite
def currency_and_amount(draw: st.DrawFn) -> tuple[str, int]:
    currency = draw(st.sampled_from(sorted(CURRENCY_EXPONENTS)))
    amount = draw(st.one_of(st.integers(1, 200), st.integers(1, max_amount_minor(currency))))
    return currency, amount


class PaymentMachine(EventSourcedMachine):
    @initialize(
        order=currency_and_amount(),
        fees=st.builds(FeeSchedule, st.integers(0, 10_000), st.integers(0, 500)),
    )
    def initiate(self, order: tuple[str, int], fees: FeeSchedule) -> None:
        currency, amount = order
        self.live = Payment.initiate(
            uuid4(),
            merchant_id=uuid4(),
            session_id=None,
            amount_minor=amount,
            currency=currency,
            card_token="tok_1",
            card_brand="visa",
            card_last4="4242",
            fee_schedule=fees,
        )
        self.events = self.live.collect_events()
        self.refund_counter = 0

    def amount_near(self, data: st.DataObject, target: int) -> int:
        """Mostly valid amounts up to ``target``, sometimes one too many, zero or negative."""
        return data.draw(
            st.one_of(
                st.integers(1, max(1, target)), st.just(target), st.just(target + 1), st.integers(-2, 0)
            )
        )

    @rule()
    def start_processing(self) -> None:
        def command() -> None:
            clear_risk(self.live)
            self.live.start_processing("stripe")

        self.run(command)

    @rule(data=st.data())
    def authorize(self, data: st.DataObject) -> None:
        amount = self.amount_near(data, self.live.amount_minor)
        self.run(
            lambda: self.live.authorize(
                processor="stripe", processor_reference="ch_1", amount_minor=amount, expires_at=EXPIRES_AT
            )
        )

    @rule(really=st.sampled_from([True, False, False]))  # rarer, so payments get past authorization
    def fail(self, really: bool) -> None:
        if really:
            self.run(lambda: self.live.fail("card_declined", "no"))

    @rule(data=st.data(), whole=st.booleans())
    def capture(self, data: st.DataObject, whole: bool) -> None:
        amount = None if whole else self.amount_near(data, self.live.authorized_minor)
        self.run(lambda: self.live.capture(amount_minor=amount, processor_reference="cap_1", now=NOW))

    @rule(really=st.sampled_from([True, False, False]))
    def void(self, really: bool) -> None:
        if really:
            self.run(lambda: self.live.void("changed mind", seal=fake_seal))

    @rule(minutes=st.integers(-30, 5))  # mostly too early, so most authorizations live on
    def expire_authorization(self, minutes: int) -> None:
        self.run(lambda: self.live.expire_authorization(EXPIRES_AT + timedelta(minutes=minutes)))

    @rule(data=st.data(), reuse_id=st.booleans())
    def refund(self, data: st.DataObject, reuse_id: bool) -> None:
        amount = self.amount_near(data, self.live.refundable_minor)
        if not reuse_id:
            self.refund_counter += 1
        refund_id = f"rf_{self.refund_counter}"
        self.run(
            lambda: self.live.refund(
                refund_id=refund_id, amount_minor=amount, reason="", processor_reference="re", seal=fake_seal,
            )
        )

    @rule(data=st.data())
    def check_refund(self, data: st.DataObject) -> None:
        amount = self.amount_near(data, self.live.refundable_minor)
        self.run(lambda: self.live.check_refund(amount))

    @rule(fee=st.integers(0, 500))
    def settle(self, fee: int = 0) -> None:
        self.run(lambda: self.live.settle("st_1", fee))

    @rule()
    def settle_refund(self) -> None:
        self.run(lambda: self.live.settle_refund("re", "st_2"))

    @rule(payout=st.sampled_from(["po_1", "po_2", "po_3"]))
    def include_in_payout(self, payout: str) -> None:
        self.run(lambda: self.live.include_in_payout(payout))

    @rule(data=st.data(), steps=st.integers(1, 4))
    def next_steps_of_a_normal_life(self, data: st.DataObject, steps: int) -> None:
        """Random commands rarely line up; this takes the steps a real payment would take next."""
        for _ in range(steps):
            self.next_step_of_a_normal_life(data)

    def next_step_of_a_normal_life(self, data: st.DataObject) -> None:
        status = self.live.status
        if status == "initiated":
            self.start_processing()
        elif status == "processing":
            self.authorize(data)
        elif status == "authorized":
            self.capture(data, data.draw(st.booleans()))
        elif status in ("captured", "settled"):
            choice = data.draw(st.integers(0, 2))
            if status == "captured" and choice == 0:
                self.settle(data.draw(st.integers(0, 100)))
            elif status == "settled" and choice == 0:
                self.include_in_payout(data.draw(st.sampled_from(["po_1", "po_2"])))
            else:
                self.refund(data, reuse_id=False)

    @invariant()
    def amounts_are_ordered(self) -> None:
        p = self.live
        assert 0 <= p.refunded_minor <= p.captured_minor <= p.authorized_minor <= p.amount_minor
        assert 0 <= p.fee_minor <= p.captured_minor
        assert p.refunded_minor == sum(e.amount_minor for e in self.events if isinstance(e, Payment.Refunded))

    @invariant()
    def settlement_settles_the_capture_once_and_moves_the_merchants_share(self) -> None:
        refunded_so_far = 0
        settlements = 0
        for event in self.events:
            if isinstance(event, Payment.Refunded):
                refunded_so_far += event.amount_minor
            if isinstance(event, Payment.Settled):
                settlements += 1
                assert event.amount_minor == self.live.captured_minor > 0
                assert event.merchant_share_minor == self.live.captured_minor - self.live.fee_minor - refunded_so_far
                assert self.live.settled_minor == event.amount_minor
        assert settlements <= 1
        assert self.live.settled == (settlements == 1)
        if settlements == 0:
            assert self.live.settled_minor == 0

    @invariant()
    def payouts_never_pay_more_than_is_due(self) -> None:
        p = self.live
        paid = [e for e in self.events if isinstance(e, Payment.IncludedInPayout)]
        assert len({e.payout_id for e in paid}) == len(paid), "a payout includes a payment once"
        assert sum(e.gross_minor for e in paid) == p.paid_out_gross_minor <= p.captured_minor
        assert sum(e.fee_minor for e in paid) == p.paid_out_fee_minor <= p.fee_minor
        assert sum(e.refunds_minor for e in paid) == p.paid_out_refunds_minor <= p.refunded_minor
        if not p.settled:
            assert not paid and p.payout_due() == (0, 0, 0, 0, 0)

    @invariant()
    def the_merchants_accounts_hold_its_share(self) -> None:
        """pending + available (what payouts took counted in) = captured - our fee - refunds."""
        p = self.live
        merchant: dict[str, int] = {}
        for event in self.events:
            for d in getattr(event, "postings", ()):
                if d["account"].startswith("merchant:"):
                    signed = d["amount_minor"] if d["direction"] == "credit" else -d["amount_minor"]
                    merchant[d["account"]] = merchant.get(d["account"], 0) + signed
        total = sum(merchant.values())
        assert total == p.captured_minor - p.fee_minor - p.refunded_minor
        gross, fee, shares, refunds, _ = p.payout_due()
        paid_out = p.paid_out_gross_minor - p.paid_out_fee_minor - p.paid_out_refunds_minor
        assert merchant.get(f"merchant:{p.merchant_id}:available", 0) == (gross - fee - shares - refunds) + paid_out

    @invariant()
    def status_matches_the_amounts(self) -> None:
        p = self.live
        if p.status == "refunded":
            assert p.refunded_minor == p.captured_minor > 0
        if p.status in ("captured", "settled"):
            assert p.captured_minor > p.refunded_minor
        if p.status in ("initiated", "processing", "failed"):
            assert p.authorized_minor == p.captured_minor == 0

    @invariant()
    def every_posting_set_balances(self) -> None:
        assert all(postings_balance(e) for e in self.events)

    @invariant()
    def replay_reproduces_the_live_aggregate(self) -> None:
        self.check_replay_and_steps(lambda a, b: a == b or (a, b) in PAYMENT_TRANSITIONS)


# What the customer does through the link; none of it may happen once the link has expired.
CUSTOMER_STEPS = (
    PaymentSession.LinkSent,
    PaymentSession.LinkOpened,
    PaymentSession.CodeResent,
    PaymentSession.CodeRejected,
    PaymentSession.Locked,
    PaymentSession.CodeVerified,
    PaymentSession.IdentityVerified,
    PaymentSession.IdentityRejected,
    PaymentSession.PaymentMethodAttached,
)


class SessionMachine(EventSourcedMachine):
    @initialize(
        amount=st.integers(1, 20_000),
        threshold_offset=st.sampled_from([-1, 0, 1]),
    )
    def open(self, amount: int, threshold_offset: int) -> None:
        self.clock: datetime = NOW
        self.live = PaymentSession.open(
            uuid4(),
            merchant_id=uuid4(),
            amount_minor=amount,
            currency="USD",
            customer_phone="+14155550123",
            customer_id=uuid4(),
            seal=fake_seal,
            order_reference="ORDER-1",
            line_items=line_items_for(amount),
            voice_platform="vapi",
            conversation_id="conv-1",
            callback_url=None,
            identity_threshold_minor=amount + threshold_offset,
            expires_at=EXPIRES_AT,
        )
        self.events = self.live.collect_events()
        self.serial = 0

    def run(self, command: Callable[[], Any]) -> list[Any]:
        new_events = super().run(command)
        if self.clock >= EXPIRES_AT:
            assert not any(isinstance(e, CUSTOMER_STEPS) for e in new_events), "customer step after expiry"
        return new_events

    def fresh(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}-{self.serial}"

    @rule(seconds=st.integers(0, 400))
    def tick(self, seconds: int) -> None:
        self.clock += timedelta(seconds=seconds)

    @rule(offset=st.sampled_from([timedelta(microseconds=-1), timedelta(0), timedelta(seconds=1)]))
    def jump_to_expiry(self, offset: timedelta) -> None:
        """Land exactly around the expiry instant, where off-by-one comparisons would show."""
        self.clock = max(self.clock, EXPIRES_AT + offset)

    @rule()
    def send_link(self) -> None:
        self.run(lambda: self.live.send_link(self.fresh("link-hash"), self.fresh("code-hash"), self.clock))

    @rule()
    def open_link(self) -> None:
        self.run(lambda: self.live.open_link(self.clock))

    @rule()
    def resend_code(self) -> None:
        self.run(lambda: self.live.resend_code(self.fresh("code-hash"), self.clock))

    @rule(wrong_guesses=st.integers(0, 6), then_correct=st.booleans())
    def verify_code(self, wrong_guesses: int, then_correct: bool) -> None:
        for _ in range(wrong_guesses):
            self.guess(correct=False)
        if then_correct:
            self.guess(correct=True)

    def guess(self, *, correct: bool) -> None:
        guess = self.live.code_hash if correct and self.live.code_hash else self.fresh("wrong-guess")
        self.run(lambda: self.live.verify_code(guess, self.clock))

    @rule(verified=st.booleans())
    def record_identity_check(self, verified: bool) -> None:
        self.run(
            lambda: self.live.record_identity_check(
                verified=verified, verifier="kba", reason="r", now=self.clock
            )
        )

    @rule(valid=st.booleans())
    def attach(self, valid: bool) -> None:
        self.run(
            lambda: self.live.attach_payment_method(
                payment_id=uuid4(),
                card_token="tok_1",
                card_brand="visa" if valid else "nope",
                card_last4="4242",
                now=self.clock,
            )
        )

    def payment_id(self, current: bool) -> UUID:
        return self.live.payment_id if current and self.live.payment_id else uuid4()

    @rule(current=st.booleans())
    def complete(self, current: bool) -> None:
        payment_id = self.payment_id(current)
        self.run(lambda: self.live.complete(payment_id))

    @rule(current=st.booleans())
    def record_decline(self, current: bool) -> None:
        payment_id = self.payment_id(current)
        self.run(lambda: self.live.record_decline(payment_id, "do_not_honor"))

    @rule()
    def expire(self) -> None:
        self.run(lambda: self.live.expire(self.clock))

    @rule(really=st.sampled_from([True] + [False] * 5))  # rarer, so journeys get deep
    def cancel(self, really: bool) -> None:
        if really:
            self.run(lambda: self.live.cancel("hung up", seal=fake_seal))

    @rule(really=st.sampled_from([True] + [False] * 5))  # rarer, so journeys get deep
    def fail(self, really: bool) -> None:
        if really:
            self.run(lambda: self.live.fail("processor_down"))

    @rule(data=st.data(), steps=st.integers(1, 6))
    def next_steps_of_a_normal_journey(self, data: st.DataObject, steps: int) -> None:
        """Random commands rarely line up; this takes the steps a real customer would take next."""
        for _ in range(steps):
            self.next_step_of_a_normal_journey(data)

    def next_step_of_a_normal_journey(self, data: st.DataObject) -> None:
        status = self.live.status
        if status == "awaiting_customer":
            self.send_link()
        elif status == "link_sent":
            self.open_link()
        elif status == "link_opened":
            self.guess(correct=data.draw(st.sampled_from([True, True, False])))
        elif status == "code_verified" and self.live.identity_required:
            self.record_identity_check(data.draw(st.sampled_from([True, True, False])))
        elif status in ("code_verified", "identity_verified"):
            self.attach(valid=True)
        elif status == "payment_method_attached":
            current = self.live.payment_id
            if data.draw(st.booleans()):
                self.run(lambda: self.live.complete(current))
            else:
                self.run(lambda: self.live.record_decline(current, "do_not_honor"))

    @invariant()
    def counters_stay_within_limits(self) -> None:
        s = self.live
        assert 0 <= s.code_attempts <= 5
        assert (s.code_attempts == 5) == (s.status == "locked")
        assert 0 <= s.code_resends <= 3
        assert 0 <= s.identity_attempts <= 3
        assert 0 <= s.declines <= 3
        if s.identity_attempts == 3 or s.declines == 3:
            assert s.status == "failed"

    @invariant()
    def payment_fields_follow_the_status(self) -> None:
        s = self.live
        if s.status == "payment_method_attached":
            assert s.payment_id is not None and s.card_last4 == "4242"
        if s.status in ("code_verified", "identity_verified"):
            assert s.payment_id is None and s.card_token is None
        if s.status == "identity_verified":
            assert s.identity_required

    @invariant()
    def no_event_holds_a_guess(self) -> None:
        for event in self.events:
            for value in vars(event).values():
                assert not (isinstance(value, str) and value.startswith("wrong-guess")), event

    @invariant()
    def replay_reproduces_the_live_aggregate(self) -> None:
        identity_required = self.live.identity_required
        self.check_replay_and_steps(lambda a, b: session_step_allowed(a, b, identity_required))


TestPaymentMachine = PaymentMachine.TestCase
TestPaymentMachine.settings = STATEFUL
TestSessionMachine = SessionMachine.TestCase
TestSessionMachine.settings = STATEFUL
