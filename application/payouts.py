"""Payouts: plan a merchant's payout at a cut-off, send it to the bank, record the bank's answer.

``create_payout`` (one per merchant, currency and cut-off day, idempotent by that) asks the read
side which payments may have money due (a hint: each payment decides what is due itself), and
saves in one transaction the Payout, the PayoutAccount's carry and reserve, and each included
payment's record of what this payout paid of it: a line can never be paid twice, even by two
runs at once (one loses the race on the payments' versions and finds the payout made).

``send_payout`` sends a created payout to the bank with the payout's own idempotency key. An
unknown outcome (timeout, the bank down) records nothing and raises: the next attempt sends the
same key, so the bank pays once. A refusal fails the payout and carries its amount forward.

``run_payouts`` is what the scheduled loop does: every merchant whose schedule has a cut-off
today gets its payouts created, and every created payout is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from application.errors import BankTransferRejected, BankUnavailable, NotFound
from application.ports import Bank, PayoutCandidates
from application.unit_of_work import CommandResult, LedgerBase
from domain.errors import DomainError, NothingToPayOut
from domain.merchant import Merchant
from domain.money import check_currency
from domain.payment import Payment
from domain.payout import (
    Payout,
    PayoutAccount,
    PayoutLine,
    PayoutStatus,
    is_cutoff,
    payout_account_id,
    payout_id,
)


def payout_result(payout: Payout) -> dict[str, Any]:
    return {
        "payout_id": str(payout.id), "merchant_id": str(payout.merchant_id), "currency": payout.currency,
        "cutoff": payout.cutoff, "status": payout.status, "amount_minor": payout.amount_minor,
        "lines": len(payout.lines), "bank_reference": payout.bank_reference, "failure_reason": payout.failure_reason,
    }


@dataclass
class PayoutRun:
    """What one round of the payout loop did."""

    created: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    unsent: dict[str, str] = field(default_factory=dict)  # payout id -> why (the bank: try again)
    refused: dict[str, str] = field(default_factory=dict)  # merchant:currency -> the named rejection


class PayoutCommands(LedgerBase):
    payout_candidates: PayoutCandidates | None = None
    bank: Bank | None = None

    def get_payout(self, payout_id: UUID, merchant_id: UUID | None = None) -> Payout:
        return self._get(Payout, payout_id, merchant_id)

    def _find(self, cls: type[Any], aggregate_id: UUID) -> Any | None:
        try:
            return self._get(cls, aggregate_id)
        except NotFound:
            return None

    def create_payout(self, merchant_id: UUID, currency: str, cutoff: date) -> CommandResult:
        """The merchant's payout in ``currency`` at ``cutoff``; the one made before, if any."""
        candidates = self.payout_candidates
        if candidates is None:
            raise RuntimeError("this ledger was built without payout candidates (no read side)")
        check_currency(currency)
        the_payout = payout_id(merchant_id, currency, cutoff)

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            made = self._find(Payout, the_payout)
            if made is not None:
                return [], payout_result(made)
            merchant: Merchant = self.get_merchant(merchant_id)
            account = self._find(PayoutAccount, payout_account_id(merchant_id, currency))
            account = account or PayoutAccount.open(merchant_id, currency)
            lines, payments = [], []
            # The merchant's own payments, and others' that split a share to it: loaded at once.
            due = self._get_many(Payment, candidates.dues(merchant_id, currency))
            for payment_id, payment in due.items():
                if (payment.payout_currency if str(payment.merchant_id) == str(merchant_id)
                        else payment.currency) != currency:
                    continue
                gross, fee, shares, refunds, disputes = payment.include_in_payout(str(the_payout), str(merchant_id))
                if gross or fee or shares or refunds or disputes:
                    lines.append(PayoutLine(str(payment_id), gross, fee, refunds, shares, disputes))
                    payments.append(payment)
            if not lines and not account.has_anything_due(cutoff):
                raise NothingToPayOut(f"merchant {merchant_id} has nothing to pay out in {currency} at {cutoff}")
            payout = account.plan(cutoff, lines, reserve_percent_bps=merchant.reserve_percent_bps,
                                  reserve_days=merchant.reserve_days)
            return [payout, account, *payments], payout_result(payout)

        return self._execute(
            f"create_payout:{the_payout}", "create_payout",
            {"merchant_id": str(merchant_id), "currency": currency, "cutoff": cutoff.isoformat()}, the_payout, decide,
        )

    def send_payout(self, the_payout: UUID) -> CommandResult:
        """Send a created payout to the bank and record its answer; BankUnavailable when the
        outcome is unknown (nothing recorded: send again, the same key goes)."""
        bank = self.bank
        if bank is None:
            raise RuntimeError("this ledger was built without a bank")

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payout = self.get_payout(the_payout)
            if payout.status != PayoutStatus.CREATED:
                return [], payout_result(payout)
            try:
                transfer = bank.transfer(key=payout.bank_key, merchant_id=str(payout.merchant_id),
                                         amount_minor=payout.amount_minor, currency=payout.currency,
                                         description=f"EchoTransact payout {payout.cutoff}")
            except BankTransferRejected as refused:
                payout.fail(str(refused))
                account: PayoutAccount = self._get(PayoutAccount, payout_account_id(payout.merchant_id,
                                                                                    payout.currency))
                account.carry(payout)
                return [payout, account], payout_result(payout)
            payout.mark_paid(transfer.reference)
            return [payout], payout_result(payout)

        # An attempt that found the bank away raised and recorded nothing: the next runs again.
        return self._execute(f"send_payout:{the_payout}", "send_payout", {"payout_id": str(the_payout)},
                             the_payout, decide)

    def run_payouts(self, today: date) -> PayoutRun:
        """Create today's payouts of every merchant whose schedule has a cut-off today, then send
        every payout still with the bank. A merchant or payout that fails is left for the next
        round; the others go on."""
        candidates = self.payout_candidates
        if candidates is None:
            raise RuntimeError("this ledger was built without payout candidates (no read side)")
        run = PayoutRun()
        fresh: set[UUID] = set()  # created by this round (a replayed creation says what it was then)
        for merchant_id, currency in candidates.balances():
            merchant = self.get_merchant(merchant_id)
            if is_cutoff(merchant.payout_schedule, today):
                try:
                    created = self.create_payout(merchant_id, currency, today)
                    run.created.append(created.result)
                    if not created.replayed and created.result["status"] == PayoutStatus.CREATED:
                        fresh.add(UUID(created.result["payout_id"]))
                except NothingToPayOut:
                    continue  # what it has is held by the reserve, or not settled in the read side yet
                except DomainError as refused:  # the others go on; this one is logged by the loop
                    run.refused[f"{merchant_id}:{currency}"] = f"{refused.code}: {refused}"
        for the_payout in {*candidates.unsent(), *fresh}:
            try:
                run.sent.append(self.send_payout(the_payout).result)
            except BankUnavailable as away:
                run.unsent[str(the_payout)] = str(away)
        return run
