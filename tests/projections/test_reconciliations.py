"""The reconciliations read model on real PostgreSQL: a day reconciled through the Ledger (the
sandbox processor as a real HTTP service, and made-up reports saved through the ledger) becomes
one row with its counts and one row per finding; applied once however often it arrives; equal
to a rebuild (replay --verify); and shown by row-level security to compliance and admin only."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID, uuid5

import psycopg
import pytest

from adapters.clock import ManualClock
from adapters.dev.processor_server import SandboxProcessorServer
from adapters.processors.client import HttpProcessor
from api.bootstrap import build_ledger, envelope_opener, personal_data_reader
from api.settings import Settings
from application.ledger import Ledger
from domain import reconciliation as domain
from domain.reconciliation import Deposit, Expected, ReportLine, SettlementReport
from projections import reconciliations
from projections.engine import ProjectionStore
from projections.registry import all_projections, select
from projections.replay import rebuild, verify
from projections.views import ReadViews, Scope
from tests.application.flows import new_merchant, open_session, pay
from tests.projections.test_engine import feed

# These tests take today's date from the clock and need it to stay today (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("away_from_midnight")

READER = "echotransact_reader"
TABLES = ("reconciliations", "reconciliation_findings")
DAY = date(2025, 3, 3)
_IDS = UUID("3b0c2f4e-6a1d-4c8e-9f7a-5d2e1b0c9a80")


def reconcile_day(
    ledger: Ledger, *, processor: str = "primary", day: date = DAY, currency: str = "USD", matched: int = 2,
    mismatched: int = 0, missing: int = 0, unknown: int = 0, late: int = 0,
) -> UUID:
    """A processor's day reconciled through the ledger, with these findings: a report and our side
    made up to give them, matched by the domain and saved as the Reconciliation's event (with its
    outbox row, as every save). Returns the reconciliation's id."""
    deposit_id = f"{processor}-deposit-{day}-{currency}"
    lines: list[ReportLine] = []
    ours: list[Expected] = []

    def line(reference: str, gross: int, happened: date = day) -> None:
        fee = gross * 19 // 1000 + 20
        lines.append(ReportLine(reference, "capture", gross, fee, gross - fee, deposit_id, happened))

    def expect(reference: str, amount: int, happened: date = day) -> None:
        payment_id = uuid5(_IDS, f"{processor}:{day}:{currency}:{reference}")
        ours.append(Expected(reference, "capture", amount, currency, payment_id, happened))

    tag = f"{processor}_{day:%Y%m%d}_{currency}"
    for n in range(matched):
        line(f"{tag}_matched{n}", 1_000 + n)
        expect(f"{tag}_matched{n}", 1_000 + n)
    for n in range(mismatched):
        line(f"{tag}_short{n}", 2_100 + n)
        expect(f"{tag}_short{n}", 2_000 + n)
    for n in range(missing):
        expect(f"{tag}_missing{n}", 3_000 + n)
    for n in range(unknown):
        line(f"{tag}_stranger{n}", 4_000 + n)
    for n in range(late):
        line(f"{tag}_late{n}", 5_000 + n, day - timedelta(days=1))
        expect(f"{tag}_late{n}", 5_000 + n, day - timedelta(days=1))
    deposits = (Deposit(deposit_id, sum(x.net_minor for x in lines)),) if lines else ()
    report = SettlementReport(processor, day, currency, tuple(lines), deposits)
    done = domain.Reconciliation.reconcile(report, domain.match(report, ours))
    ledger.save(done)
    return done.id


def catch_up(database_url: str, settings: Settings) -> int:
    store = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()),
                            envelope_opener(settings))
    try:
        return store.catch_up(grace=timedelta(0))
    finally:
        store.close()


