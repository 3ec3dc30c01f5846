"""Payouts: a merchant's settled money, paid to its bank account at a cut-off.

A ``Payout`` exists once per merchant, currency and cut-off day (its id derives from the three,
so a second run of the same day finds it). Its amount is what is due of the merchant's settled
payments (each payment's gross, less our fee, less refunds, net of what earlier payouts paid),
plus what earlier payouts carried forward, less what the rolling reserve holds back now (or
plus what it releases). A positive amount goes to the bank (``created`` -> ``paid`` or
``failed``); zero or less is carried forward to the next payout and sent nowhere.

A ``PayoutAccount`` per merchant and currency keeps what lives between payouts: the amount
carried forward and the reserve's holds, each released on its day. Planning a payout changes
both in the same save as every payment it includes, so two runs cannot both pay a line.

Postings (domain/ledger.py): created moves the amount from the merchant's available balance to
in transit, and the reserve's change between available and reserved; paid moves in transit to
our bank; failed moves it back to available, and the account carries it to the next payout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.errors import InvalidField, InvalidTransition
from domain.ledger import payout_created_postings, payout_failed_postings, payout_paid_postings
from domain.money import check_currency
from domain.values import check_text

DAILY, WEEKLY, MANUAL = "daily", "weekly", "manual"
SCHEDULES = (DAILY, WEEKLY, MANUAL)
WEEKLY_CUTOFF_WEEKDAY = 0  # Monday
MAX_RESERVE_DAYS = 365


class PayoutStatus:
    CREATED = "created"  # with the bank
    PAID = "paid"
    FAILED = "failed"
    CARRIED_FORWARD = "carried_forward"  # zero or less: nothing sent, the next payout takes it


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise InvalidField(f"payout_schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}",
                           field="payout_schedule")
    return schedule


def check_reserve(percent_bps: int, days: int) -> tuple[int, int]:
    """A rolling reserve: ``percent_bps`` of each payout's new money held for ``days`` days."""
    for name, value, top in (("reserve_percent_bps", percent_bps, 10_000), ("reserve_days", days, MAX_RESERVE_DAYS)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
            raise InvalidField(f"{name} must be an integer from 0 to {top}, got {value!r}", field=name)
    if (percent_bps == 0) != (days == 0):
        raise InvalidField("a reserve needs both reserve_percent_bps and reserve_days, or neither",
                           field="reserve_days")
    return percent_bps, days


def is_cutoff(schedule: str, day: date) -> bool:
    """Whether ``day`` is a cut-off of the schedule (manual has none: payouts are asked for)."""
    return schedule == DAILY or (schedule == WEEKLY and day.weekday() == WEEKLY_CUTOFF_WEEKDAY)


def payout_id(merchant_id: UUID, currency: str, cutoff: date) -> UUID:
    return uuid5(NAMESPACE_URL, f"echotransact:payout:{merchant_id}:{currency}:{cutoff.isoformat()}")


def payout_account_id(merchant_id: UUID, currency: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"echotransact:payout-account:{merchant_id}:{currency}")


@dataclass(frozen=True)
class PayoutLine:
    """What a payout pays of one payment (``net = gross - fee - shares - refunds``, negative when
    refunds came after the gross was paid out; ``shares``: what the splits gave other parties).
    A partner's line is its share as the gross."""

    payment_id: str
    gross_minor: int
    fee_minor: int
    refunds_minor: int
    shares_minor: int = 0
    disputes_minor: int = 0  # what disputes hold or took from it (negative: a won dispute returned)

    @property
    def net_minor(self) -> int:
        return self.gross_minor - self.fee_minor - self.shares_minor - self.refunds_minor - self.disputes_minor

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "net_minor": self.net_minor}


@dataclass(frozen=True)
class Hold:
    amount_minor: int
    release_on: str  # ISO date


