"""Shared fixtures: real servers for the whole run, a fresh migrated database per test."""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from hypothesis import settings as hypothesis_settings
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.dev.servers import LocalServers, ServerURLs
from api.bootstrap import app_database_url, build_ledger
from api.settings import Settings
from application.ledger import Ledger
from domain.risk import DEFAULT_POLICY as DEFAULT_RISK_POLICY
from migrations import migrate

# A shared, noisy machine stalls a process for a few hundred milliseconds now and then; the
# default deadline of 200 ms an example would report such a stall as a (flaky) failure.
hypothesis_settings.register_profile("echotransact", deadline=None)
hypothesis_settings.load_profile("echotransact")

MIDNIGHT_MARGIN_S = 180


@pytest.fixture
def away_from_midnight() -> None:
    """For tests that take today's date from the clock and need it to stay today while they run
    (a processor's day closed, then reconciled and paid out): when fewer than three minutes are
    left before UTC midnight, wait until it has passed. At most one test of a run waits."""
    now = datetime.now(UTC)
    left = (datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC) - now).total_seconds()
    if left < MIDNIGHT_MARGIN_S:
        time.sleep(left + 1)


TEMPLATE_DB = "echotransact_test_template"


@pytest.fixture(scope="session")
def servers() -> Iterator[ServerURLs]:
    """The configured servers (DATABASE_URL, ...) or embedded ones that stop with the run."""
    with tempfile.TemporaryDirectory(prefix="echotransact-test-") as tmp:
        Path(tmp).chmod(0o777)  # the embedded PostgreSQL runs as its own user when we are root
        with LocalServers.from_env(Path(tmp), persistent=False) as urls:
            yield urls


def _with_db(url: str, dbname: str) -> str:
    parts = conninfo_to_dict(url)
    parts["dbname"] = dbname
    return make_conninfo("", **parts)


@pytest.fixture(scope="session")
def template_database(servers: ServerURLs) -> str:
    with psycopg.connect(servers.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(TEMPLATE_DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
    url = _with_db(servers.database_url, TEMPLATE_DB)
    migrate(url)
    return url


def _fresh_database(servers: ServerURLs) -> Iterator[str]:
    """A database of its own, copied from the migrated template (fast), dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(servers.database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    yield _with_db(servers.database_url, name)
    with psycopg.connect(servers.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def owner_database_url(servers: ServerURLs, template_database: str) -> Iterator[str]:
    """The test's database as the tables' owner (the servers' superuser), who migrates and rebuilds:
    for what the application may not do (replay, tampering with rows a test then detects)."""
    yield from _fresh_database(servers)


@pytest.fixture
def database_url(owner_database_url: str) -> str:
    """The same database as the application connects to it: the role echotransact_app."""
    return app_database_url(owner_database_url)


@pytest.fixture(scope="module")
def module_owner_database(servers: ServerURLs, template_database: str) -> Iterator[str]:
    """One database for a whole module whose tests share one served API, as the tables' owner."""
    yield from _fresh_database(servers)


@pytest.fixture(scope="module")
def module_database(module_owner_database: str) -> str:
    """``module_owner_database`` as the application connects to it."""
    return app_database_url(module_owner_database)


# Most tests pay many times from one phone with one card within minutes, which the production
# velocity rules would rightly decline; they test other things. Tests of the risk rules use
# DEFAULT_RISK_POLICY (tests/application/test_risk.py, tests/api/test_payment_page.py).
NO_VELOCITY = replace(DEFAULT_RISK_POLICY, max_attempts_per_phone=10**6, max_attempts_per_card=10**6,
                      card_velocity_points=0, phone_velocity_points=0)


@pytest.fixture
def settings() -> Settings:
    return Settings(hash_key=b"h" * 32, encryption_key=b"e" * 32, vault_key=b"v" * 32, master_key=b"m" * 32,
                    risk_policy=NO_VELOCITY)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def processor() -> SandboxProcessor:
    return SandboxProcessor()


@pytest.fixture
def ledger(
    settings: Settings, database_url: str, clock: ManualClock, processor: SandboxProcessor
) -> Iterator[Ledger]:
    app = build_ledger(settings, database_url, clock=clock, processor=processor)
    yield app
    app.close()
