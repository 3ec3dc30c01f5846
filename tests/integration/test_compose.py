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
    url = SERVICES["api"]["environment"]["DATABASE_URL"]
    db = SERVICES["postgres"]["environment"]
    assert re.fullmatch(rf"postgresql://{db['POSTGRES_USER']}:.+@postgres:5432/{db['POSTGRES_DB']}", url)
    assert SERVICES["api"]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
