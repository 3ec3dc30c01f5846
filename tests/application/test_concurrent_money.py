"""Concurrent commands that move one payment's money: the ledger alone keeps refunds within the
capture (and captures within the authorization), before any processor hears of them."""

from __future__ import annotations

import threading
from collections import Counter

from adapters.dev.sandbox_processor import SandboxProcessor
from application.ledger import Ledger
from domain.errors import DomainError
from tests.application.flows import new_merchant, open_session, pay


def run_at_once(actions: list) -> list[object]:  # type: ignore[type-arg]
    results: list[object] = [None] * len(actions)
    start = threading.Barrier(len(actions))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = actions[i]()
        except DomainError as error:
            results[i] = error.code

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(actions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_four_concurrent_refunds_that_together_exceed_the_capture_leave_one_and_three_named_refusals(
    ledger: Ledger, processor: SandboxProcessor
) -> None:
    payment_id = pay(ledger, open_session(ledger, new_merchant(ledger), amount_minor=5_000))
    ledger.authorize_payment(payment_id)
    ledger.capture_payment("capture", payment_id)
    results = run_at_once([
        (lambda i=i: ledger.refund_payment(f"refund-{i}", payment_id, amount_minor=3_000).result["status"])
        for i in range(4)
    ])
    assert Counter(results) == {"captured": 1, "refund_exceeds_captured": 3}, results  # 2,000 stay captured
    assert [op for op, _ in processor.calls].count("refund") == 1  # the refused ones never reached it
    assert ledger.get_payment(payment_id).refunded_minor == 3_000


def test_concurrent_captures_of_one_authorization_capture_once(ledger: Ledger, processor: SandboxProcessor) -> None:
    payment_id = pay(ledger, open_session(ledger, new_merchant(ledger), amount_minor=2_000))
    ledger.authorize_payment(payment_id)
    results = run_at_once([(lambda i=i: ledger.capture_payment(f"cap-{i}", payment_id).result["status"])
                           for i in range(3)])
    assert sorted(map(str, results)) == ["captured", "invalid_transition", "invalid_transition"], results
    assert [op for op, _ in processor.calls].count("capture") == 1
