"""Least privilege on real PostgreSQL (migrations/0015_roles.sql): the application's login role
is no superuser, writes events only through ledger_append, cannot change or remove an event or
an audit row, and every table's privileges were decided (README, "PostgreSQL roles")."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from api import cli
from api.bootstrap import APP_ROLE, app_database_url, envelope_opener, personal_data_reader
from api.cli import main
from api.settings import Settings
from application.ledger import Ledger
from migrations import MigrationError, available, migrate
from projections.engine import ProjectionStore
from projections.registry import all_projections
from tests.application.flows import new_merchant, open_session, pay

ALL = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"})
READ_WRITE = frozenset({"SELECT", "INSERT", "UPDATE"})

# What echotransact_app may do per table: table privileges, and the columns it may UPDATE where
# it may not update the whole row. A new table fails test_every_table_has_decided_privileges
# until it is added here, to the migration that grants it, and to README's table.
PRIVILEGES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "ledger_events": (frozenset({"SELECT"}), frozenset()),
    "ledger_snapshots": (frozenset({"SELECT", "INSERT"}), frozenset()),
    "outbox": (frozenset({"SELECT"}), frozenset()),
    "outbox_pending": (frozenset({"SELECT", "DELETE"}), frozenset({"publish_attempts", "last_error"})),
    "command_log": (frozenset({"SELECT"}), frozenset()),
    "schema_migrations": (frozenset(), frozenset()),
    "idempotency_records": (READ_WRITE | {"DELETE"}, frozenset()),
    "outbox_messages": (frozenset({"SELECT", "UPDATE", "DELETE"}), frozenset()),
    "dev_sms_inbox": (frozenset({"SELECT", "INSERT", "DELETE"}), frozenset({"received_at"})),
    "webhook_checkpoint": (READ_WRITE, frozenset()),
    "webhook_merchants": (READ_WRITE, frozenset()),
    "webhook_sessions": (READ_WRITE, frozenset()),
    "webhook_payments": (READ_WRITE, frozenset()),
    "webhook_deliveries": (READ_WRITE | {"DELETE"}, frozenset()),
    "webhook_attempts": (frozenset({"SELECT", "INSERT", "DELETE"}), frozenset({"attempted_at"})),
    "card_vault": (frozenset({"SELECT", "INSERT", "DELETE"}), frozenset({"created_at"})),
    "risk_attempts": (frozenset({"SELECT", "INSERT", "DELETE"}), frozenset({"at"})),
    "projection_versions": (READ_WRITE, frozenset()),
    "projection_checkpoints": (READ_WRITE, frozenset()),
    "session_status": (READ_WRITE, frozenset()),
    "payment_status": (READ_WRITE, frozenset()),
    "analytics_session_cohorts": (READ_WRITE, frozenset()),
    "funnel_daily": (READ_WRITE, frozenset()),
    "volume_daily": (READ_WRITE, frozenset()),
    "analytics_payments": (READ_WRITE, frozenset()),
    # Decline and risk reasons, and each reason waiting for its session (migrations/0025_funnel_card_and_reasons.sql).
    "decline_reasons_daily": (READ_WRITE, frozenset()),
    "analytics_payment_reasons": (READ_WRITE, frozenset()),
    "ledger_balances": (READ_WRITE, frozenset()),
    # Inserted only: a posting never changes (migrations/0022_postings.sql).
    "ledger_postings": (frozenset({"SELECT", "INSERT"}), frozenset()),
    # Inserted only: a reconciliation has one event (migrations/0016_reconciliations.sql).
    "reconciliations": (frozenset({"SELECT", "INSERT"}), frozenset()),
    "reconciliation_findings": (frozenset({"SELECT", "INSERT"}), frozenset()),
    "payouts": (READ_WRITE, frozenset()),
    "payout_lines": (READ_WRITE, frozenset()),
    "partner_dues": (READ_WRITE, frozenset()),
    "disputes": (READ_WRITE, frozenset()),
    "audit_log": (frozenset({"SELECT", "INSERT"}), frozenset({"prev_hash", "hash"})),
    # Customers' data keys (migrations/0024_customer_keys.sql): made, read and destroyed (UPDATE to
    # NULL), never deleted, so the record that a key existed and was destroyed stays.
    "customer_keys": (READ_WRITE, frozenset()),
    "customer_sessions": (frozenset({"SELECT", "INSERT"}), frozenset()),
}


@pytest.fixture
def app(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def owner(owner_database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def history(ledger: Ledger, database_url: str, settings: Settings) -> dict[str, Any]:
    """A paid and captured payment, saved by the ledger and projected, both as the application."""
    merchant = new_merchant(ledger)
    payment = pay(ledger, open_session(ledger, merchant))
    ledger.authorize_payment(payment)
    ledger.capture_payment("capture", payment)
    store = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()),
                            envelope_opener(settings))
    try:
        assert store.catch_up(grace=timedelta(0)) > 0
    finally:
        store.close()
    return {"merchant": merchant, "payment": payment}


def refused(conn: psycopg.Connection[Any], statement: str, *params: Any) -> bool:
    """The statement fails for want of a privilege (and changes nothing)."""
    try:
        with conn.transaction():
            conn.execute(statement, params or None)
    except errors.InsufficientPrivilege:
        return True
    return False


def test_the_application_role_is_no_superuser_and_is_bound_by_row_level_security(
    app: psycopg.Connection[Any],
) -> None:
    assert conninfo_to_dict(app.info.dsn)["user"] == APP_ROLE
    row = app.execute(
        "SELECT current_user, rolsuper, rolbypassrls, rolcreatedb, rolcreaterole, rolreplication, rolcanlogin"
        " FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    assert row == (APP_ROLE, False, False, False, False, False, True)
    # Owns nothing, so FORCE ROW LEVEL SECURITY's owner exemption is not its.
    assert app.execute("SELECT count(*) FROM pg_class WHERE relowner = current_user::regrole").fetchone() == (0,)
    # It may become the reader for the read views, without holding the reader's privileges itself.
    assert app.execute("SELECT pg_has_role(current_user, 'echotransact_reader', 'SET'),"
                       " pg_has_role(current_user, 'echotransact_reader', 'USAGE')").fetchone() == (True, False)


def test_a_whole_save_and_its_projection_work_as_the_application(
    history: dict[str, Any], ledger: Ledger, app: psycopg.Connection[Any]
) -> None:
    with ledger.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
        assert conn.execute("SELECT current_user AS u").fetchone()["u"] == APP_ROLE
    counts = app.execute(
        "SELECT (SELECT count(*) FROM ledger_events), (SELECT count(*) FROM outbox),"
        " (SELECT count(*) FROM audit_log WHERE hash IS NOT NULL)"
    ).fetchone()
    assert counts is not None and counts[0] == counts[1] == counts[2] > 5
    assert app.execute("SELECT status FROM payment_status WHERE payment_id = %s",
                       (history["payment"],)).fetchone() == ("captured",)


def test_the_application_cannot_change_or_remove_an_event(
    history: dict[str, Any], app: psycopg.Connection[Any], owner: psycopg.Connection[Any]
) -> None:
    before = owner.execute("SELECT count(*), md5(string_agg(state::text, '' ORDER BY notification_id))"
                           " FROM ledger_events").fetchone()
    assert refused(app, "UPDATE ledger_events SET topic = topic")
    assert refused(app, "UPDATE ledger_events SET state = NULL WHERE originator_id = %s", history["payment"])
    assert refused(app, "DELETE FROM ledger_events")
    assert refused(app, "DELETE FROM ledger_events WHERE originator_id = %s", history["payment"])
    assert refused(app, "TRUNCATE ledger_events CASCADE")
    assert refused(app, "LOCK TABLE ledger_events IN EXCLUSIVE MODE")
    # Appending goes through ledger_append only (with its outbox row, under the table's lock):
    # a bare INSERT would have no outbox row and could take a position out of commit order.
    assert refused(app, "INSERT INTO ledger_events (originator_id, originator_version, topic, state)"
                        " VALUES (gen_random_uuid(), 1, 'x', '')")
    for table in ("ledger_snapshots", "command_log", "outbox"):
        assert refused(app, f"DELETE FROM {table}"), table
        assert refused(app, f"TRUNCATE {table} CASCADE"), table
    assert refused(app, "UPDATE outbox SET envelope = ''::bytea")
    assert refused(app, "UPDATE outbox SET position = position")
    assert refused(app, "UPDATE command_log SET result = '{}'")
    assert refused(app, "UPDATE ledger_snapshots SET state = NULL")
    assert refused(app, "INSERT INTO outbox (position, event_id, topic, message_key, envelope)"
                        " VALUES (1, gen_random_uuid(), 't', 'k', '')")
    assert owner.execute("SELECT count(*), md5(string_agg(state::text, '' ORDER BY notification_id))"
                         " FROM ledger_events").fetchone() == before


def test_the_application_cannot_change_or_remove_an_audit_row(
    history: dict[str, Any], app: psycopg.Connection[Any], owner: psycopg.Connection[Any]
) -> None:
    before = owner.execute("SELECT count(*), md5(string_agg(hash, '' ORDER BY position)) FROM audit_log").fetchone()
    first = app.execute("SELECT position FROM audit_log ORDER BY position LIMIT 1").fetchone()
    assert first is not None
    assert refused(app, "UPDATE audit_log SET event_type = 'payment.settled' WHERE position = %s", first[0])
    assert refused(app, "UPDATE audit_log SET data = '{}'")
    assert refused(app, "DELETE FROM audit_log")
    assert refused(app, "DELETE FROM audit_log WHERE position = %s", first[0])
    assert refused(app, "TRUNCATE audit_log")
    # The hashes it may set are those of a row still waiting for its predecessor, never a chained one's.
    assert refused(app, "UPDATE audit_log SET hash = repeat('0', 64) WHERE position = %s", first[0])
    assert refused(app, "UPDATE audit_log SET prev_hash = NULL, hash = NULL")
    assert owner.execute("SELECT count(*), md5(string_agg(hash, '' ORDER BY position)) FROM audit_log"
                         ).fetchone() == before
    # The owner (a migration, an operator) still can: tests of `audit verify` tamper this way.
    owner.execute("UPDATE audit_log SET event_type = event_type WHERE position = %s", first)


def test_the_audit_chain_is_extended_over_rows_that_arrived_early_as_the_application(
    history: dict[str, Any], app: psycopg.Connection[Any], owner: psycopg.Connection[Any], settings: Settings,
) -> None:
    # The last events arrive first and wait unchained; the batch that fills the gap chains them:
    # an UPDATE of their hashes, the one change the application makes to a written audit row.
    chained = owner.execute("SELECT position, hash FROM audit_log ORDER BY position").fetchall()
    owner.execute("TRUNCATE audit_log")
    opener = envelope_opener(settings)
    envelopes = [msgspec.structs.replace(opener(bytes(payload)), position=position) for position, payload
                 in app.execute("SELECT position, envelope FROM outbox ORDER BY position")]
    audit = all_projections()["audit"]
    for batch in (envelopes[-2:], envelopes[:-2]):
        with app.transaction(), app.cursor() as cur:
            audit.apply_batch(cur, batch)
        if batch is envelopes[-2:]:
            assert app.execute("SELECT count(*) FROM audit_log WHERE hash IS NULL").fetchone() == (2,)
    assert app.execute("SELECT position, hash FROM audit_log ORDER BY position").fetchall() == chained


def test_the_application_may_not_run_or_redefine_what_it_does_not_own(app: psycopg.Connection[Any]) -> None:
    assert refused(app, "CREATE TABLE public.intruder (x int)")
    assert refused(app, "CREATE SCHEMA intruder")
    assert refused(app, "ALTER TABLE ledger_events DISABLE ROW LEVEL SECURITY")
    assert refused(app, "ALTER FUNCTION ledger_append(uuid[], bigint[], text[], bytea[], uuid[], text[], text[],"
                        " bytea[], uuid[], uuid[], bytea[], text[], uuid[], integer, text, text, text, uuid, jsonb)"
                        " SECURITY INVOKER")
    assert refused(app, "ALTER TABLE audit_log DISABLE TRIGGER audit_log_chained_rows_are_final")
    assert refused(app, "SELECT nextval('ledger_events_notification_id_seq')")
    assert refused(app, "SELECT * FROM schema_migrations")


def test_ledger_append_runs_as_its_owner_with_a_fixed_search_path_and_only_for_the_application(
    owner: psycopg.Connection[Any],
) -> None:
    row = owner.execute(
        "SELECT p.prosecdef, p.proconfig, has_function_privilege('echotransact_reader', p.oid, 'EXECUTE'),"
        " has_function_privilege(%s, p.oid, 'EXECUTE'),"
        " EXISTS (SELECT FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a"
        " WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')"
        " FROM pg_proc p WHERE p.proname = 'ledger_append'",
        (APP_ROLE,),
    ).fetchone()
    assert row is not None
    security_definer, config, reader_may, app_may, public_may = row
    assert security_definer and app_may and not reader_may and not public_may
    assert config == ["search_path=public, pg_temp"]


def test_every_table_has_decided_privileges(owner: psycopg.Connection[Any]) -> None:
    tables = [t for (t,) in owner.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace"
        " AND c.relkind IN ('r', 'p') ORDER BY 1"
    )]
    undecided = sorted(set(tables) - set(PRIVILEGES))
    assert undecided == [], f"decide what {APP_ROLE} may do on {undecided} (migration, README, this test)"
    for table in tables:
        granted = {p for p in ALL if owner.execute("SELECT has_table_privilege(%s, %s, %s)",
                                                   (APP_ROLE, table, p)).fetchone() == (True,)}
        columns = {c for (c,) in owner.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped"
            " AND has_column_privilege(%s, attrelid, attnum, 'UPDATE')", (table, APP_ROLE))}
        tables_privileges, update_columns = PRIVILEGES[table]
        assert granted == tables_privileges, table
        if "UPDATE" not in granted:
            assert columns == update_columns, table


def test_the_migration_can_run_again_on_another_database_of_the_cluster(owner_database_url: str) -> None:
    # The roles are the cluster's: a second database (a staging one, say) finds them and only
    # grants. Every migration runs there in order, as on any new database (0015 alone cannot run
    # again on a migrated one: a later migration dropped columns it grants on).
    dbname = f"roles_again_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(owner_database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    url = make_conninfo(owner_database_url, dbname=dbname)
    try:
        assert [m.version for m in migrate(url)] == [m.version for m in available()]
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (APP_ROLE,)).fetchone() == (1,)
            assert conn.execute("SELECT has_table_privilege(%s, 'outbox_pending', 'DELETE')",
                                (APP_ROLE,)).fetchone() == (True,)
    finally:
        with psycopg.connect(owner_database_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


def test_only_the_owner_migrates(database_url: str, owner_database_url: str) -> None:
    with pytest.raises(MigrationError, match="MIGRATION_DATABASE_URL"):
        migrate(database_url)
    assert migrate(owner_database_url) == []


def test_the_command_line_migrates_as_the_owner_and_runs_the_rest_as_the_application(
    monkeypatch: pytest.MonkeyPatch, database_url: str, owner_database_url: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ECHOTRANSACT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PGAPPNAME", "echotransact-test")  # main() would set it for the rest of the run
    for name in ("DATABASE_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.setenv(name, database_url if name == "DATABASE_URL" else "unused:1")
    # An existing deployment whose DATABASE_URL now names the application's role, but no owner:
    # a readable refusal, not a half-applied migration.
    monkeypatch.delenv("MIGRATION_DATABASE_URL", raising=False)
    assert main(["migrate"]) == 2
    assert "MIGRATION_DATABASE_URL" in capsys.readouterr().err
    monkeypatch.setenv("MIGRATION_DATABASE_URL", owner_database_url)
    assert main(["migrate"]) == 0
    assert "applied 0 migration(s)" in capsys.readouterr().out
    with cli._servers(tmp_path) as (app_url, _, _), cli._servers(tmp_path, owner=True) as (owner_url, _, _):
        assert (app_url, owner_url) == (database_url, owner_database_url)
    # With embedded servers, the application's URL is the superuser's with the user replaced.
    assert conninfo_to_dict(app_database_url(owner_database_url)) == {
        **conninfo_to_dict(owner_database_url), "user": APP_ROLE}
