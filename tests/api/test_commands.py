"""Voice integrators' and merchants' commands over HTTP: contract, idempotency, errors."""

from __future__ import annotations

import contextlib
import threading
import uuid
from uuid import UUID

import httpx
import psycopg
import pytest
from litestar.testing import TestClient

from api.http.app import create_app
from api.http.health import Dependencies
from tests.api.conftest import Api, paid_payment, session_body


def test_open_a_session_then_read_it_with_read_your_writes(api: Api) -> None:
    with api.client("a") as client:
        created = client.post("/v1/payment-sessions", json=session_body(), headers={"Idempotency-Key": "k1"})
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["status"] == "link_sent" and body["amount"] == 2_500
        assert body["customer_phone"] == "+1******0123"
        assert body["links"]["self"] == f"/v1/payment-sessions/{body['id']}"
        assert body["merchant_id"] == str(api.merchants["a"]) and body["position"] >= 1

        # The projection has not run, yet its creator reads it at once, from the write model...
        early = client.get(f"/v1/payment-sessions/{body['id']}")
        assert early.status_code == 200 and early.json()["projection_caught_up"] is False
        assert early.json()["status"] == "link_sent"
        # ...as does a read that waits for the command's position.
        waited = client.get(f"/v1/payment-sessions/{body['id']}",
                            params={"wait_for_position": body["position"]})
        assert waited.status_code == 200 and waited.json()["projection_caught_up"] is False
        api.project()
        read = client.get(f"/v1/payment-sessions/{body['id']}", params={"wait_for_position": body["position"]})
        assert read.status_code == 200
        assert read.json()["projection_caught_up"] is True and read.json()["status"] == "link_sent"

        cancelled = client.post(f"/v1/payment-sessions/{body['id']}/cancel", json={"reason": "customer hung up"},
                                headers={"Idempotency-Key": "k2"})
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        again = client.post(f"/v1/payment-sessions/{body['id']}/cancel", json={"reason": "again"},
                            headers={"Idempotency-Key": "k3"})
        assert again.status_code == 409 and again.json()["code"] == "invalid_transition"
        assert again.headers["content-type"] == "application/problem+json"


def test_idempotency_replay_reuse_and_missing_key(api: Api, database_url: str) -> None:
    with api.client("a") as client:
        first = client.post("/v1/payment-sessions", json=session_body(), headers={"Idempotency-Key": "same"})
        replay = client.post("/v1/payment-sessions", json=session_body(), headers={"Idempotency-Key": "same"})
        assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
        assert replay.content == first.content and "idempotent-replayed" not in first.headers
        reused = client.post("/v1/payment-sessions", json=session_body(999), headers={"Idempotency-Key": "same"})
        assert reused.status_code == 409 and reused.json()["code"] == "idempotency_key_reused"
        missing = client.post("/v1/payment-sessions", json=session_body())
        assert missing.status_code == 400 and missing.json()["code"] == "idempotency_key_required"
    # Another merchant's identical key is its own.
    with api.client("b") as client:
        other = client.post("/v1/payment-sessions", json=session_body(), headers={"Idempotency-Key": "same"})
        assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    with psycopg.connect(database_url) as conn:
        opened = conn.execute(
            "SELECT count(*) FROM command_log WHERE command_name = 'open_session'").fetchone()[0]
    assert opened == 2


def test_a_rejection_is_replayed_too(api: Api) -> None:
    with api.client("a") as client:
        body = session_body(amount=2_500)
        body["order"]["items"][0]["unit_amount"] = 2_400
        first = client.post("/v1/payment-sessions", json=body, headers={"Idempotency-Key": "bad"})
        again = client.post("/v1/payment-sessions", json=body, headers={"Idempotency-Key": "bad"})
    assert first.status_code == again.status_code == 422
    assert first.json()["code"] == "items_do_not_sum" and again.headers["idempotent-replayed"] == "true"
    # One body builder for every problem: a command's carries the request id too (the first
    # request's, in the replay as well: the recorded answer is sent again as it was).
    assert first.json()["request_id"] == first.headers["x-request-id"]
    assert again.json() == first.json()


