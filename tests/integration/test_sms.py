"""SMS through the outbox: queued with the event, sent once by id, retried, and a final failure
becomes an event."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs

import psycopg
import pytest

from adapters.notifications.sms import DevSmsSender, DispatchReport, HttpSmsSender, MessageDispatcher, dev_inbox
from api.bootstrap import build_message_dispatcher
from api.settings import Settings
from application.ledger import Ledger
from tests.application.flows import PHONE, new_merchant, open_session


def test_the_link_sms_is_queued_with_the_event_and_delivered_once(
    ledger: Ledger, database_url: str, settings: Settings
) -> None:
    session_id = open_session(ledger, new_merchant(ledger))
    link = ledger.send_link("send", session_id)
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT payload FROM outbox_messages").fetchone()
    assert row is not None
    (payload,) = row
    assert link.code.encode() not in bytes(payload) and PHONE.encode() not in bytes(payload)  # encrypted
    dispatcher = build_message_dispatcher(settings, database_url, ledger)
    assert dispatcher.run_once().sent == 1
    assert dispatcher.run_once().sent == 0
    inbox = dev_inbox(database_url, to=PHONE)
    assert len(inbox) == 1
    body = inbox[0]["body"]
    assert link.code in body and f"/pay/{link.link_token}" in body and "25.00 USD" in body
    # The session records the send, with the provider's id: evidence if the payment is disputed.
    assert ledger.get_session(session_id).sms_sent == (str(inbox[0]["message_id"]),)
    # Sending the same message again (a crash before marking it sent) delivers nothing new.
    DevSmsSender(database_url).send(message_id=inbox[0]["message_id"], to=PHONE, body=body)
    assert len(dev_inbox(database_url, to=PHONE)) == 1
    # A replayed command queues nothing new.
    ledger.send_link("send", session_id)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM outbox_messages").fetchone() == (1,)


class Provider(BaseHTTPRequestHandler):
    """A fake SMS provider: fails the first ``failures`` requests, dedupes by idempotency token."""

    failures = 0
    status = 503
    received: ClassVar[list[dict[str, Any]]] = []
    tokens: ClassVar[set[str]] = set()

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        if Provider.failures > 0:
            Provider.failures -= 1
            self.send_response(Provider.status)
            self.end_headers()
            return
        token = self.headers["I-Twilio-Idempotency-Token"]
        if token not in Provider.tokens:
            Provider.tokens.add(token)
            Provider.received.append(form)
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"sid": f"SM{token[:8]}"}).encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def provider() -> Any:
    Provider.failures, Provider.status, Provider.received, Provider.tokens = 0, 503, [], set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Provider)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_http_provider_that_fails_for_a_while_gets_the_message_later(
    ledger: Ledger, database_url: str, provider: str
) -> None:
    session_id = open_session(ledger, new_merchant(ledger))
    ledger.send_link("send", session_id)
    Provider.failures = 2
    dispatcher = MessageDispatcher(
        database_url, HttpSmsSender(provider, "AC1", "secret", "+15005550006"),
        open_payload=ledger.mapper.cipher.decrypt, on_failed=lambda *a: None,  # type: ignore[union-attr]
        backoff_base=timedelta(0),
    )
    # No backoff here, so one pass retries until the provider answers.
    assert dispatcher.run_once() == DispatchReport(sent=1, retried=2, failed=0)
    assert [m["To"] for m in Provider.received] == [PHONE]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT state, attempts FROM outbox_messages").fetchone() == ("sent", 3)


def test_a_final_failure_becomes_an_sms_failed_event(ledger: Ledger, database_url: str, provider: str) -> None:
    session_id = open_session(ledger, new_merchant(ledger))
    ledger.send_link("send", session_id)
    Provider.failures, Provider.status = 1, 400  # a permanent refusal (a bad number, say)
    dispatcher = MessageDispatcher(
        database_url, HttpSmsSender(provider, "AC1", "secret", "+15005550006"),
        open_payload=ledger.mapper.cipher.decrypt,  # type: ignore[union-attr]
        on_failed=lambda m, s, reason: ledger.record_sms_failure(m, s, reason),
    )
    assert dispatcher.run_once().failed == 1
    session = ledger.get_session(session_id)
    assert session.sms_failures == 1 and session.status == "link_sent"
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT state FROM outbox_messages").fetchone() == ("failed",)


def test_two_dispatchers_never_send_one_message_twice(ledger: Ledger, database_url: str, provider: str) -> None:
    merchant = new_merchant(ledger)
    for i in range(20):
        ledger.send_link(f"send-{i}", open_session(ledger, merchant, f"open-{i}"))
    sender = HttpSmsSender(provider, "AC1", "secret", "+15005550006")
    calls: list[str] = []
    real_send = sender.send

    def counting_send(**kwargs: Any) -> Any:
        calls.append(kwargs["message_id"])
        return real_send(**kwargs)

    sender.send = counting_send  # type: ignore[method-assign]
    dispatchers = [MessageDispatcher(database_url, sender, open_payload=ledger.mapper.cipher.decrypt,  # type: ignore[union-attr]
                                     on_failed=lambda *a: None) for _ in range(2)]
    threads = [threading.Thread(target=d.run_once) for d in dispatchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == len(set(calls)) == 20


class _Crash(BaseException):
    """A process killed between recording a batch's sends and marking its rows sent."""


