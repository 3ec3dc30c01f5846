"""The read views on real PostgreSQL: merchant isolation through every method and, without the
Python filters, through row-level security itself; pooled connections under concurrency;
pagination; funnel and volume numbers against expectations computed from the event feed."""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, timedelta
from typing import Any, TypedDict
from uuid import UUID

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.dev.servers import ServerURLs
from api.bootstrap import build_ledger, envelope_opener, personal_data_reader
from api.settings import Settings
from application.ledger import Ledger
from migrations import migrate
from projections.engine import ProjectionStore
from projections.registry import all_projections
from projections.views import ReadViews, Scope
from tests.application.flows import new_merchant, open_session, pay
from tests.projections.test_engine import feed, scenario

READER = "echotransact_reader"
ROLES = ("merchant", "analyst", "compliance", "admin")
# What each role sees of each table: "own" (a merchant's rows), "all" or "none". The contract
# of migrations/0004_row_level_security.sql, checked below without any Python filter.
POLICY: dict[str, dict[str, str]] = {
    "session_status":            {"merchant": "own", "analyst": "none", "compliance": "none", "admin": "all"},
    "payment_status":            {"merchant": "own", "analyst": "none", "compliance": "none", "admin": "all"},
    "funnel_daily":              {"merchant": "own", "analyst": "all", "compliance": "all", "admin": "all"},
    "volume_daily":              {"merchant": "own", "analyst": "all", "compliance": "all", "admin": "all"},
    "decline_reasons_daily":     {"merchant": "own", "analyst": "all", "compliance": "all", "admin": "all"},
    "analytics_session_cohorts": {"merchant": "own", "analyst": "none", "compliance": "all", "admin": "all"},
    "analytics_payments":        {"merchant": "own", "analyst": "none", "compliance": "all", "admin": "all"},
    "audit_log":                 {"merchant": "own", "analyst": "none", "compliance": "all", "admin": "all"},
    "ledger_balances":           {"merchant": "own", "analyst": "none", "compliance": "none", "admin": "all"},
    "ledger_postings":           {"merchant": "own", "analyst": "none", "compliance": "none", "admin": "all"},
}
TABLES = tuple(POLICY)
FUNNEL_STEP = {  # written out again here, so the expectation does not borrow the projection's map
    "payment_session.opened": "opened", "payment_session.link_sent": "link_sent",
    "payment_session.link_opened": "link_opened", "payment_session.code_verified": "code_verified",
    "payment_session.identity_verified": "identity_verified", "payment_session.completed": "paid",
    "payment_session.failed": "failed", "payment_session.expired": "expired",
    "payment_session.cancelled": "cancelled", "payment_session.locked": "locked",
}
FUNNEL_COLUMNS = tuple(FUNNEL_STEP.values())
VOLUME_COLUMNS = ("authorized_count", "declined_count", "captured_count", "gross_captured_minor",
                  "refunded_minor", "fees_minor")


def catch_up(database_url: str, settings: Settings) -> None:
    store = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()),
                            envelope_opener(settings))
    try:
        store.catch_up(grace=timedelta(0))
    finally:
        store.close()


@dataclass(frozen=True)
class Data:
    a: UUID  # merchant A: two sessions, a captured-and-refunded payment, a declined one, a captured one
    b: UUID  # merchant B: cancelled, locked, expired, one captured payment and one declined
    ids: dict[str, UUID]

    def other(self, merchant: UUID) -> UUID:
        return self.b if merchant == self.a else self.a


@pytest.fixture
def data(ledger: Ledger, database_url: str, settings: Settings) -> Data:
    ids = scenario(ledger)
    # scenario() gives merchant B no money; one captured payment makes every table two-sided.
    s6 = open_session(ledger, ids["m2"], "s6", amount_minor=1_800)
    p3 = pay(ledger, s6, prefix="s6-")
    ledger.authorize_payment(p3)
    ledger.capture_payment("cap3", p3)
    # And a declined card, so that B has decline reasons too.
    s7 = open_session(ledger, ids["m2"], "s7", amount_minor=1_100)
    declined_b = pay(ledger, s7, last4="0002", prefix="s7-")
    ledger.authorize_payment(declined_b)
    catch_up(database_url, settings)
    return Data(a=ids["m1"], b=ids["m2"], ids={**ids, "s6": s6, "p3": p3, "s7": s7, "declined_b": declined_b})