@pytest.mark.parametrize("phone", [
    "+15550000000",    # area code 555 does not exist
    "+14150000000",    # an exchange that cannot start with 0
    "+1415555012",     # a digit short
    "+141555501234",   # a digit too many
    "+447700900123",   # the UK's range kept for drama: never a real line
    "+99912345678",    # no such country code
])
def test_a_phone_number_that_cannot_exist_is_refused_before_any_sms(api: Api, database_url: str,
                                                                   phone: str) -> None:
    key = {"Idempotency-Key": f"phone-{uuid.uuid4().hex}"}  # the run's one Redis keeps keys across tests
    with api.client("a") as client:
        refused = client.post("/v1/payment-sessions", json=session_body(customer_phone=phone), headers=key)
        # Refused at the edge: the key was not used, so the corrected request goes through with it.
        corrected = client.post("/v1/payment-sessions", json=session_body(), headers=key)
    assert refused.status_code == 422 and refused.headers["content-type"] == "application/problem+json"
    body = refused.json()
    assert body["code"] == "invalid_phone" and body["detail"].startswith("customer_phone ")
    assert [error["field"] for error in body["errors"]] == ["customer_phone"]
    assert phone not in refused.text and phone[2:] not in refused.text
    assert corrected.status_code == 201, corrected.text
    with psycopg.connect(database_url) as conn:
        texted = conn.execute("SELECT count(*) FROM outbox_messages").fetchone()[0]
    assert texted == 1  # the corrected session's link, nothing for the refused number


def test_concurrent_identical_requests_create_one_session(api: Api, database_url: str) -> None:
    barrier = threading.Barrier(10)
    responses: list[httpx.Response] = []

    def send() -> None:
        with api.client("a") as client:
            barrier.wait()
            responses.append(client.post("/v1/payment-sessions", json=session_body(),
                                         headers={"Idempotency-Key": "race"}))

    threads = [threading.Thread(target=send) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {201, 409} and 201 in statuses
    assert all(r.json()["code"] == "request_in_progress" for r in responses if r.status_code == 409)
    ids = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(ids) == 1
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM command_log WHERE command_name = 'open_session'"
                            ).fetchone() == (1,)


def test_losing_redis_never_runs_a_command_twice(api: Api) -> None:
    with api.client("a") as client:
        first = client.post("/v1/payment-sessions", json=session_body(), headers={"Idempotency-Key": "r1"})
        assert api.services.redis is not None
        api.services.redis.flushall()
        replay = client.post("/v1/payment-sessions", json=session_body(), headers={"Idempotency-Key": "r1"})
    assert replay.headers["idempotent-replayed"] == "true" and replay.json()["id"] == first.json()["id"]


def test_bad_input_gets_field_level_problems(api: Api) -> None:
    with api.client("a") as client:
        cases = {
            "validation_error": {**session_body(), "amount": "lots"},
            "invalid_amount": session_body(amount=0),
            "amount_too_large": session_body(amount=10**12),
            "unknown_currency": {**session_body(), "currency": "XYZ"},
            "invalid_phone": {**session_body(), "customer_phone": "555-0123"},
        }
        for i, (code, body) in enumerate(cases.items()):
            response = client.post("/v1/payment-sessions", json=body, headers={"Idempotency-Key": f"bad-{i}"})
            assert response.status_code in (400, 422), (code, response.text)
            assert response.json()["code"] == code, response.text
            assert "Traceback" not in response.text and "+14155550123" not in response.text
        unknown = client.post("/v1/payment-sessions", json={**session_body(), "surprise": 1},
                              headers={"Idempotency-Key": "bad-unknown"})
        assert unknown.status_code == 400 and unknown.json()["errors"][0]["field"]


def test_capture_void_refund_and_their_rules(api: Api) -> None:
    payment_id = paid_payment(api, amount=5_000, tag="one")
    with api.client("a") as client:
        captured = client.post(f"/v1/payments/{payment_id}/capture", json={"amount": 4_000},
                               headers={"Idempotency-Key": "cap"})
        assert captured.status_code == 200, captured.text
        assert (captured.json()["status"], captured.json()["captured_amount"], captured.json()["fee"]) == (
            "captured", 4_000, 146)
        too_much = client.post(f"/v1/payments/{payment_id}/refunds", json={"amount": 4_001},
                               headers={"Idempotency-Key": "ref-big"})
        assert too_much.status_code == 422 and too_much.json()["code"] == "refund_exceeds_captured"
        refunded = client.post(f"/v1/payments/{payment_id}/refunds", json={"amount": 1_000, "reason": "cold"},
                               headers={"Idempotency-Key": "ref"})
        assert refunded.status_code == 201 and refunded.json()["refunded_amount"] == 1_000
        assert refunded.json()["refund_id"]
        void = client.post(f"/v1/payments/{payment_id}/void", headers={"Idempotency-Key": "void"})
        assert void.status_code == 409 and void.json()["code"] == "invalid_transition"

    second = paid_payment(api, amount=1_000, tag="two")
    with api.client("a") as client:
        voided = client.post(f"/v1/payments/{second}/void", json={"reason": "out of stock"},
                             headers={"Idempotency-Key": "void-2"})
        assert voided.status_code == 200 and voided.json()["status"] == "voided"
    with api.client("b") as client:  # another merchant's payment does not exist for B
        stolen = client.post(f"/v1/payments/{payment_id}/refunds", json={"amount": 1},
                             headers={"Idempotency-Key": "steal"})
        assert stolen.status_code == 404 and stolen.json()["code"] == "not_found"