class PayoutAccount(Aggregate):
    """A merchant's payouts in one currency: what carries forward, what the reserve holds."""

    class Opened(Aggregate.Created):
        merchant_id: UUID
        currency: str

    class Planned(Aggregate.Event):
        """A payout was planned: the account as it left it."""

        payout_id: str
        cutoff: str
        carried_minor: int
        holds: list[dict[str, Any]]

    class Carried(Aggregate.Event):
        """A payout failed at the bank: its amount goes to the next payout."""

        payout_id: str
        amount_minor: int

    @classmethod
    def open(cls, merchant_id: UUID, currency: str) -> PayoutAccount:
        return cls._create(cls.Opened, id=payout_account_id(merchant_id, currency), merchant_id=merchant_id,
                           currency=check_currency(currency))

    @event(Opened)
    def __init__(self, *, merchant_id: UUID, currency: str) -> None:
        self.merchant_id = merchant_id
        self.currency = currency
        self.carried_minor = 0
        self.holds: list[dict[str, Any]] = []
        self.last_cutoff: str | None = None

    @property
    def reserved_minor(self) -> int:
        return sum(h["amount_minor"] for h in self.holds)

    def has_anything_due(self, cutoff: date) -> bool:
        """Without new lines, would a payout at ``cutoff`` move anything?"""
        return self.carried_minor != 0 or any(h["release_on"] <= cutoff.isoformat() for h in self.holds)

    def plan(
        self, cutoff: date, lines: Sequence[PayoutLine], *, reserve_percent_bps: int, reserve_days: int,
    ) -> Payout:
        """The payout of ``cutoff`` over ``lines``, with this account's carry and reserve; the
        account records what it leaves for the next one."""
        if self.last_cutoff is not None and cutoff.isoformat() <= self.last_cutoff:
            raise InvalidTransition("payout account", f"plan a payout at {cutoff}", f"paid out to {self.last_cutoff}")
        new_money = sum(line.net_minor for line in lines if line.net_minor > 0)
        held = (new_money * reserve_percent_bps) // 10_000
        kept = [h for h in self.holds if h["release_on"] > cutoff.isoformat()]
        released = self.reserved_minor - sum(h["amount_minor"] for h in kept)
        if held:
            kept.append(asdict(Hold(held, (cutoff + timedelta(days=reserve_days)).isoformat())))
        due = sum(line.net_minor for line in lines)
        amount = due + self.carried_minor - held + released
        payout = Payout.create(self.merchant_id, self.currency, cutoff, lines=lines,
                               carried_in_minor=self.carried_minor, reserve_held_minor=held,
                               reserve_released_minor=released, amount_minor=amount)
        self._planned(payout_id=str(payout.id), cutoff=cutoff.isoformat(), carried_minor=min(amount, 0), holds=kept)
        return payout

    @event(Planned)
    def _planned(self, payout_id: str, cutoff: str, carried_minor: int, holds: list[dict[str, Any]]) -> None:
        self.carried_minor = carried_minor
        self.holds = list(holds)
        self.last_cutoff = cutoff

    def carry(self, payout: Payout) -> None:
        assert payout.status == PayoutStatus.FAILED, payout.status
        self._carried(payout_id=str(payout.id), amount_minor=payout.amount_minor)

    @event(Carried)
    def _carried(self, payout_id: str, amount_minor: int) -> None:
        self.carried_minor += amount_minor


class Payout(Aggregate):
    class Created(Aggregate.Created):
        merchant_id: UUID
        currency: str
        cutoff: str
        lines: list[dict[str, Any]]
        carried_in_minor: int
        reserve_held_minor: int
        reserve_released_minor: int
        amount_minor: int
        postings: list[dict[str, Any]]

    class Paid(Aggregate.Event):
        bank_reference: str
        postings: list[dict[str, Any]]

    class Failed(Aggregate.Event):
        reason: str
        postings: list[dict[str, Any]]

    @classmethod
    def create(
        cls, merchant_id: UUID, currency: str, cutoff: date, *, lines: Iterable[PayoutLine], carried_in_minor: int,
        reserve_held_minor: int, reserve_released_minor: int, amount_minor: int,
    ) -> Payout:
        lines = list(lines)
        due = sum(line.net_minor for line in lines)
        assert amount_minor == due + carried_in_minor - reserve_held_minor + reserve_released_minor
        postings = payout_created_postings(merchant_id, amount_minor, reserve_held_minor - reserve_released_minor,
                                           currency)
        return cls._create(
            cls.Created, id=payout_id(merchant_id, currency, cutoff), merchant_id=merchant_id, currency=currency,
            cutoff=cutoff.isoformat(), lines=[line.as_dict() for line in lines], carried_in_minor=carried_in_minor,
            reserve_held_minor=reserve_held_minor, reserve_released_minor=reserve_released_minor,
            amount_minor=amount_minor, postings=[p.as_dict() for p in postings],
        )

    @event(Created)
    def __init__(
        self, *, merchant_id: UUID, currency: str, cutoff: str, lines: list[dict[str, Any]], carried_in_minor: int,
        reserve_held_minor: int, reserve_released_minor: int, amount_minor: int, postings: list[dict[str, Any]],
    ) -> None:
        self.merchant_id = merchant_id
        self.currency = currency
        self.cutoff = cutoff
        self.lines = lines
        self.carried_in_minor = carried_in_minor
        self.reserve_held_minor = reserve_held_minor
        self.reserve_released_minor = reserve_released_minor
        self.amount_minor = amount_minor
        self.status = PayoutStatus.CREATED if amount_minor > 0 else PayoutStatus.CARRIED_FORWARD
        self.bank_reference: str | None = None
        self.failure_reason: str | None = None

    @property
    def bank_key(self) -> str:
        """The bank's idempotency key: every attempt of this payout sends the same."""
        return f"payout:{self.id}"

    def mark_paid(self, bank_reference: str) -> None:
        if self.status != PayoutStatus.CREATED:
            raise InvalidTransition("payout", "mark paid", self.status)
        self._paid(bank_reference=check_text("bank_reference", bank_reference, max_length=100),
                   postings=[p.as_dict() for p in payout_paid_postings(self.merchant_id, self.amount_minor,
                                                                        self.currency)])

    @event(Paid)
    def _paid(self, bank_reference: str, postings: list[dict[str, Any]]) -> None:
        self.status = PayoutStatus.PAID
        self.bank_reference = bank_reference

    def fail(self, reason: str) -> None:
        if self.status != PayoutStatus.CREATED:
            raise InvalidTransition("payout", "fail", self.status)
        self._failed(reason=check_text("reason", reason, max_length=500),
                     postings=[p.as_dict() for p in payout_failed_postings(self.merchant_id, self.amount_minor,
                                                                           self.currency)])

    @event(Failed)
    def _failed(self, reason: str, postings: list[dict[str, Any]]) -> None:
        self.status = PayoutStatus.FAILED
        self.failure_reason = reason
