"""Double-entry postings, account names and the merchant fee schedule.

Every money movement carries postings that balance per currency: the sum of debits equals the
sum of credits. Postings travel inside events as plain dicts (``Posting.as_dict``) so the
event store and Kafka see JSON-native values.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from domain.errors import InvalidFeeSchedule, InvalidSplit
from domain.money import check_currency

Direction = Literal["debit", "credit"]

PROCESSOR_CLEARING = "processor_clearing"
PLATFORM_FEES = "platform:fees"
PLATFORM_CASH = "platform:cash"
# An expense: what the processors keep of what they settle (their fee on each report line).
PROCESSOR_FEES = "platform:processor_fees"
# What open disputes hold from merchants until the processor rules, and the dispute fees (income).
DISPUTES_HELD = "platform:disputes_held"
DISPUTE_FEES = "platform:dispute_fees"


# A merchant's money with us, in four accounts (credit-normal: what we owe the merchant):
#   payable     captured, not yet settled by the processor ("pending")
#   available   settled, not yet paid out
#   reserved    held back from payouts by a rolling reserve
#   in_transit  in a payout the bank has not confirmed yet
def merchant_payable(merchant_id: object) -> str:
    return f"merchant:{merchant_id}:payable"


def merchant_available(merchant_id: object) -> str:
    return f"merchant:{merchant_id}:available"


def merchant_reserved(merchant_id: object) -> str:
    return f"merchant:{merchant_id}:reserved"


def merchant_in_transit(merchant_id: object) -> str:
    return f"merchant:{merchant_id}:in_transit"


MERCHANT_BUCKETS = ("payable", "available", "reserved", "in_transit")


@dataclass(frozen=True, slots=True)
class Posting:
    account: str
    direction: Direction
    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        # Programmer errors, not business rejections: builders below never produce these.
        assert self.direction in ("debit", "credit"), self.direction
        assert isinstance(self.amount_minor, int) and self.amount_minor >= 0, self.amount_minor
        check_currency(self.currency)

    @property
    def signed_minor(self) -> int:
        """Debits positive, credits negative: a balanced set sums to zero per currency."""
        return self.amount_minor if self.direction == "debit" else -self.amount_minor

    def as_dict(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "direction": self.direction,
            "amount_minor": self.amount_minor,
            "currency": self.currency,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Posting:
        return cls(data["account"], data["direction"], data["amount_minor"], data["currency"])


def imbalance(postings: Iterable[Posting]) -> dict[str, int]:
    """Per currency, debits minus credits, for the currencies that do not balance."""
    totals: dict[str, int] = defaultdict(int)
    for posting in postings:
        totals[posting.currency] += posting.signed_minor
    return {currency: total for currency, total in totals.items() if total != 0}


def balanced(postings: Iterable[Posting]) -> tuple[Posting, ...]:
    """Return the postings after checking they balance; an imbalance is a bug, never input."""
    postings = tuple(postings)
    off = imbalance(postings)
    assert not off, f"unbalanced postings {off}: {postings}"
    return postings


@dataclass(frozen=True, slots=True)
class FeeSchedule:
    """A percentage in basis points plus a fixed part in minor units of the payment's currency.

    Rounding rule: the percentage part is rounded half up to a whole minor unit
    (``(amount * bps + 5_000) // 10_000``), then the fixed part is added, and the fee is
    capped at the amount so a merchant's share is never negative.
    """

    percent_bps: int = 290
    fixed_minor: int = 30

    def __post_init__(self) -> None:
        for name, value in (("percent_bps", self.percent_bps), ("fixed_minor", self.fixed_minor)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidFeeSchedule(f"{name} must be a non-negative integer, got {value!r}")
        if self.percent_bps > 10_000:
            raise InvalidFeeSchedule(
                f"percent_bps must be at most 10000 (100%), got {self.percent_bps}"
            )

    def fee_for(self, amount_minor: int) -> int:
        percentage_part = (amount_minor * self.percent_bps + 5_000) // 10_000
        return min(amount_minor, percentage_part + self.fixed_minor)


# -- splits ---------------------------------------------------------------------------------

PLATFORM_PARTY = "platform"
MAX_SPLITS = 10


@dataclass(frozen=True, slots=True)
class Split:
    """A share of a payment for another party: the platform (a commission, our income) or a
    partner merchant (credited to its own payable and paid out to it), as a fixed amount in
    minor units or a percentage in basis points of the captured amount (rounded half up, like
    fees). Shares come out of the merchant's part; refunds come out of the merchant's alone."""

    party: str  # PLATFORM_PARTY, or a partner merchant's id
    amount_minor: int | None = None
    percent_bps: int | None = None

    def share_of(self, captured_minor: int) -> int:
        if self.amount_minor is not None:
            return min(self.amount_minor, captured_minor)
        assert self.percent_bps is not None
        return min(captured_minor, (captured_minor * self.percent_bps + 5_000) // 10_000)

    def as_dict(self) -> dict[str, Any]:
        return {"party": self.party, "amount_minor": self.amount_minor, "percent_bps": self.percent_bps}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Split:
        return cls(data["party"], data.get("amount_minor"), data.get("percent_bps"))


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_splits(splits: Iterable[Split], amount_minor: int, merchant_id: object) -> tuple[Split, ...]:
    """Splits that can be paid: each to the platform or another merchant, once; each a positive
    amount or a percentage; together no more than the amount."""
    checked = tuple(splits)
    if len(checked) > MAX_SPLITS:
        raise InvalidSplit(f"at most {MAX_SPLITS} splits, got {len(checked)}")
    seen: set[str] = set()
    for n, split in enumerate(checked, start=1):
        where = f"split {n}"
        if split.party == str(merchant_id):
            raise InvalidSplit(f"{where} names the payment's own merchant: its part is what the splits leave")
        if split.party in seen:
            raise InvalidSplit(f"{where} names {split.party} again: one share per party")
        seen.add(split.party)
        if (split.amount_minor is None) == (split.percent_bps is None):
            raise InvalidSplit(f"{where} needs either amount_minor or percent_bps, not both or neither")
        if split.amount_minor is not None and not (_whole(split.amount_minor) and split.amount_minor > 0):
            raise InvalidSplit(f"{where}: amount_minor must be a positive integer, got {split.amount_minor!r}")
        if split.percent_bps is not None and not (_whole(split.percent_bps) and 0 < split.percent_bps <= 10_000):
            raise InvalidSplit(f"{where}: percent_bps must be 1-10000, got {split.percent_bps!r}")
    total = sum(s.amount_minor if s.amount_minor is not None else s.share_of(amount_minor) for s in checked)
    if total > amount_minor:
        raise InvalidSplit(f"the splits add up to {total}, more than the amount {amount_minor}")
    return checked


def share_account(party: str) -> str:
    """Where a split's share is credited: our fee income, or the partner merchant's payable."""
    return PLATFORM_FEES if party == PLATFORM_PARTY else merchant_payable(party)


def capture_postings(
    merchant_id: object, amount_minor: int, fee_minor: int, currency: str,
    shares: Iterable[tuple[str, int]] = (),
) -> tuple[Posting, ...]:
    """Captured funds are owed to us by the processor; we owe the merchant all but our fee and the
    splits' shares (each credited to its party: partners are owed theirs, the platform's is ours)."""
    shares = tuple(shares)
    merchant_part = amount_minor - fee_minor - sum(amount for _, amount in shares)
    assert merchant_part >= 0, "the payment checks its splits before capturing"
    return balanced(
        p
        for p in (
            Posting(PROCESSOR_CLEARING, "debit", amount_minor, currency),
            Posting(merchant_payable(merchant_id), "credit", merchant_part, currency),
            Posting(PLATFORM_FEES, "credit", fee_minor, currency),
            *(Posting(share_account(party), "credit", amount, currency) for party, amount in shares),
        )
        if p.amount_minor
    )


def transfer(debit: str, credit: str, amount_minor: int, currency: str) -> tuple[Posting, ...]:
    """Move ``amount_minor`` by debiting one account and crediting the other; a negative amount
    moves the other way, zero moves nothing."""
    if amount_minor == 0:
        return ()
    if amount_minor < 0:
        debit, credit, amount_minor = credit, debit, -amount_minor
    return (Posting(debit, "debit", amount_minor, currency), Posting(credit, "credit", amount_minor, currency))


def refund_postings(
    merchant_id: object, amount_minor: int, currency: str, *, settled: bool = False
) -> tuple[Posting, ...]:
    """A refund comes out of the merchant's money (pending before the payment settled, available
    after); our fee is not returned. The processor owes us that much less."""
    account = merchant_available(merchant_id) if settled else merchant_payable(merchant_id)
    return balanced(transfer(account, PROCESSOR_CLEARING, amount_minor, currency))


def settlement_postings(
    merchant_id: object, captured_minor: int, processor_fee_minor: int, merchant_share_minor: int, currency: str,
    partner_shares: Iterable[tuple[str, int]] = (),
) -> tuple[Posting, ...]:
    """The processor settled a capture: it paid the gross less its fee into our bank account
    (clearing -> platform cash, the fee an expense), and the merchant's share of the payment
    (captured less our fee, the splits and refunds so far, negative when refunds exceed it) moves
    from pending to available, as does each partner's share."""
    return balanced((
        *transfer(PLATFORM_CASH, PROCESSOR_CLEARING, captured_minor - processor_fee_minor, currency),
        *transfer(PROCESSOR_FEES, PROCESSOR_CLEARING, processor_fee_minor, currency),
        *transfer(merchant_payable(merchant_id), merchant_available(merchant_id), merchant_share_minor, currency),
        *(p for partner, share in partner_shares
          for p in transfer(merchant_payable(partner), merchant_available(partner), share, currency)),
    ))