def test_payments_list_detail_timeline_and_balances(api: Api) -> None:
    ids = [paid_payment(api, amount=1_000 + i, tag=f"l{i}") for i in range(5)]
    with api.client("a") as client:
        client.post(f"/v1/payments/{ids[0]}/capture", headers={"Idempotency-Key": "c0"})
    api.project()
    with api.client("a") as client:
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 2, **({"starting_after": cursor} if cursor else {})}
            page = client.get("/v1/payments", params=params).json()
            seen += [p["id"] for p in page["data"]]
            if not page["has_more"]:
                break
            cursor = page["next_starting_after"]
        assert sorted(seen) == sorted(map(str, ids)) and len(seen) == 5
        captured = client.get("/v1/payments", params={"status": "captured"}).json()["data"]
        assert [p["id"] for p in captured] == [str(ids[0])]
        detail = client.get(f"/v1/payments/{ids[0]}").json()
        assert [t["event_type"] for t in detail["timeline"]] == [
            "payment.initiated", "payment.risk_assessed", "payment.processing_started", "payment.authorized",
            "payment.captured"]
        assert (detail["risk_decision"], detail["risk_score"]) == ("approve", 0)
        balances = client.get("/v1/balances").json()["data"]
        assert balances == [{"account": f"merchant:{api.merchants['a']}:payable", "currency": "USD",
                             "balance": -(1_000 - 59)}]
    with api.client("b") as client:
        assert client.get("/v1/payments").json()["data"] == []
        assert client.get(f"/v1/payments/{ids[0]}").status_code == 404
        assert client.get("/v1/balances").json()["data"] == []
    assert UUID(seen[0])


def test_not_ready_is_a_problem_like_every_other() -> None:
    unreachable = Dependencies("postgresql://127.0.0.1:1/none?connect_timeout=1", "redis://127.0.0.1:1",
                               "127.0.0.1:1")
    with TestClient(app=create_app(health=unreachable)) as client:
        response = client.get("/health/ready")
    assert response.status_code == 503 and response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert (body["code"], body["status"], body["type"]) == (
        "not_ready", 503, "https://docs.echotransact.example/errors/not_ready")
    assert body["instance"] == "/health/ready" and body["title"] and "postgres" in body["detail"]
    assert set(body["checks"]) == {"postgres", "redis", "kafka"}
    assert not any(check["ok"] for check in body["checks"].values())


def test_readiness_reports_the_read_side(api: Api) -> None:
    paid_payment(api, tag="health")
    with api.client(None) as client:
        ready = client.get("/health/ready").json()
    assert ready["status"] == "ready"
    backlog = ready["read_side"]["relay_backlog"]
    assert backlog["unpublished"] > 5 and backlog["oldest_unpublished_s"] >= 0  # no relay runs here
    assert set(ready["read_side"]["projection_lag_events"]) == {"status", "analytics", "audit", "balances"}
    api.project()
    with api.client(None) as client:
        lag = client.get("/health/ready").json()["read_side"]["projection_lag_events"]
    assert lag == {"status": 0, "analytics": 0, "audit": 0, "balances": 0}


def test_the_api_process_borrows_every_connection_from_one_pool(api: Api) -> None:
    """Event store, idempotency records, vault, velocity, advisory locks and read views: one
    pool (api/bootstrap.py's open_database), and a payment's whole journey runs on it."""
    services = api.services
    pool = services.pool
    assert pool is not None
    datastore = services.ledger.recorder.datastore  # type: ignore[attr-defined]
    borrowers = [services.views._pool, services.idempotency.pool, datastore.pool,
                 services.ledger.locks._pool]  # type: ignore[union-attr]
    if services.vault is not None:
        borrowers.append(services.vault.pool)
    assert all(borrower is pool for borrower in borrowers)
    assert services.ledger.velocity._datastore is datastore  # type: ignore[union-attr]
    before = pool.get_stats()["requests_num"]
    paid_payment(api)
    assert pool.get_stats()["requests_num"] > before


