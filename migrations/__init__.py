"""Ordered, versioned SQL migrations and the runner that applies them, safely re-runnable.

Files are ``NNNN_name.sql`` beside this module. Each is applied once, in its own transaction,
and recorded with a checksum; an applied file that was later edited is an error, not a silent
skip. An advisory lock lets several processes start at once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import psycopg

_ADVISORY_LOCK_ID = 0x45_43_48_4F  # "ECHO"


class MigrationError(Exception):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    found = []
    for entry in resources.files(__package__).iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            if not number.isdigit():
                raise MigrationError(f"migration file {entry.name!r} must start with a number")
            found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a number: {versions}")
    return found


def migrate(database_url: str) -> list[Migration]:
    """Apply every migration not yet applied; return the ones applied now.

    Only the tables' owner may (MIGRATION_DATABASE_URL; migrations/0015_roles.sql): the
    application's role is refused with a MigrationError that says so."""
    try:
        return _migrate(database_url)
    except psycopg.errors.InsufficientPrivilege as error:
        raise MigrationError(
            f"migrations run as the tables' owner, and this role may not ({error.diag.message_primary}): "
            "set MIGRATION_DATABASE_URL to the owner's URL"
        ) from error


def _migrate(database_url: str) -> list[Migration]:
    applied_now = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_ADVISORY_LOCK_ID,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {
                version: (name, checksum)
                for version, name, checksum in conn.execute(
                    "SELECT version, name, checksum FROM schema_migrations"
                )
            }
            for migration in available():
                if migration.version in done:
                    name, checksum = done[migration.version]
                    if checksum != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version:04d}_{name} was changed after it was "
                            "applied; add a new migration instead of editing an old one"
                        )
                    continue
                with conn.transaction():
                    conn.execute(migration.sql)  # type: ignore[arg-type]  # trusted files
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
                applied_now.append(migration)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_ADVISORY_LOCK_ID,))
    return applied_now