def table(database_url: str, name: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(f"SELECT * FROM {name} ORDER BY 1, 2").fetchall()


@pytest.fixture
def store(database_url: str, settings: Settings) -> Iterator[ProjectionStore]:
    s = ProjectionStore(database_url, select("reconciliations"), envelope_opener(settings))
    yield s
    s.close()


def test_the_read_side_names_the_outcomes_as_the_domain_does() -> None:
    assert reconciliations.OUTCOMES == domain.FINDINGS
    assert reconciliations.DISCREPANCIES == domain.DISCREPANCIES
    assert "reconciliations" in all_projections()


# -- a real day, through the command against the sandbox processor ----------------------------------


@pytest.fixture
def sandbox() -> Iterator[SandboxProcessorServer]:
    with SandboxProcessorServer("primary") as server:
        server.close_day(datetime.now(UTC).date())  # today's report is final, as tomorrow's reconciler sees it
        yield server


@pytest.fixture
def processor_ledger(settings: Settings, database_url: str, clock: ManualClock,
                     sandbox: SandboxProcessorServer) -> Iterator[Ledger]:
    built = build_ledger(settings.replace(processors={"primary": sandbox.url}), database_url, clock=clock,
                         processor=HttpProcessor("primary", sandbox.url))
    yield built
    built.close()


def test_a_day_reconciled_by_the_command_is_one_row_with_its_counts_and_one_row_per_finding(
    processor_ledger: Ledger, database_url: str, settings: Settings, sandbox: SandboxProcessorServer,
) -> None:
    ledger = processor_ledger
    merchant = new_merchant(ledger, "rec-read")
    payments = []
    for n in range(3):
        payment = pay(ledger, open_session(ledger, merchant, command_id=f"open-{n}"), prefix=f"p{n}-")
        ledger.authorize_payment(payment)
        ledger.capture_payment(f"capture-{n}", payment)
        payments.append(payment)
    catch_up(database_url, settings)
    short = ledger.get_payment(payments[2]).capture_reference or ""
    sandbox.misbehave(change=(short,), unknown_lines=1)
    today = datetime.now(UTC).date()
    result = ledger.reconcile("primary", today, "USD")
    catch_up(database_url, settings)

    reconciliation_id = UUID(result.result["reconciliation_id"])
    (row,) = [r for r in table(database_url, "reconciliations") if r[0] == reconciliation_id]
    envelope = next(e for e in feed(database_url, settings) if e.aggregate_id == reconciliation_id)
    assert row == (
        reconciliation_id, "primary", today, "USD", 2, 1, 0, 1, 0, 2, envelope.data["deposits"],
        envelope.occurred_at, 1, envelope.position,
    )
    findings = table(database_url, "reconciliation_findings")
    assert [f[1] for f in findings] == list(range(1, 5))  # numbered in the event's order
    by_reference = {f[4]: f for f in findings}
    assert by_reference[short][2:4] == ("amount_mismatch", True)
    assert by_reference[short][6:10] == (payments[2], 2_500, 2_600, 2_600 * 19 // 1000 + 20)
    stranger = next(f for f in findings if f[2] == "unknown_to_us")
    assert stranger[3] is True and stranger[6] is None and stranger[7] is None
    assert sorted(f[6] for f in findings if f[2] == "matched") == sorted(payments[:2])
    assert {f[10] for f in findings} == {envelope.data["deposits"][0]["deposit_id"]}


# -- exactly once, and equal to a rebuild ---------------------------------------------------------


def test_applying_the_same_events_again_in_any_order_changes_nothing(
    ledger: Ledger, store: ProjectionStore, database_url: str, settings: Settings,
) -> None:
    reconcile_day(ledger, matched=3, mismatched=1, missing=1, unknown=1, late=1)
    reconcile_day(ledger, processor="secondary", currency="EUR")
    reconcile_day(ledger, day=DAY - timedelta(days=1), matched=0, missing=2)
    envelopes = feed(database_url, settings)
    assert store.apply_batch(envelopes).applied == 3
    first = {t: table(database_url, t) for t in TABLES}
    assert len(first["reconciliations"]) == 3 and len(first["reconciliation_findings"]) == 7 + 2 + 2

    again = envelopes * 3
    random.Random(3).shuffle(again)
    for start in range(0, len(again), 2):
        assert store.apply_batch(again[start:start + 2]).applied == 0
    assert store.catch_up(grace=timedelta(0)) == 0
    assert {t: table(database_url, t) for t in TABLES} == first


def test_a_rebuild_gives_the_same_rows_and_verify_names_a_changed_one(
    ledger: Ledger, store: ProjectionStore, database_url: str, owner_database_url: str, settings: Settings,
) -> None:
    merchant = new_merchant(ledger, "m-rebuild")  # other aggregates' events pass through untouched
    ledger.authorize_payment(pay(ledger, open_session(ledger, merchant)))
    first = reconcile_day(ledger, matched=2, mismatched=1, late=1)
    reconcile_day(ledger, processor="secondary", unknown=2)
    # Arriving in small batches, the other aggregates' events among them.
    envelopes = feed(database_url, settings)
    for start in range(0, len(envelopes), 3):
        store.apply_batch(envelopes[start:start + 3])
    live = {t: table(database_url, t) for t in TABLES}
    opener = envelope_opener(settings)
    assert verify(owner_database_url, select("reconciliations"), opener) == []

    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute("UPDATE reconciliation_findings SET discrepancy = NOT discrepancy"
                     " WHERE reconciliation_id = %s AND finding_no = 1", (first,))
    differences = verify(owner_database_url, select("reconciliations"), opener)
    assert {(d.table, d.side) for d in differences} == {
        ("reconciliation_findings", "live only"), ("reconciliation_findings", "rebuild only")}
    rebuild(owner_database_url, select("reconciliations"), opener)
    assert {t: table(database_url, t) for t in TABLES} == live
    assert verify(owner_database_url, select("reconciliations"), opener) == []


# -- who sees the rows --------------------------------------------------------------------------------


def visible(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {name}").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(("role", "sees"), [
    ("compliance", True), ("admin", True), ("merchant", False), ("analyst", False), (None, False), ("", False),
])
def test_row_level_security_alone_shows_the_rows_to_compliance_and_admin_only(
    ledger: Ledger, database_url: str, settings: Settings, role: str | None, sees: bool,
) -> None:
    merchant = new_merchant(ledger, "m-rls")
    reconcile_day(ledger, mismatched=1)
    catch_up(database_url, settings)
    with psycopg.connect(database_url, autocommit=True) as conn:
        counts = {t: visible(conn, t) for t in TABLES}
        assert counts == {"reconciliations": 1, "reconciliation_findings": 3}
        # Session-level, as a careless caller would, and no filter of ours: only the policies.
        conn.execute(f"SET ROLE {READER}")
        if role is not None:
            conn.execute("SELECT set_config('app.role', %s, false)", (role,))
        if role == "merchant":
            conn.execute("SELECT set_config('app.merchant_id', %s, false)", (str(merchant),))
        assert {t: visible(conn, t) for t in TABLES} == (counts if sees else dict.fromkeys(TABLES, 0))
        for statement in ("DELETE FROM reconciliations", "UPDATE reconciliation_findings SET outcome = 'matched'",
                          "INSERT INTO reconciliations SELECT * FROM reconciliations", "TRUNCATE reconciliations"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute(statement)


def test_the_application_inserts_rows_and_may_not_change_or_remove_them(
    ledger: Ledger, database_url: str, settings: Settings,
) -> None:
    reconcile_day(ledger, unknown=1)
    catch_up(database_url, settings)  # as the application: it inserted them
    with psycopg.connect(database_url, autocommit=True) as conn:
        for statement in ("UPDATE reconciliations SET late_count = 9", "DELETE FROM reconciliation_findings",
                          "TRUNCATE reconciliation_findings"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute(statement)


def test_the_views_show_a_merchant_or_an_analyst_nothing(
    ledger: Ledger, database_url: str, settings: Settings,
) -> None:
    merchant = new_merchant(ledger, "m-views")
    reconciliation = reconcile_day(ledger, mismatched=1)
    catch_up(database_url, settings)
    with ReadViews(database_url) as views:
        for scope in (Scope("merchant", merchant), Scope("analyst")):
            assert views.reconciliations(scope) == ([], False)
            assert views.reconciliation(scope, reconciliation) is None
            with pytest.raises(ValueError, match="not a reconciliation you can see"):
                views.reconciliations(scope, starting_after=reconciliation)
        for scope in (Scope("compliance"), Scope("admin")):
            rows, more = views.reconciliations(scope)
            assert [r["reconciliation_id"] for r in rows] == [str(reconciliation)] and not more
            detail = views.reconciliation(scope, reconciliation)
            assert detail is not None
            assert [(f["outcome"], f["discrepancy"]) for f in detail["findings"]] == [
                ("amount_mismatch", True), ("matched", False), ("matched", False)]
        with pytest.raises(ValueError, match="outcome"):
            views.reconciliations(Scope("admin"), outcome="lost")


def test_the_migration_can_run_again_and_leaves_exactly_its_policies(owner_database_url: str) -> None:
    from migrations import available

    (migration,) = [m for m in available() if m.name == "reconciliations"]
    with psycopg.connect(owner_database_url, autocommit=True) as conn, conn.transaction():
        conn.execute(migration.sql)  # type: ignore[arg-type]  # the trusted migration file
        policies = conn.execute(
            "SELECT tablename, policyname, roles::text[], cmd FROM pg_policies WHERE tablename = ANY(%s)"
            " ORDER BY 1, 2", (list(TABLES),)).fetchall()
    assert policies == [
        (t, name, roles, cmd) for t in sorted(TABLES) for name, roles, cmd in (
            ("admin_all_rows", [READER], "SELECT"), ("app_writes", ["echotransact_app"], "ALL"),
            ("compliance_all_rows", [READER], "SELECT"), ("owner_writes", ["postgres"], "ALL"))]