def test_an_erasure_deletes_the_recorded_responses_about_the_customers_sessions(api: Api, database_url: str) -> None:
    """A session's recorded response (kept 24 h for its Idempotency-Key) shows the masked phone;
    erasing the customer deletes it, and a retry of the key is answered again by the command log."""
    phone = "+14155550177"

    def recorded(key: str) -> list[tuple[object, ...]]:
        with psycopg.connect(database_url) as conn:
            return conn.execute("SELECT subject_id, response_body FROM idempotency_records"
                                " WHERE idempotency_key = %s", (key,)).fetchall()

    with api.client("a") as client:
        created = client.post("/v1/payment-sessions", json=session_body(customer_phone=phone),
                              headers={"Idempotency-Key": "erase-me"})
        assert created.status_code == 201, created.text
        other = client.post("/v1/payment-sessions", json=session_body(), headers={"Idempotency-Key": "keep-me"})
        assert other.status_code == 201, other.text
    [(subject, body)] = recorded("erase-me")
    assert subject == UUID(created.json()["id"]) and "0177" in str(body)
    with api.client("admin") as admin:
        erased = admin.post("/v1/customers/erasures", json={"customer_phone": phone, "reason": "asked"},
                            headers={"Idempotency-Key": "erasure-1"})
        assert erased.status_code == 200, erased.text
    assert recorded("erase-me") == []
    assert len(recorded("keep-me")) == 1  # another customer's
    with api.client("a") as client:
        again = client.post("/v1/payment-sessions", json=session_body(customer_phone=phone),
                            headers={"Idempotency-Key": "erase-me"})
    assert again.status_code == 201 and again.json()["id"] == created.json()["id"]


def test_a_response_lost_in_a_database_crash_is_answered_again_from_the_command_log(
    api: Api, database_url: str
) -> None:
    """The claim and the recorded response commit without waiting for the disk
    (adapters/postgres/idempotency.py): a crash of PostgreSQL can forget the response (the claim
    itself reaches the disk with the save's flush). What the retry meets then: its claim, held
    for a while (409, retry later), and once it is stale the command runs again under the same
    command id, which the ledger answers with what it recorded: the same session, one command."""
    with api.client("a") as client:
        first = client.post("/v1/payment-sessions", json=session_body(), headers={"Idempotency-Key": "crash"})
        assert first.status_code == 201, first.text

        def forget_response(held_for: str) -> None:
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(
                    "UPDATE idempotency_records SET state = 'in_progress', response_status = NULL,"
                    " response_body = NULL, locked_until = now() + %s::interval WHERE idempotency_key = 'crash'",
                    (held_for,))

        forget_response("1 minute")
        held = client.post("/v1/payment-sessions", json=session_body(), headers={"Idempotency-Key": "crash"})
        assert held.status_code == 409 and held.json()["code"] == "request_in_progress"
        forget_response("-1 second")
        retried = client.post("/v1/payment-sessions", json=session_body(), headers={"Idempotency-Key": "crash"})
        assert retried.status_code == 201, retried.text
        assert retried.json()["id"] == first.json()["id"]
        assert retried.json()["position"] == first.json()["position"]
    with psycopg.connect(database_url) as conn:
        opened = conn.execute("SELECT count(*) FROM command_log WHERE command_name = 'open_session'").fetchone()
    assert opened == (1,)


def test_only_the_idempotency_statements_skip_the_flush_not_the_connection(api: Api) -> None:
    """The idempotency records' no-flush commit lasts only for their own statement's transaction:
    a save on the same pooled connection next still waits for the disk."""
    pool = api.services.pool
    assert pool is not None
    with api.client("a") as client:
        for n in range(3):
            created = client.post("/v1/payment-sessions", json=session_body(), headers={"Idempotency-Key": f"f{n}"})
            assert created.status_code == 201, created.text
    store = api.services.idempotency
    assert store.begin("test-scope", "flush-check", "h").outcome == "proceed"
    store.complete("test-scope", "flush-check", "h", 200, "{}")
    with contextlib.ExitStack() as held:  # every connection of the pool at once
        connections = [held.enter_context(pool.connection()) for _ in range(pool.get_stats()["pool_size"])]
        settings = {conn.execute("SHOW synchronous_commit").fetchone() for conn in connections}
    assert settings == {("on",)}
    assert store.begin("test-scope", "flush-check", "h").outcome == "replay"
