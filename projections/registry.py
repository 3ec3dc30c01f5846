"""The projections by name, for the worker and the replay tool."""

from __future__ import annotations

from application.masking import PersonalDataReader
from projections.analytics import AnalyticsProjection
from projections.audit import AuditProjection
from projections.balances import BalancesProjection
from projections.disputes import DisputesProjection
from projections.engine import Projection
from projections.payouts import PayoutsProjection
from projections.postings import PostingsProjection
from projections.reconciliations import ReconciliationsProjection
from projections.status import StatusProjection


def all_projections(personal: PersonalDataReader | None = None) -> dict[str, Projection]:
    """``personal``: opens personal data sealed under customers' keys (the status projection's
    masked phone); without it the status rows say ``withheld``."""
    return {
        p.name: p
        for p in (StatusProjection(personal), AnalyticsProjection(), AuditProjection(), BalancesProjection(),
                  ReconciliationsProjection(), PayoutsProjection(), DisputesProjection(), PostingsProjection())
    }


def select(names: str, personal: PersonalDataReader | None = None) -> list[Projection]:
    """``all`` or a comma-separated list of names; unknown names are an error that lists the known."""
    known = all_projections(personal)
    if names == "all":
        return list(known.values())
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        raise ValueError(f"unknown projection {', '.join(unknown) or '(none)'}; choose from: all, {', '.join(known)}")
    return [known[n] for n in chosen]