@pytest.fixture
def views(database_url: str) -> Iterator[ReadViews]:
    with ReadViews(database_url) as v:
        yield v


def merchant(m: UUID) -> Scope:
    return Scope("merchant", m)


def merchants_in(rows: list[dict[str, Any]]) -> set[str | None]:
    return {r["merchant_id"] for r in rows}


def owner_rows(database_url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


class Window(TypedDict):
    date_from: date
    date_to: date


def funnel_days(database_url: str) -> Window:
    """The days the data fell on (one, unless the run crossed midnight UTC), as a date window."""
    first, last = owner_rows(database_url, "SELECT min(day), max(day) FROM funnel_daily")[0]
    return Window(date_from=first, date_to=last)


# -- scope --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "merchant_id"), [
    ("merchant", None), ("admin", UUID(int=1)), ("analyst", UUID(int=1)), ("root", None), ("", None),
])
def test_a_scope_is_a_known_role_with_a_merchant_exactly_when_it_is_a_merchant(
    role: str, merchant_id: UUID | None
) -> None:
    with pytest.raises(ValueError):
        Scope(role, merchant_id)


# -- isolation through the views ------------------------------------------------------------------


def test_a_merchant_sees_only_its_own_rows_through_every_method(
    views: ReadViews, data: Data, database_url: str
) -> None:
    ids = data.ids
    own = {data.a: {"sessions": ["s1", "s2"], "payments": ["p1", "p2", "declined"]},
           data.b: {"sessions": ["s3", "s4", "s5", "s6", "s7"], "payments": ["p3", "declined_b"]}}
    window = funnel_days(database_url)
    for m, mine in own.items():
        scope, theirs = merchant(m), own[data.other(m)]
        for key in mine["sessions"]:
            row = views.session(scope, ids[key])
            assert row is not None and row["merchant_id"] == str(m) and row["session_id"] == str(ids[key])
        for key in theirs["sessions"]:
            assert views.session(scope, ids[key]) is None
        for key in mine["payments"]:
            row = views.payment(scope, ids[key])
            assert row is not None and row["merchant_id"] == str(m)
            assert [e["version"] for e in row["timeline"]] == list(range(1, row["version"] + 1))
        for key in theirs["payments"]:
            assert views.payment(scope, ids[key]) is None  # exactly as a payment that does not exist:
            assert views.payment(scope, uuid.uuid4()) is None
            with pytest.raises(ValueError, match="not a payment you can see"):
                views.payments(scope, starting_after=ids[key])
        with pytest.raises(ValueError, match="not a payment you can see"):
            views.payments(scope, starting_after=uuid.uuid4())

        payments, has_more = views.payments(scope, limit=100)
        assert {p["payment_id"] for p in payments} == {str(ids[k]) for k in mine["payments"]} and not has_more

        balances = views.balances(scope)
        assert balances and merchants_in(balances) == {str(m)}
        assert all(b["account"].startswith(f"merchant:{m}:") for b in balances)

        audit = views.audit_events(scope, limit=1_000)
        assert audit and merchants_in(audit) == {str(m)}
        assert views.audit_events(scope, aggregate_id=ids[theirs["sessions"][0]]) == []
        assert views.audit_events(scope, merchant_id=data.other(m)) == []

        opened = {r[0]: r[1] for r in owner_rows(
            database_url, "SELECT merchant_id, sum(opened)::bigint FROM funnel_daily GROUP BY 1")}
        funnel = views.funnel(scope, **window)
        assert sum(r["opened"] for r in funnel) == opened[m]
        assert views.funnel(scope, **window, merchant_id=data.other(m)) == []

        gross = {r[0]: r[1] for r in owner_rows(
            database_url, "SELECT merchant_id, sum(gross_captured_minor)::bigint FROM volume_daily GROUP BY 1")}
        volume = views.volume(scope, **window, granularity="month")
        assert sum(r["gross_captured_minor"] for r in volume) == gross[m]
        assert views.volume(scope, **window, merchant_id=data.other(m)) == []