def test_a_batch_is_recorded_once_even_when_the_dispatcher_dies_before_marking_it(
    ledger: Ledger, database_url: str, settings: Settings
) -> None:
    merchant = new_merchant(ledger)
    sessions = [open_session(ledger, merchant, f"open-{i}") for i in range(5)]
    for i, session_id in enumerate(sessions):
        ledger.send_link(f"send-{i}", session_id)
    dying = build_message_dispatcher(settings, database_url, ledger)
    recorded: list[int] = []

    def record_then_die(sent: list[Any]) -> None:
        recorded.append(ledger.record_sms_sent_many(sent))
        raise _Crash

    dying.on_sent = record_then_die
    with pytest.raises(_Crash):
        dying.run_once()
    assert recorded == [5]  # the whole batch, one save
    with psycopg.connect(database_url) as conn:  # nothing marked: the transaction died with it
        assert conn.execute("SELECT count(*) FROM outbox_messages WHERE state = 'pending'").fetchone() == (5,)
    # Another dispatcher sends the batch again (the same ids: the mailbox drops the duplicates)
    # and the sessions record nothing twice.
    assert build_message_dispatcher(settings, database_url, ledger).run_once() == DispatchReport(sent=5)
    assert len(dev_inbox(database_url, to=PHONE)) == 5
    with psycopg.connect(database_url) as conn:
        messages: dict[Any, str] = dict(conn.execute("SELECT aggregate_id, message_id::text FROM outbox_messages"
                                     " WHERE state = 'sent'").fetchall())
    for session_id in sessions:
        session = ledger.get_session(session_id)
        assert session.sms_sent == (messages[session_id],)


def test_under_load_a_pass_gathers_the_commits_of_gather_s_and_a_send_after_a_rest_goes_at_once(
    ledger: Ledger, database_url: str, settings: Settings
) -> None:
    """Under steady load every commit woke the dispatcher for a pass (a transaction) of one
    message. With ``gather_s`` the pass after a busy one waits that long, so quick sends share
    a pass; the first send after a rest goes at once. (With ``gather_s`` 0 this run makes a pass
    per send.)"""
    merchant = new_merchant(ledger)
    sessions = [open_session(ledger, merchant, f"open-{i}") for i in range(6)]
    dispatcher = build_message_dispatcher(settings, database_url, ledger)
    dispatcher.gather_s = 0.5
    passes: list[int] = []
    record = dispatcher.on_sent
    assert record is not None

    def counting(sent: list[tuple[Any, Any, str]]) -> None:
        passes.append(len(sent))
        record(sent)

    dispatcher.on_sent = counting
    stop = threading.Event()
    runner = threading.Thread(target=dispatcher.run, args=(stop, 5.0))
    runner.start()
    try:
        ledger.send_link("send-0", sessions[0])
        _wait_until(lambda: passes == [1])  # after a rest: at once, alone
        for i, session_id in enumerate(sessions[1:], start=1):
            ledger.send_link(f"send-{i}", session_id)  # a commit each, 20 ms apart
            time.sleep(0.02)
        _wait_until(lambda: sum(passes) == 6)
    finally:
        stop.set()
        runner.join(10)
    assert passes[0] == 1 and len(passes) <= 3, passes  # the five quick sends in one or two passes


def _wait_until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
