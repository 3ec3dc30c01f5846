"""Reconciliations: one row per processor's day reconciled, with its findings counted per outcome,
and one row per finding, for compliance and admin (the platform's rows: no merchant reads them).

A batch's ``reconciliation.reconciled`` events are written with two statements, whatever their
number. The aggregate records nothing after it, so rows are only inserted.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

import msgspec
import psycopg

from application.envelope import EventEnvelope

# domain/reconciliation.py's outcomes, written out: the read side reads envelopes, not the
# domain (tests/projections/test_reconciliations.py checks that both say the same).
OUTCOMES = ("matched", "amount_mismatch", "missing_from_report", "unknown_to_us", "late")
DISCREPANCIES = ("amount_mismatch", "missing_from_report", "unknown_to_us")
RECONCILED = "reconciliation.reconciled"

_json = msgspec.json.Encoder()


def counts(findings: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Findings per outcome, every outcome present."""
    out = dict.fromkeys(OUTCOMES, 0)
    for finding in findings:
        out[finding["outcome"]] += 1
    return out


def _uuid(value: Any) -> str | None:
    return None if value is None else str(value)


class ReconciliationsProjection:
    name = "reconciliations"
    tables: tuple[str, ...] = ("reconciliations", "reconciliation_findings")

    def apply_batch(self, cur: psycopg.Cursor[Any], envelopes: Sequence[EventEnvelope]) -> None:
        reconciled = [e for e in envelopes if e.event_type == RECONCILED]
        if not reconciled:
            return
        rows: list[list[Any]] = []
        findings: list[list[Any]] = []
        for e in reconciled:
            d = e.data
            per_outcome = counts(d["findings"])
            rows.append([
                e.aggregate_id, d["processor"], date.fromisoformat(d["day"]), d["currency"],
                *(per_outcome[o] for o in OUTCOMES), sum(per_outcome[o] for o in DISCREPANCIES),
                _json.encode(d["deposits"]).decode(), e.occurred_at, e.version, e.position,
            ])
            for number, f in enumerate(d["findings"], start=1):
                findings.append([
                    e.aggregate_id, number, f["outcome"], f["outcome"] in DISCREPANCIES, f["processor_reference"],
                    f["kind"], _uuid(f.get("payment_id")), f.get("expected_minor"), f.get("reported_minor"),
                    f.get("fee_minor"), f.get("deposit_id"),
                ])
        cur.execute(
            "INSERT INTO reconciliations (reconciliation_id, processor, day, currency, matched_count,"
            " amount_mismatch_count, missing_from_report_count, unknown_to_us_count, late_count,"
            " discrepancy_count, deposits, reconciled_at, version, position)"
            " SELECT i, p, d, c, m, am, mr, uu, l, dc, dep::jsonb, at, v, pos FROM unnest(%b::uuid[], %b::text[],"
            " %b::date[], %b::text[], %b::int[], %b::int[], %b::int[], %b::int[], %b::int[], %b::int[], %b::text[],"
            " %b::timestamptz[], %b::bigint[], %b::bigint[]) AS t(i, p, d, c, m, am, mr, uu, l, dc, dep, at, v, pos)",
            [list(column) for column in zip(*rows, strict=True)], binary=True,
        )
        if findings:
            cur.execute(
                "INSERT INTO reconciliation_findings (reconciliation_id, finding_no, outcome, discrepancy,"
                " processor_reference, kind, payment_id, expected_minor, reported_minor, fee_minor, deposit_id)"
                " SELECT * FROM unnest(%b::uuid[], %b::int[], %b::text[], %b::bool[], %b::text[], %b::text[],"
                " %b::uuid[], %b::bigint[], %b::bigint[], %b::bigint[], %b::text[])",
                [list(column) for column in zip(*findings, strict=True)], binary=True,
            )