def refund_settlement_postings(refund_minor: int, processor_fee_minor: int, currency: str) -> tuple[Posting, ...]:
    """The processor took a refund (and its fee on it, if any) out of a deposit: what it owed us
    for that refund is settled from our bank account."""
    return balanced((
        *transfer(PROCESSOR_CLEARING, PLATFORM_CASH, refund_minor, currency),
        *transfer(PROCESSOR_FEES, PLATFORM_CASH, processor_fee_minor, currency),
    ))


def payout_created_postings(
    merchant_id: object, amount_minor: int, reserve_change_minor: int, currency: str
) -> tuple[Posting, ...]:
    """A payout leaves the merchant's available balance for the bank (only when its amount is
    positive); the rolling reserve grows (or is released) by ``reserve_change_minor``."""
    return balanced((
        *transfer(merchant_available(merchant_id), merchant_reserved(merchant_id), reserve_change_minor, currency),
        *transfer(merchant_available(merchant_id), merchant_in_transit(merchant_id), max(amount_minor, 0), currency),
    ))


def payout_paid_postings(merchant_id: object, amount_minor: int, currency: str) -> tuple[Posting, ...]:
    """The bank paid the merchant from our account: what we owed is settled."""
    return balanced(transfer(merchant_in_transit(merchant_id), PLATFORM_CASH, amount_minor, currency))


def payout_failed_postings(merchant_id: object, amount_minor: int, currency: str) -> tuple[Posting, ...]:
    """The bank refused the transfer: the amount is the merchant's available money again."""
    return balanced(transfer(merchant_in_transit(merchant_id), merchant_available(merchant_id), amount_minor,
                             currency))
