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
                "ECHOTRANSACT_HASH_KEY"}
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
    assert SERVICES["api"]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"


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