def test_other_roles_see_what_the_policy_gives_them(views: ReadViews, data: Data, database_url: str) -> None:
    ids = data.ids
    window = funnel_days(database_url)
    admin, analyst, compliance = Scope("admin"), Scope("analyst"), Scope("compliance")
    every_merchant = {str(data.a), str(data.b)}

    assert views.session(admin, ids["s3"])["merchant_id"] == str(data.b)  # type: ignore[index]
    assert views.payment(admin, ids["p1"])["merchant_id"] == str(data.a)  # type: ignore[index]
    assert merchants_in(views.payments(admin)[0]) == every_merchant
    assert merchants_in(views.balances(admin)) == {*every_merchant, None}  # platform accounts too
    assert merchants_in(views.audit_events(admin, limit=1_000)) == every_merchant
    assert merchants_in(views.audit_events(compliance, limit=1_000)) == every_merchant
    assert views.audit_events(compliance, merchant_id=data.b) == views.audit_events(merchant(data.b))

    for no_personal_data in (analyst, compliance):
        assert views.session(no_personal_data, ids["s1"]) is None
        assert views.payment(no_personal_data, ids["p1"]) is None
        assert views.payments(no_personal_data) == ([], False)
        assert views.balances(no_personal_data) == []
    assert views.audit_events(analyst) == []

    opened_everywhere = owner_rows(database_url, "SELECT sum(opened)::bigint FROM funnel_daily")[0][0]
    for sees_all in (admin, analyst, compliance):
        assert sum(r["opened"] for r in views.funnel(sees_all, **window)) == opened_everywhere
        only_b = views.funnel(sees_all, **window, merchant_id=data.b)
        assert only_b == views.funnel(merchant(data.b), **window)


# -- row-level security without the Python filters ---------------------------------------------------


def visible(conn: psycopg.Connection[Any], table: str) -> list[str | None]:
    return [None if r[0] is None else str(r[0]) for r in conn.execute(
        sql.SQL("SELECT merchant_id FROM {}").format(sql.Identifier(table))).fetchall()]


def as_reader(conn: psycopg.Connection[Any], role: str | None, merchant_id: UUID | None) -> None:
    """Session-level, as a careless caller would: SET ROLE and plain (not local) settings."""
    conn.execute(f"SET ROLE {READER}")
    if role is not None:
        conn.execute("SELECT set_config('app.role', %s, false)", (role,))
    if merchant_id is not None:
        conn.execute("SELECT set_config('app.merchant_id', %s, false)", (str(merchant_id),))


def test_row_level_security_alone_shows_each_role_what_the_policy_says(database_url: str, data: Data) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        everything = {t: visible(conn, t) for t in TABLES}
    for table, rows in everything.items():  # both merchants have rows everywhere, or the test proves little
        assert {str(data.a), str(data.b)} <= set(rows), table
    assert None in everything["ledger_balances"]  # the platform's accounts

    for role in ROLES:
        for m in (data.a, data.b):
            with psycopg.connect(database_url, autocommit=True) as conn:
                as_reader(conn, role, m if role == "merchant" else None)
                assert conn.execute("SELECT current_user").fetchone() == (READER,)
                for table in TABLES:
                    expected = {
                        "own": sorted(r for r in everything[table] if r == str(m)),
                        "all": sorted(everything[table], key=str),
                        "none": [],
                    }[POLICY[table][role]]
                    assert sorted(visible(conn, table), key=str) == expected, (role, table)


