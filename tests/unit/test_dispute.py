"""The Dispute aggregate as a state machine: random notices, evidence, acceptance and the clock
keep it in its lifecycle, closed disputes stay closed, and refusals are named and change nothing."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from domain.dispute import CLOSED, Dispute, DisputeStatus
from domain.errors import DomainError

from .builders import fake_seal

OPENED_AT = datetime(2026, 12, 1, tzinfo=UTC)
DUE_BY = OPENED_AT + timedelta(days=7)
ALLOWED = {
    ("needs_response", "under_review"), ("needs_response", "won"), ("needs_response", "lost"),
    ("needs_response", "accepted"), ("needs_response", "expired"), ("under_review", "won"),
    ("under_review", "lost"),
}
TEXTS = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=20)
EVIDENCE = st.dictionaries(st.sampled_from(["product_description", "customer_communication", "refund_policy",
                                            "favourite_colour"]), TEXTS, max_size=2)


class DisputeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dispute = Dispute.open(merchant_id=uuid4(), payment_id=uuid4(), processor="sandbox",
                                    processor_dispute_id="dp_1", reason="fraudulent", amount_minor=4_000,
                                    currency="USD", due_by=DUE_BY)
        self.history = [self.dispute.status]
        self.submitted: dict[str, str] | None = None

    def run(self, command: Callable[[], Any]) -> None:
        before = copy.deepcopy(self.dispute.__dict__)
        try:
            command()
        except DomainError:
            assert self.dispute.__dict__ == before, "a refused command changed the dispute"
        self.history.append(self.dispute.status)

    def staged(self) -> dict[str, str]:
        """The evidence staged so far, opened as the application opens it (fake_seal keeps it)."""
        sealed = self.dispute.evidence_personal
        return {} if sealed is None else dict(sealed["sealed"]["evidence"])

    @rule(evidence=EVIDENCE, days=st.integers(0, 9))
    def stage(self, evidence: dict[str, str], days: int) -> None:
        self.run(lambda: self.dispute.stage_evidence(evidence, OPENED_AT + timedelta(days=days),
                                                     staged=self.staged(), seal=fake_seal))

    @rule(evidence=EVIDENCE, days=st.integers(0, 9))
    def submit(self, evidence: dict[str, str], days: int) -> None:
        def command() -> None:
            self.submitted = self.dispute.submit_evidence(evidence, OPENED_AT + timedelta(days=days),
                                                          staged=self.staged(), seal=fake_seal)

        self.run(command)

    @rule(days=st.integers(0, 9))
    def accept(self, days: int) -> None:
        self.run(lambda: self.dispute.accept(OPENED_AT + timedelta(days=days)))

    @rule(days=st.integers(0, 9))
    def tick(self, days: int) -> None:
        now = OPENED_AT + timedelta(days=days)
        self.run(lambda: self.dispute.remind(now))
        self.run(lambda: self.dispute.expire(now))

    @rule(outcome=st.sampled_from([DisputeStatus.WON, DisputeStatus.LOST]))
    def processor_rules(self, outcome: str) -> None:
        was_open = self.dispute.is_open
        changed: list[bool] = []
        self.run(lambda: changed.append(self.dispute.rule(outcome, OPENED_AT + timedelta(days=3))))
        assert changed == [was_open]

    @invariant()
    def it_moves_only_along_its_lifecycle(self) -> None:
        for before, after in zip(self.history, self.history[1:], strict=False):
            assert before == after or (before, after) in ALLOWED, (before, after)

    @invariant()
    def a_closed_dispute_stays_closed(self) -> None:
        closed = [n for n, status in enumerate(self.history) if status in CLOSED]
        if closed:
            assert len(set(self.history[closed[0]:])) == 1

    @invariant()
    def submitted_evidence_is_what_it_holds_and_never_changes_after(self) -> None:
        if self.submitted is not None:
            assert self.staged() == self.submitted
            assert set(self.dispute.evidence_fields) == set(self.submitted)
            assert self.dispute.evidence_submitted_at is not None
        if self.dispute.status == DisputeStatus.UNDER_REVIEW:
            assert self.staged() and set(self.dispute.evidence_fields) <= {
                "product_description", "customer_communication", "refund_policy"}


TestDispute = DisputeMachine.TestCase
TestDispute.settings = settings(max_examples=150, stateful_step_count=25, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])
