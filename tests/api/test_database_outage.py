"""The database goes away under a running API: every request is answered at once with a 503
problem and Retry-After (never a hang, never a 500), and once it is back, connections that died
with it are replaced and requests succeed again."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.api.conftest import Api, session_body


@contextmanager
def database_down(database_url: str) -> Iterator[None]:
    """New connections refused and every existing one killed, as a restart does to its clients."""
    parts = conninfo_to_dict(database_url)
    name = str(parts["dbname"])
    admin = make_conninfo(**{**parts, "dbname": "postgres", "user": "postgres"})  # type: ignore[arg-type]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
                     " AND pid <> pg_backend_pid()", (name,))
        try:
            yield
        finally:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))


def test_an_outage_answers_503_promptly_and_recovery_needs_no_restart(api: Api) -> None:
    merchant = api.client("a")
    created = merchant.post("/v1/payment-sessions", json=session_body(), headers={"Idempotency-Key": "before"})
    assert created.status_code == 201
    session_id = created.json()["id"]
    with database_down(api.database_url):
        for method, path, body in (("GET", f"/v1/payment-sessions/{session_id}", None),
                                   ("POST", "/v1/payment-sessions", session_body()),
                                   ("GET", "/v1/payments", None)):
            started = time.monotonic()
            answer = merchant.request(method, path, json=body, headers={"Idempotency-Key": "during"})
            took = time.monotonic() - started
            assert answer.status_code == 503, (path, answer.status_code, answer.text)
            assert answer.headers["content-type"].startswith("application/problem+json")
            assert answer.headers["retry-after"] and answer.json()["code"] == "service_unavailable"
            assert took < 8, f"{path} waited {took:.1f} s"
    # Back: the pools replace the connections that died (each pool retries with a backoff, so a
    # few seconds may still answer 503, never anything else), and the key refused during the
    # outage was never claimed, so the same request now goes through.
    deadline = time.monotonic() + 45
    pending = {"read": True, "write": True}
    while any(pending.values()):
        assert time.monotonic() < deadline, f"not recovered: {pending}"
        if pending["write"]:
            again = merchant.post("/v1/payment-sessions", json=session_body(), headers={"Idempotency-Key": "during"})
            assert again.status_code in (201, 503), again.text
            pending["write"] = again.status_code != 201
        if pending["read"]:
            read = merchant.get(f"/v1/payment-sessions/{session_id}")
            assert read.status_code in (200, 404, 503), read.text
            pending["read"] = read.status_code == 503
        time.sleep(0.5)