@pytest.mark.parametrize("settings_given", [
    {}, {"app.role": ""}, {"app.role": "merchant"}, {"app.merchant_id": "A"},
    {"app.role": "merchant", "app.merchant_id": ""}, {"app.role": "Admin"}, {"app.role": "root"},
])
def test_missing_or_unknown_settings_show_no_rows(
    database_url: str, data: Data, settings_given: dict[str, str]
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Set and reset first: a setting once set in a session reads as '' afterwards, not NULL.
        with conn.transaction():
            conn.execute("SELECT set_config('app.role', 'admin', true), set_config('app.merchant_id', %s, true)",
                         (str(data.a),))
        conn.execute(f"SET ROLE {READER}")
        for name, value in settings_given.items():
            conn.execute("SELECT set_config(%s, %s, false)", (name, str(data.a) if value == "A" else value))
        for table in TABLES:
            assert visible(conn, table) == [], table
    with psycopg.connect(database_url, autocommit=True) as fresh:  # never set at all: NULL
        fresh.execute(f"SET ROLE {READER}")
        for table in TABLES:
            assert visible(fresh, table) == [], table


def test_the_reader_owns_nothing_cannot_write_and_every_table_forces_its_policies(
    database_url: str, data: Data
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        catalog = conn.execute(
            "SELECT c.relname, pg_get_userbyid(c.relowner), c.relrowsecurity, c.relforcerowsecurity"
            " FROM pg_class c WHERE c.oid = ANY(%s::regclass[])", (list(TABLES),)
        ).fetchall()
        assert len(catalog) == len(TABLES)
        for table, owner, enabled, forced in catalog:
            assert owner != READER and enabled and forced, table
        assert conn.execute(
            "SELECT rolcanlogin, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s", (READER,)
        ).fetchone() == (False, False, False)
        conn.execute(f"SET ROLE {READER}")
        conn.execute("SELECT set_config('app.role', 'admin', false)")
        for statement in ("DELETE FROM audit_log", "UPDATE ledger_balances SET balance_minor = 0",
                          "TRUNCATE session_status", "SELECT * FROM ledger_events",
                          "SELECT * FROM outbox"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_the_migration_can_run_again(owner_database_url: str) -> None:
    from migrations import available

    rls = next(m for m in available() if m.version == 4)
    with psycopg.connect(owner_database_url, autocommit=True) as conn, conn.transaction():
        conn.execute(rls.sql)  # type: ignore[arg-type]
        policies = conn.execute(
            "SELECT tablename, policyname FROM pg_policies WHERE schemaname = 'public' AND tablename = ANY(%s)",
            (list(TABLES),),
        ).fetchall()
    # owner_writes, merchant_own_rows and one <role>_all_rows per role that sees all rows, and the
    # application's (migrations/0015_roles.sql: app_writes, or on audit_log its three): no more.
    app_policies = {t: 3 if t == "audit_log" else 1 for t in TABLES}
    assert Counter(t for t, _ in policies) == {
        t: 2 + app_policies[t] + sum(sees == "all" for role, sees in POLICY[t].items() if role != "merchant")
        for t in TABLES}
    names = {(t, p) for t, p in policies}
    for table, roles in POLICY.items():
        assert (table, "owner_writes") in names and (table, "merchant_own_rows") in names
        for role, sees in roles.items():
            if role != "merchant":
                assert ((table, f"{role}_all_rows") in names) == (sees == "all"), (table, role)


# -- pooled connections under concurrency ------------------------------------------------------------


def test_concurrent_scopes_on_pooled_connections_never_mix(
    views: ReadViews, data: Data, database_url: str
) -> None:
    ids = data.ids
    sessions = {data.a: ids["s1"], data.b: ids["s4"]}
    payments = {data.a: ids["p1"], data.b: ids["p3"]}
    opened = {r[0]: r[1] for r in owner_rows(
        database_url, "SELECT merchant_id, sum(opened)::bigint FROM funnel_daily GROUP BY 1")}
    window = funnel_days(database_url)

    def only(rows: list[dict[str, Any]], m: UUID) -> None:
        assert rows and merchants_in(rows) == {str(m)}

    def check_session(s: Scope, m: UUID) -> None:
        assert views.session(s, sessions[m])["merchant_id"] == str(m)  # type: ignore[index]
        assert views.session(s, sessions[data.other(m)]) is None

    def check_payment(s: Scope, m: UUID) -> None:
        row = views.payment(s, payments[m])
        assert row is not None and row["merchant_id"] == str(m) and row["timeline"]
        assert views.payment(s, payments[data.other(m)]) is None

    def check_funnel(s: Scope, m: UUID) -> None:
        assert sum(r["opened"] for r in views.funnel(s, **window)) == opened[m]

    checks: list[Callable[[Scope, UUID], None]] = [
        check_session,
        check_payment,
        check_funnel,
        lambda s, m: only(views.payments(s)[0], m),
        lambda s, m: only(views.balances(s), m),
        lambda s, m: only(views.audit_events(s, limit=1_000), m),
        lambda s, m: only(views.audit_events(s, aggregate_id=sessions[m]), m),
    ]
    threads, per_thread = 8, 25  # 200 calls, each of one scope
    failures: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(n: int) -> None:
        start.wait()
        for i in range(per_thread):
            m = data.a if (n + i) % 2 == 0 else data.b
            try:
                checks[(n + i) % len(checks)](merchant(m), m)
            except BaseException as exc:  # collected and re-raised below
                failures.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not failures, failures[:3]
    # And nothing of a scope stays on a pooled connection once its transaction is over.
    with views._pool.connection() as conn:
        assert conn.execute(
            "SELECT current_user <> %s, coalesce(current_setting('app.role', true), ''),"
            " coalesce(current_setting('app.merchant_id', true), '')", (READER,)
        ).fetchone() == (True, "", "")


# -- pagination -----------------------------------------------------------------------------------


def test_payments_are_paged_newest_first_and_filtered(
    ledger: Ledger, views: ReadViews, database_url: str, settings: Settings
) -> None:
    m, other = new_merchant(ledger, "m-a"), new_merchant(ledger, "m-b")
    created = []
    for i in range(7):
        session = open_session(ledger, m, f"open-{i}")
        created.append(pay(ledger, session, last4="0002" if i == 5 else "4242", prefix=f"p{i}-"))
    pay(ledger, open_session(ledger, other, "open-other"), prefix="other-")  # never on m's pages
    for i in (1, 3, 5):
        ledger.authorize_payment(created[i])  # 5 is declined
    catch_up(database_url, settings)
    scope = merchant(m)

    pages, after, more = [], None, True
    while more:
        page, more = views.payments(scope, limit=3, starting_after=after)
        pages.append([UUID(p["payment_id"]) for p in page])
        after = pages[-1][-1]
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [p for page in pages for p in page] == created[::-1]  # newest first, no overlap, none missing

    assert {UUID(p["payment_id"]) for p in views.payments(scope, status="authorized")[0]} == {created[1], created[3]}
    assert [UUID(p["payment_id"]) for p in views.payments(scope, status="failed")[0]] == [created[5]]
    assert views.payments(scope, status="captured") == ([], False)

    at = {UUID(p["payment_id"]): p["created_at"] for p in views.payments(scope, limit=100)[0]}
    assert len(set(at.values())) == 7
    window, more = views.payments(scope, created_from=at[created[2]], created_to=at[created[5]])
    assert [UUID(p["payment_id"]) for p in window] == [created[4], created[3], created[2]] and not more
    page, more = views.payments(scope, created_from=at[created[2]], limit=2)
    assert [UUID(p["payment_id"]) for p in page] == [created[6], created[5]] and more

    for bad in ({"limit": 0}, {"limit": 101},
                {"created_from": at[created[3]], "created_to": at[created[2]]}):
        with pytest.raises(ValueError):
            views.payments(scope, **bad)  # type: ignore[arg-type]


# -- analytics numbers --------------------------------------------------------------------------------


def expected_analytics(
    database_url: str, settings: Settings
) -> tuple[dict[tuple[str, date, str], Counter[str]], dict[tuple[str, date, str], Counter[str]]]:
    """Funnel per (merchant, day, platform) and volume per (merchant, day, currency), straight
    from the event feed."""
    cohort: dict[UUID, tuple[str, date, str]] = {}
    currency: dict[UUID, str] = {}
    funnel: dict[tuple[str, date, str], Counter[str]] = defaultdict(Counter)
    volume: dict[tuple[str, date, str], Counter[str]] = defaultdict(Counter)
    for e in feed(database_url, settings):
        day, d = e.occurred_at.astimezone(UTC).date(), e.data
        if e.event_type == "payment_session.opened":
            cohort[e.aggregate_id] = (str(e.merchant_id), day, d["voice_platform"])
        if e.event_type in FUNNEL_STEP:
            funnel[cohort[e.aggregate_id]][FUNNEL_STEP[e.event_type]] += 1
        if e.event_type == "payment.initiated":
            currency[e.aggregate_id] = d["currency"]
        key = (str(e.merchant_id), day, currency.get(e.aggregate_id, ""))
        if e.event_type == "payment.authorized":
            volume[key]["authorized_count"] += 1
        elif e.event_type == "payment.failed":
            volume[key]["declined_count"] += 1
        elif e.event_type == "payment.captured":
            volume[key].update(captured_count=1, gross_captured_minor=d["amount_minor"], fees_minor=d["fee_minor"])
        elif e.event_type == "payment.refunded":
            volume[key]["refunded_minor"] += d["amount_minor"]
    return funnel, volume


def summed(
    rows: dict[tuple[str, date, str], Counter[str]], merchants: set[str]
) -> dict[tuple[date, str], Counter[str]]:
    out: dict[tuple[date, str], Counter[str]] = defaultdict(Counter)
    for (m, day, other), counts in rows.items():
        if m in merchants:
            out[(day, other)].update(counts)
    return out


def test_funnel_and_volume_match_the_event_feed(
    views: ReadViews, data: Data, database_url: str, settings: Settings
) -> None:
    funnel, volume = expected_analytics(database_url, settings)
    days = sorted({day for _, day, _ in funnel})
    window = Window(date_from=days[0], date_to=days[-1])
    for scope, merchants in ((Scope("analyst"), {str(data.a), str(data.b)}),
                             (merchant(data.a), {str(data.a)}), (merchant(data.b), {str(data.b)}),
                             (Scope("admin"), {str(data.b)})):
        only = next(iter(merchants)) if scope.role == "admin" else None
        got = views.funnel(scope, **window, merchant_id=UUID(only) if only else None)
        want = summed(funnel, merchants)
        assert {(r["day"], r["voice_platform"]): {c: r[c] for c in FUNNEL_COLUMNS} for r in got} == {
            k: {c: v[c] for c in FUNNEL_COLUMNS} for k, v in want.items()}
        for r in got:
            assert r["conversion_rate"] == (r["paid"] / r["opened"] if r["opened"] else None)

        got_volume = views.volume(scope, **window, merchant_id=UUID(only) if only else None)
        want_volume = summed(volume, merchants)
        assert {(r["period_start"], r["currency"]): {c: r[c] for c in VOLUME_COLUMNS} for r in got_volume} == {
            k: {c: v[c] for c in VOLUME_COLUMNS} for k, v in want_volume.items()}

    # Merchant A by hand (as in test_engine): two captures of 2,500 and 3,000, one decline, 500 refunded.
    [a] = views.volume(merchant(data.a), **window)
    assert {c: a[c] for c in VOLUME_COLUMNS} == dict(zip(VOLUME_COLUMNS, (2, 1, 2, 5_500, 500, 220), strict=True))
    assert (a["net_minor"], a["approval_rate"], a["average_order_value_minor"]) == (4_780, 2 / 3, 2_750)
    [a_funnel] = views.funnel(merchant(data.a), **window)
    assert (a_funnel["opened"], a_funnel["paid"], a_funnel["conversion_rate"]) == (2, 2, 1.0)
    assert views.volume(Scope("admin"), **window, currency="EUR") == []
    assert views.funnel(Scope("admin"), **window, voice_platform="google") == []
    assert views.funnel(Scope("admin"), date_from=days[-1] + timedelta(days=1),
                        date_to=days[-1] + timedelta(days=30)) == []
    with pytest.raises(ValueError, match="after"):
        views.funnel(Scope("admin"), date_from=days[0] + timedelta(days=1), date_to=days[0])
    with pytest.raises(ValueError, match="after"):
        views.volume(Scope("admin"), date_from=days[0] + timedelta(days=1), date_to=days[0])
    with pytest.raises(ValueError, match="granularity"):
        views.volume(Scope("admin"), **window, granularity="year")  # type: ignore[arg-type]


def test_volume_buckets_by_week_and_month_sum_the_days(database_url: str, views: ReadViews) -> None:
    """Synthetic days over three months and two currencies, written as the projection would."""
    a, b = uuid.uuid4(), uuid.uuid4()
    rng = random.Random(11)
    first = date(2024, 1, 20)
    rows = []
    for offset in range(60):
        day = first + timedelta(days=offset)
        for m in (a, b):
            for currency in ("USD", "EUR"):
                if rng.random() < 0.6:
                    captured = rng.randint(0, 5)
                    rows.append((m, day, currency, rng.randint(0, 9), rng.randint(0, 3), captured,
                                 captured * rng.randint(500, 5_000), rng.randint(0, 900), captured * 30))
    with psycopg.connect(database_url) as conn:
        conn.cursor().executemany(
            "INSERT INTO volume_daily (merchant_id, day, currency, " + ", ".join(VOLUME_COLUMNS) + ")"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)

    date_from, date_to = date(2024, 1, 24), date(2024, 3, 13)  # a Wednesday to a Wednesday: partial ends
    starts = {"day": lambda d: d, "week": lambda d: d - timedelta(days=d.weekday()),
              "month": lambda d: d.replace(day=1)}
    for scope, merchants in ((Scope("admin"), {a, b}), (merchant(a), {a})):
        daily = views.volume(scope, date_from=date_from, date_to=date_to, granularity="day")
        for granularity, start in starts.items():
            want: dict[tuple[date, str], Counter[str]] = defaultdict(Counter)
            for m, day, currency, *numbers in rows:
                if m in merchants and date_from <= day <= date_to:
                    want[(start(day), currency)].update(dict(zip(VOLUME_COLUMNS, numbers, strict=True)))
            got = views.volume(scope, date_from=date_from, date_to=date_to, granularity=granularity)  # type: ignore[arg-type]
            assert {(r["period_start"], r["currency"]): {c: r[c] for c in VOLUME_COLUMNS} for r in got} == {
                k: {c: v[c] for c in VOLUME_COLUMNS} for k, v in want.items()}, granularity
            for currency in ("USD", "EUR"):
                for column in (*VOLUME_COLUMNS, "net_minor"):
                    assert sum(r[column] for r in got if r["currency"] == currency) == sum(
                        r[column] for r in daily if r["currency"] == currency), (granularity, column)
            for r in got:
                assert r["net_minor"] == r["gross_captured_minor"] - r["refunded_minor"] - r["fees_minor"]
                decided = r["authorized_count"] + r["declined_count"]
                assert r["approval_rate"] == (r["authorized_count"] / decided if decided else None)
                assert r["average_order_value_minor"] == (
                    r["gross_captured_minor"] // r["captured_count"] if r["captured_count"] else None)
        weeks = [r["period_start"] for r in views.volume(scope, date_from=date_from, date_to=date_to,
                                                          granularity="week")]
        assert weeks[0] == date(2024, 1, 22) and all(w.weekday() == 0 for w in weeks)
        months = {r["period_start"] for r in views.volume(scope, date_from=date_from, date_to=date_to,
                                                           granularity="month")}
        assert months == {date(2024, 1, 1), date(2024, 2, 1), date(2024, 3, 1)}


# -- a production-like owner: not a superuser, so FORCE applies to it ------------------------------------


def test_a_non_superuser_owner_still_projects_and_reads_under_forced_policies(
    servers: ServerURLs, template_database: str, settings: Settings
) -> None:
    """Superusers bypass RLS, so the tests' `postgres` proves nothing about the owner policy.
    Here the application's own role owns the database, runs the migrations and the projections,
    and reads through the views. (template_database: the reader role exists, as an operator
    would have created it.)"""
    suffix = uuid.uuid4().hex[:10]
    role, dbname = f"et_owner_{suffix}", f"t_owner_{suffix}"
    with psycopg.connect(servers.database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS").format(sql.Identifier(role)))
        admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(dbname), sql.Identifier(role)))
    url = make_conninfo(servers.database_url, user=role, dbname=dbname)
    try:
        migrate(url)  # warns that it cannot grant the reader role to itself: the operator does
        with psycopg.connect(servers.database_url, autocommit=True) as admin:
            admin.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(READER), sql.Identifier(role)))
        ledger = build_ledger(settings, url, clock=ManualClock(), processor=SandboxProcessor())
        try:
            ids = scenario(ledger)
        finally:
            ledger.close()
        catch_up(url, settings)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_user, usesuper FROM pg_user WHERE usename = current_user"
                                ).fetchone() == (role, False)
            assert conn.execute("SELECT count(*) FROM session_status").fetchone() == (5,)
            assert conn.execute("SELECT bool_and(relforcerowsecurity) FROM pg_class WHERE oid = ANY(%s::regclass[])",
                                (list(TABLES),)).fetchone() == (True,)
        with ReadViews(url) as views:
            assert {s["session_id"] for s in views.payments(Scope("admin"))[0]} == {
                str(ids[s]) for s in ("s1", "s2")}
            assert views.session(merchant(ids["m2"]), ids["s1"]) is None
            assert merchants_in(views.audit_events(merchant(ids["m1"]), limit=1_000)) == {str(ids["m1"])}
            assert len(views.balances(Scope("admin"))) > len(views.balances(merchant(ids["m1"]))) > 0
    finally:
        with psycopg.connect(servers.database_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
