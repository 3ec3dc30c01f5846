"""The Grafana dashboard and Prometheus of compose.yaml stay true to the code: every metric the
dashboard queries is one the running code exposes (by name), and compose mounts what exists."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY

from adapters.postgres.metrics import CHECKS, DatabaseGauges, PoolCollector, connect_per_scrape
from api.bootstrap import open_database
from projections.registry import all_projections

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
DASHBOARD = json.loads((REPO / "deploy/grafana/dashboards/echotransact.json").read_text())
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",), "summary": ("",)}


def exposed_names(database_url: str) -> set[str]:
    # What each process loads (its counters register on import).
    import adapters.kafka.relay
    import adapters.notifications.webhooks
    import adapters.postgres.event_store
    import adapters.processors.client
    import api.metrics
    import projections.worker

    assert api.metrics and adapters.kafka.relay and adapters.notifications.webhooks and projections.worker
    assert adapters.postgres.event_store and adapters.processors.client
    pool = open_database(database_url)
    try:
        families: list[Any] = [*REGISTRY.collect(), *PoolCollector(pool).collect(),
                               *DatabaseGauges(connect_per_scrape(database_url), list(CHECKS),
                                               projections=list(all_projections())).collect()]
    finally:
        pool.close()
    return {family.name + suffix for family in families for suffix in SUFFIXES.get(family.type, ("",))}


def queried_names() -> set[str]:
    exprs = [t["expr"] for panel in DASHBOARD["panels"] for t in panel.get("targets", [])]
    assert exprs
    return {name for expr in exprs for name in re.findall(r"\becho[a-z_]+", expr)}


def test_every_metric_the_dashboard_queries_is_exposed(database_url: str) -> None:
    exposed = exposed_names(database_url)
    assert {"echotransact_outbox_unpublished_rows", "echotransact_commands_total"} <= exposed
    missing = queried_names() - exposed
    assert not missing, f"the dashboard queries metrics no process exposes: {sorted(missing)}"


def test_compose_runs_prometheus_and_grafana_on_the_files_in_the_repository() -> None:
    services = COMPOSE["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repository"
    scrape = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    ports = {c["job_name"]: c["dns_sd_configs"][0]["port"] for c in scrape["scrape_configs"]}
    assert ports["api"] == int(services["api"]["environment"]["ECHOTRANSACT_PORT"])
    assert ports["relay"] == int(services["relay"]["environment"]["ECHOTRANSACT_RELAY_METRICS_PORT"])
    assert ports["worker"] == int(services["worker"]["environment"]["ECHOTRANSACT_WORKER_METRICS_PORT"])
    for name in ("relay", "worker"):  # reachable from the prometheus container
        assert services[name]["environment"]["ECHOTRANSACT_METRICS_HOST"] == "0.0.0.0"


def test_the_dashboard_is_provisioned_from_prometheus() -> None:
    datasource = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    uids = {t["datasource"]["uid"] for panel in DASHBOARD["panels"] for t in panel["targets"]}
    assert uids == {datasource["uid"]} and datasource["url"] == "http://prometheus:9090"

