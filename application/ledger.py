"""The Ledger application, the one entry point of the write side: every use case (merchants,
API keys, payment sessions, payments) composed over the shared unit of work, with the
dependencies the composition root gives it.

Each use case lives in its own module (merchants.py, api_keys.py, sessions.py, payments.py,
reconciliation.py, payouts.py);
unit_of_work.py runs every command: idempotent by command id, saved with its outbox rows and
command record in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from eventsourcing.persistence import InfrastructureFactory
from eventsourcing.utils import Environment

from application.api_keys import API_KEY_PREFIX, ApiKeyCommands
from application.disputes import DisputeCommands
from application.merchants import MerchantCommands
from application.payments import PaymentCommands
from application.payouts import PayoutCommands
from application.ports import (
    Bank,
    Clock,
    FxRates,
    IdentityVerifier,
    Locks,
    MessageWording,
    PaymentProcessor,
    PaymentReferences,
    PayoutCandidates,
    ProcessorRouter,
    ProcessorTransactions,
    SettlementReports,
    SingleProcessor,
    VelocityCounter,
)
from application.privacy import CustomerKeys, PrivacyCommands
from application.reconciliation import ReconciliationCommands
from application.sessions import SessionCommands
from application.unit_of_work import CommandResult, LedgerPolicy, LinkIssued
from domain.payment_session import DEFAULT_IDENTITY_THRESHOLDS_MAJOR, default_identity_thresholds_minor

__all__ = [
    "API_KEY_PREFIX",
    "DEFAULT_IDENTITY_THRESHOLDS_MAJOR",
    "CommandResult",
    "Ledger",
    "LedgerPolicy",
    "LinkIssued",
    "default_identity_thresholds_minor",
]


class Ledger(MerchantCommands, ApiKeyCommands, SessionCommands, PaymentCommands, ReconciliationCommands,
             PayoutCommands, DisputeCommands, PrivacyCommands):
    name = "Ledger"

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        policy: LedgerPolicy,
        clock: Clock,
        processor: PaymentProcessor | ProcessorRouter,
        wording: MessageWording,
        identity_verifier: IdentityVerifier | None = None,
        velocity: VelocityCounter | None = None,
        locks: Locks | None = None,
        factory: Callable[[Environment], InfrastructureFactory[Any]] | None = None,
        settlement_reports: SettlementReports | None = None,
        processor_transactions: ProcessorTransactions | None = None,
        payout_candidates: PayoutCandidates | None = None,
        bank: Bank | None = None,
        fx_rates: FxRates | None = None,
        payment_references: PaymentReferences | None = None,
        dispute_fee_returned_on_win: bool = False,
        customer_keys: CustomerKeys | None = None,
    ) -> None:
        """``env``: the event store's settings (which persistence module and recorder, where);
        the composition root chooses them (api/bootstrap.py)."""
        super().__init__(env, policy=policy, clock=clock, factory=factory)
        # Per-payment authorization locks across processes (api/bootstrap.py supplies them);
        # a Ledger built without them does not serialize authorizations of one payment.
        self.locks = locks
        # The composition root supplies it (api/bootstrap.py: in the event store's database).
        self.velocity = velocity
        # A single processor is a router over itself; FailoverRouter (adapters/processors) picks.
        self.processors = (
            processor if isinstance(processor, ProcessorRouter) else SingleProcessor(processor)
        )
        self.identity_verifier = identity_verifier
        self.wording = wording
        # Reconciliation (application/reconciliation.py): the processors' reports and our side.
        self.settlement_reports = settlement_reports
        self.processor_transactions = processor_transactions
        # Payouts (application/payouts.py): the read side's hints and the bank.
        self.payout_candidates = payout_candidates
        self.bank = bank
        # Merchants that settle in another currency (application/reconciliation.py).
        self.fx_rates = fx_rates
        # Disputes (application/disputes.py): the payment behind a processor's reference.
        self.payment_references = payment_references
        self.dispute_fee_returned_on_win = dispute_fee_returned_on_win
        # Customers' data keys (application/privacy.py): personal data is sealed under them.
        if customer_keys is None:
            raise ValueError("a Ledger needs customer_keys (adapters/postgres/customer_keys.py, or the in-memory one)")
        self.customer_keys = customer_keys

    def close(self) -> None:
        for part in (self.locks, self.settlement_reports, self.bank):
            close_part = getattr(part, "close", None)
            if close_part is not None:
                close_part()
        super().close()
