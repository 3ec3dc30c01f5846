"""A development payment processor with documented test cards, in process.

It behaves like a real processor where it matters to the ledger: every call is keyed by an
idempotency key and the same key returns the first answer, so a retried call never moves
money twice. Outcomes are chosen by the card's last four digits, from the test cards in
adapters/dev/test_cards.py (0119: outcome unknown, approved when asked for its status; 0259, a
lost HTTP answer, has no meaning in process and is approved).
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from adapters.dev.test_cards import DECLINES, TIMEOUT_LAST4
from application.ports import Decision, ProcessorOutcome


class SandboxProcessor:
    def __init__(self, name: str = "sandbox") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._answers: dict[str, ProcessorOutcome] = {}
        self.calls: list[tuple[str, str]] = []  # (operation, idempotency key), for tests
        self.evidence: dict[str, dict[str, str]] = {}  # dispute id -> the evidence sent

    def references(self) -> list[str]:
        """Every processor reference this sandbox has answered with, for tests that scan storage."""
        with self._lock:
            return [outcome.reference for outcome in self._answers.values() if outcome.reference]

    def _once(self, operation: str, key: str, outcome: ProcessorOutcome) -> ProcessorOutcome:
        with self._lock:
            self.calls.append((operation, key))
            return self._answers.setdefault(key, outcome)

    def _approved(self, amount_minor: int = 0) -> ProcessorOutcome:
        return ProcessorOutcome(
            Decision.APPROVED, self.name, reference=f"{self.name}_{uuid.uuid4().hex[:16]}",
            amount_minor=amount_minor,
        )

    def authorize(
        self, *, idempotency_key: str, amount_minor: int, currency: str, card_token: str,
        card_last4: str, merchant_id: str, cvv: str | None = None,
    ) -> ProcessorOutcome:
        if card_last4 in DECLINES:
            code, message = DECLINES[card_last4]
            outcome = ProcessorOutcome(Decision.DECLINED, self.name, reason_code=code, message=message)
        else:
            outcome = replace(
                self._approved(amount_minor), expires_at=datetime.now(UTC) + timedelta(days=7)
            )
        recorded = self._once("authorize", idempotency_key, outcome)
        if card_last4 == TIMEOUT_LAST4:
            return ProcessorOutcome(Decision.UNKNOWN, self.name, message="timed out")
        return recorded

    def submit_dispute_evidence(self, *, idempotency_key: str, dispute_id: str, evidence: dict[str, str]) -> None:
        """Takes a dispute's evidence (and rules nothing: tests decide the outcome)."""
        with self._lock:
            self.calls.append(("dispute_evidence", idempotency_key))
            self.evidence[dispute_id] = dict(evidence)

    def capture(
        self, *, idempotency_key: str, authorization_reference: str, amount_minor: int, currency: str
    ) -> ProcessorOutcome:
        return self._once("capture", idempotency_key, self._approved(amount_minor))

    def void(self, *, idempotency_key: str, authorization_reference: str) -> ProcessorOutcome:
        return self._once("void", idempotency_key, self._approved())

    def refund(
        self, *, idempotency_key: str, authorization_reference: str, amount_minor: int, currency: str
    ) -> ProcessorOutcome:
        return self._once("refund", idempotency_key, self._approved(amount_minor))

    def status(self, *, idempotency_key: str) -> ProcessorOutcome | None:
        with self._lock:
            return self._answers.get(idempotency_key)
