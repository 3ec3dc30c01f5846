"""Disputes: what processors tell us about chargebacks, and what merchants answer.

``record_processor_event`` takes one verified notification from a processor (the HTTP layer
checks its signature first) and applies it, idempotent by the processor's event id: a second
delivery answers the first result; an event that arrives before the one it follows (won before
opened) opens the dispute from what it carries and then applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

DISPUTE_OPENED = "dispute.opened"
DISPUTE_WON = "dispute.won"
DISPUTE_LOST = "dispute.lost"
EARLY_FRAUD_WARNING = "early_fraud_warning"
PROCESSOR_EVENT_TYPES = (DISPUTE_OPENED, DISPUTE_WON, DISPUTE_LOST, EARLY_FRAUD_WARNING)


@dataclass(frozen=True)
class ProcessorEvent:
    """One notification from a processor, as its signed body says (adapters/processors/notifications.py)."""

    event_id: str  # the processor's, unique per processor: the idempotency key
    type: str  # one of PROCESSOR_EVENT_TYPES
    created_at: datetime  # when the processor emitted it (orders events that arrive out of order)
    payment_reference: str  # the processor's reference of the capture (what its settlement report lists)
    dispute_id: str | None = None  # the processor's dispute id (None for an early fraud warning)
    reason: str | None = None  # fraudulent, product_not_received, duplicate, product_unacceptable, ...
    amount_minor: int | None = None  # disputed amount (may be part of the capture)
    currency: str | None = None
    due_by: datetime | None = None  # when the merchant's evidence is due
