"""Crypto-shredding, on real PostgreSQL and the embedded Kafka broker: random payments, refunds,
voids, cancellations and erasures in random order, the reasons given naming the customer's phone.
After each erasure the read models rebuilt from scratch equal the live ones, the audit chain
verifies, and a scan of every table, of the event topics as the relay published them (read from
the beginning) and of the logs finds no plaintext phone of an erased customer; no message on
Kafka names any phone at all. Also: free text sealed and opened where it is read, a master key's
rotation (``customers rewrap``), and projections that open only with the keys they were given."""

from __future__ import annotations

import base64
import itertools
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from psycopg import sql

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.dev.servers import ServerURLs
from adapters.kafka.relay import OutboxRelay
from adapters.personal_data import LEGACY_MASTER_KEY_ID, UnknownMasterKey, legacy_master_key, master_key_id
from api.bootstrap import (
    app_database_url,
    build_customer_keys,
    build_ledger,
    envelope_opener,
    open_database,
    personal_data_reader,
)
from api.cli import main
from api.settings import Settings
from application.disputes import DISPUTE_OPENED, ProcessorEvent
from application.envelope import event_topics
from application.ledger import Ledger
from application.ports import IdentityClaim
from domain.dispute import Dispute, dispute_id
from projections.audit import verify_chain
from projections.engine import ProjectionStore
from projections.registry import all_projections
from projections.replay import verify
from projections.views import ReadViews, Scope
from tests.application.flows import new_merchant

_examples = itertools.count(1)
IP, USER_AGENT = "203.0.113.77", "Mozilla/5.0 (Privacy Test)"


def _phone(example: int, customer: int) -> str:
    return f"+1415{example % 1000:03d}{customer:04d}"


def _all_text(conn: psycopg.Connection[Any]) -> Iterator[tuple[str, str]]:
    """Every row of every table in the public schema, as text (bytea too: escaped), by table."""
    tables = [r[0] for r in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename").fetchall()]
    for table in tables:
        for (row,) in conn.execute(sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(table))):
            yield table, row


def _pay(ledger: Ledger, merchant_id: UUID, phone: str, n: str, amount_minor: int, *,
         capture: bool = True) -> UUID:
    result = ledger.open_session_and_send_link(
        f"open-{n}", merchant_id=merchant_id, amount_minor=amount_minor, currency="USD", customer_phone=phone,
        order_reference=f"ORDER-{n}", voice_platform="alexa", conversation_id=f"conv-{n}",
        line_items=[{"sku": "X", "name": "Thing", "quantity": 1, "unit_amount_minor": amount_minor}],
        metadata={"note": f"for {phone}"},
    )
    session_id = UUID(result.result.result["session_id"])
    ledger.open_link(f"openlink-{n}", session_id, result.link_token, ip=IP, user_agent=USER_AGENT)
    assert ledger.verify_code(f"code-{n}", session_id, result.code).result["code_check"] == "verified"
    if ledger.get_session(session_id).needs_identity_check:
        ledger.verify_identity(f"identity-{n}", session_id, IdentityClaim("1990-01-01", "94107"))
    payment_id = UUID(ledger.attach_payment_method(
        f"attach-{n}", session_id, card_token=f"tok_{n}", card_brand="visa", card_last4="4242",
    ).result["payment_id"])
    ledger.authorize_payment(payment_id)
    if capture:
        ledger.capture_payment(f"capture-{n}", payment_id)
    return payment_id


def _words(phone: str) -> str:
    """What a merchant types as a reason: it names the customer's phone."""
    return f"customer {phone} asked on the phone"


operations = st.lists(
    st.one_of(
        st.tuples(st.just("pay"), st.integers(0, 2), st.sampled_from([2_500, 15_000])),
        st.tuples(st.just("refund"), st.integers(0, 20), st.integers(1, 500)),
        st.tuples(st.just("void"), st.integers(0, 2), st.just(2_500)),
        st.tuples(st.just("cancel"), st.integers(0, 2), st.just(2_500)),
        st.tuples(st.just("erase"), st.integers(0, 2), st.just(0)),
    ),
    min_size=3, max_size=9,
)
# Every phone any example used: none may ever be on Kafka (the topics keep them all).
_every_phone: set[str] = set()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared settings with event topics of this test's own on the shared broker (the ledger
    names each outbox row's topic), so a scan can read them from the beginning."""
    return settings.replace(topic_prefix=f"privacy-{uuid4().hex[:12]}")


@pytest.fixture
def topic_prefix(settings: Settings) -> str:
    return settings.topic_prefix


def _publish(database_url: str, bootstrap: str, settings: Settings, prefix: str) -> int:
    """What the relay does: every outbox row to its topic; returns how many rows there are."""
    with OutboxRelay(database_url, bootstrap, open_envelope=envelope_opener(settings), topic_prefix=prefix) as relay:
        relay.ensure_topics()
        while relay.run_once() > 0:
            pass
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM outbox_pending)").fetchone()
    assert rows is not None and rows[1] == 0, f"{rows[1]} outbox rows left unpublished"
    return int(rows[0])


def _bytes(value: str | bytes | None) -> bytes:
    return value.encode() if isinstance(value, str) else (value or b"")


def _kafka_messages(bootstrap: str, prefix: str, timeout_s: float = 30) -> list[bytes]:
    """Every message on the event topics, from the beginning to the end of each partition: its
    key, headers and value as the broker holds them."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"privacy-scan-{uuid4().hex}",
                         "enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    raw: list[bytes] = []
    try:
        metadata = consumer.list_topics(timeout=10)
        ends: dict[tuple[str, int], int] = {}
        for topic in event_topics(prefix):
            for partition in metadata.topics[topic].partitions:
                _low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                if high > 0:
                    ends[(topic, partition)] = high
        consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in ends])
        deadline = time.monotonic() + timeout_s
        while ends:
            assert time.monotonic() < deadline, f"partitions not read to their end: {sorted(ends)}"
            for message in consumer.consume(1000, timeout=0.5):
                where, offset = (message.topic(), message.partition()), message.offset()
                assert where[0] is not None and where[1] is not None and offset is not None
                tp = (where[0], where[1])
                error = message.error()
                if error is not None:
                    assert error.code() == KafkaError._PARTITION_EOF, error
                    if offset >= ends.get(tp, 0):
                        ends.pop(tp, None)
                    continue
                found = message.headers() or []
                pairs = found.items() if isinstance(found, dict) else found
                headers = b"".join(_bytes(k) + _bytes(v) for k, v in pairs)
                raw.append(_bytes(message.key()) + headers + _bytes(message.value()))
                if offset + 1 >= ends.get(tp, 0):
                    ends.pop(tp, None)
    finally:
        consumer.close()
    return raw


@pytest.fixture
def store(database_url: str, settings: Settings) -> Iterator[ProjectionStore]:
    s = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()),
                        envelope_opener(settings))
    yield s
    s.close()


@hypothesis_settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=operations)
def test_erasure_leaves_no_phone_and_keeps_replay_and_audit(
    plan: list[tuple[str, int, int]], ledger: Ledger, store: ProjectionStore, database_url: str,
    owner_database_url: str, settings: Settings, clock: ManualClock, caplog: pytest.LogCaptureFixture,
    servers: ServerURLs, topic_prefix: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    example = next(_examples)
    merchant_id = new_merchant(ledger, f"merchant-{example}")
    payments: list[tuple[UUID, str]] = []
    erased: set[str] = set()
    _every_phone.update(_phone(example, c) for c in range(3))
    projections = list(all_projections(personal_data_reader(settings)).values())
    kafka = (servers.kafka_bootstrap_servers, topic_prefix)
    for step, (kind, who, amount) in enumerate(plan):
        n = f"{example}-{step}"
        phone = _phone(example, who)
        if kind in ("pay", "void", "cancel"):
            erased.discard(phone)  # a customer again (a stranger): what follows may name the phone
        if kind == "pay":
            payments.append((_pay(ledger, merchant_id, phone, n, amount), phone))
        elif kind == "refund" and payments:
            payment_id, paid_by = payments[who % len(payments)]
            payment = ledger.get_payment(payment_id)
            left = payment.captured_minor - payment.refunded_minor
            if left > 0 and paid_by not in erased:
                ledger.refund_payment(f"refund-{n}", payment_id, amount_minor=min(amount, left), reason=_words(paid_by))
        elif kind == "void":
            ledger.void_payment(f"void-{n}", _pay(ledger, merchant_id, phone, n, amount, capture=False),
                                reason=_words(phone))
        elif kind == "cancel":
            opened = ledger.open_session(
                f"open-{n}", merchant_id=merchant_id, amount_minor=amount, currency="USD", customer_phone=phone,
                order_reference=f"ORDER-{n}", voice_platform="alexa", conversation_id=f"conv-{n}",
                line_items=[{"sku": "X", "name": "Thing", "quantity": 1, "unit_amount_minor": amount}])
            ledger.cancel_session(f"cancel-{n}", UUID(opened.result["session_id"]), reason=_words(phone))
        elif kind == "erase":
            phone = _phone(example, who)
            erasure = ledger.erase_customer(f"erase-{n}", phone=phone, erased_by="test", reason="customer asked")
            again = ledger.erase_customer(f"erase-{n}", phone=phone, erased_by="test", reason="customer asked")
            assert again.result.replayed and again.result.result == erasure.result.result  # idempotent
            erased.add(phone)
            store.catch_up(grace=timedelta(0))
            # Replay from scratch equals live; the audit chain still verifies.
            assert verify(owner_database_url, projections, envelope_opener(settings)) == []
            with psycopg.connect(database_url) as conn:
                assert verify_chain(conn).ok
            _assert_no_phone(owner_database_url, settings, erased, caplog.text, kafka)
            # A cancellation's reason reads as erased in the status read model (rebuilt the same).
            with psycopg.connect(owner_database_url) as conn:
                reasons = {r[0] for r in conn.execute(
                    "SELECT end_reason FROM session_status WHERE status = 'cancelled'"
                    " AND customer_id = ANY(%s)", (erasure.result.result["customer_ids"],)).fetchall()}
            assert reasons <= {"erased"}
            # A new session of the same phone starts as a stranger: nothing remembered, new pseudonym.
            export = ledger.export_customer(phone)
            assert not export["held"] and export["sessions"] == []
        clock.advance(timedelta(seconds=1))
    store.catch_up(grace=timedelta(0))
    assert verify(owner_database_url, projections, envelope_opener(settings)) == []
    _assert_no_phone(owner_database_url, settings, erased, caplog.text, kafka)


def _assert_no_phone(owner_database_url: str, settings: Settings, erased: set[str], logs: str,
                     kafka: tuple[str, str]) -> None:
    digits = {p: p.lstrip("+") for p in erased}
    with psycopg.connect(owner_database_url) as conn:
        for table, text in _all_text(conn):
            for phone, bare in digits.items():
                assert bare not in text, f"{table} still holds the erased phone {phone}"
    # Kafka, as the relay published it (read back from the broker, from the beginning): no phone
    # of anyone, and none of the words people typed about them.
    bootstrap, prefix = kafka
    published = _publish(app_database_url(owner_database_url), bootstrap, settings, prefix)
    messages = _kafka_messages(bootstrap, prefix)
    assert len(messages) >= published > 0  # every row is on Kafka (at least once): the scan saw them
    for raw in messages:
        for phone in _every_phone:
            assert phone.lstrip("+").encode() not in raw, f"a Kafka message names the phone {phone}"
        assert IP.encode() not in raw and USER_AGENT.encode() not in raw
        assert b"asked on the phone" not in raw  # a reason's words (they name the phone)
    for phone, bare in digits.items():
        assert bare not in logs, f"a log line names the erased phone {phone}"


def test_a_new_session_after_erasure_starts_as_a_stranger(ledger: Ledger, database_url: str) -> None:
    merchant_id = new_merchant(ledger)
    phone = "+14155559876"
    _pay(ledger, merchant_id, phone, "a", 15_000)
    before = ledger.export_customer(phone)
    assert before["held"] and before["sessions"][0]["phone"] == phone
    assert before["sessions"][0]["link_opened"][0]["ip"] == IP
    assert before["customers"][0]["identity_verified_at"] is not None

    ledger.erase_customer("erase-1", phone=phone, erased_by="admin", reason="GDPR art. 17 request")
    session_id = UUID(before["sessions"][0]["session_id"])
    assert ledger.session_phone(ledger.get_session(session_id)) is None  # the key is gone
    assert ledger.session_phone_masked(ledger.get_session(session_id)) == "erased"

    again = ledger.open_session(
        "open-b", merchant_id=merchant_id, amount_minor=15_000, currency="USD", customer_phone=phone,
        order_reference="ORDER-b", voice_platform="alexa", conversation_id="conv-b",
        line_items=[{"sku": "X", "name": "Thing", "quantity": 1, "unit_amount_minor": 15_000}])
    session = ledger.get_session(UUID(again.result["session_id"]))
    assert session.needs_identity_check  # not recognized
    assert session.customer_id != UUID(before["customer_id"])
    with psycopg.connect(database_url) as conn:
        erased_event = conn.execute("SELECT count(*) FROM customer_keys WHERE erased_at IS NOT NULL").fetchone()
    assert erased_event == (1,)
    # Erasing a phone nothing is held about records nothing.
    nothing = ledger.erase_customer("erase-2", phone="+14155550000", erased_by="admin", reason="asked")
    assert nothing.result.result["erased"] is False


def test_free_text_is_sealed_opened_for_its_readers_and_erased_with_the_customer(
    ledger: Ledger, store: ProjectionStore, database_url: str, owner_database_url: str, settings: Settings,
) -> None:
    """Reasons for a refund, a void and a cancellation, and a dispute's evidence, each naming the
    customer: never in an envelope (so never on Kafka) or the audit trail in plain text; opened in
    the status read model, the evidence pack, the dispute and the export; ``erased`` after."""
    merchant_id = new_merchant(ledger)
    phone = "+14155553434"
    refund_words, void_words, cancel_words = (f"refund: {phone} was charged twice", f"void: {phone} changed mind",
                                              f"{phone} hung up")
    evidence_words = f"we emailed the cardholder at {phone}"
    captured = _pay(ledger, merchant_id, phone, "ft-1", 2_500)
    ledger.refund_payment("ft-refund", captured, amount_minor=500, reason=refund_words)
    voided = _pay(ledger, merchant_id, phone, "ft-2", 2_500, capture=False)
    ledger.void_payment("ft-void", voided, reason=void_words)
    opened = ledger.open_session("ft-open-3", merchant_id=merchant_id, amount_minor=2_500, currency="USD",
                                 customer_phone=phone, order_reference="ORDER-ft-3", voice_platform="alexa",
                                 conversation_id="conv-ft-3",
                                 line_items=[{"sku": "X", "name": "Thing", "quantity": 1, "unit_amount_minor": 2_500}])
    cancelled = UUID(opened.result["session_id"])
    ledger.cancel_session("ft-cancel", cancelled, reason=cancel_words)
    store.catch_up(grace=timedelta(0))  # the processor's reference is found through the read side
    reference = ledger.get_payment(captured).capture_reference or ""
    created = datetime(2026, 12, 1, tzinfo=UTC)
    ledger.record_processor_event("sandbox", ProcessorEvent(
        event_id="evt_ft_1", type=DISPUTE_OPENED, created_at=created, payment_reference=reference,
        dispute_id="dp_ft", reason="fraudulent", amount_minor=2_000, currency="USD",
        due_by=created + timedelta(days=365)))
    the_dispute = dispute_id("sandbox", "dp_ft")
    ledger.submit_dispute_evidence("ft-evidence", the_dispute, {"customer_communication": evidence_words}, submit=False)
    store.catch_up(grace=timedelta(0))
    words = [refund_words, void_words, cancel_words, evidence_words]

    # Sealed: no envelope (what goes to Kafka) and no audit row holds the words or the phone.
    opener = envelope_opener(settings)
    with psycopg.connect(owner_database_url) as conn:
        envelopes = [opener(p) for (p,) in conn.execute("SELECT envelope FROM outbox")]
        audit = [json.dumps(d) for (d,) in conn.execute("SELECT data FROM audit_log")]
    sealed_types = {"payment.refunded", "payment.voided", "payment_session.cancelled", "dispute.updated"}
    assert sealed_types <= {e.event_type for e in envelopes}
    for text in [json.dumps(e.data, default=str) for e in envelopes] + audit:
        assert phone.lstrip("+") not in text
        assert not any(w in text for w in words)
    assert all("key_id" in e.data["personal"] for e in envelopes if e.event_type in sealed_types)

    # Opened for the readers allowed to see them.
    assert _end_reason(database_url, cancelled) == cancel_words
    assert ledger.dispute_evidence(ledger.get_dispute(the_dispute)) == {"customer_communication": evidence_words}
    export = ledger.export_customer(phone)
    assert {s["cancel_reason"] for s in export["sessions"]} == {None, cancel_words}
    payments = {p["payment_id"]: p for s in export["sessions"] for p in s["payments"]}
    assert payments[str(voided)]["void_reason"] == void_words
    assert [r["reason"] for r in payments[str(captured)]["refunds"]] == [refund_words]
    assert payments[str(captured)]["disputes"][0]["evidence"] == {"customer_communication": evidence_words}
    views = ReadViews(database_url, personal=personal_data_reader(settings))
    try:
        pack = views.evidence_pack(Scope("admin"), the_dispute)
        assert pack is not None
        lines = {line["event_type"]: line["details"] for line in pack["timeline"]}
        # Opened, and scrubbed of the phone number as the pack scrubs free text.
        shown = lines["payment.refunded"]["reason"]
        assert shown.startswith("refund: ") and shown.endswith("3434 was charged twice") and phone not in shown
        assert lines["payment_session.link_opened"]["ip"] == IP
        # The payment's timeline (API and console) shows the merchant's words, never the sealed form.
        mine = Scope("merchant", merchant_id)
        timeline = {t["event_type"]: t["data"] for t in (views.payment(mine, captured) or {})["timeline"]}
        assert timeline["payment.refunded"]["reason"] == refund_words and "personal" not in timeline["payment.refunded"]
        voided_timeline = {t["event_type"]: t["data"] for t in (views.payment(mine, voided) or {})["timeline"]}
        assert voided_timeline["payment.voided"]["reason"] == void_words

        # Erased with the customer: everywhere they were opened.
        ledger.erase_customer("ft-erase", phone=phone, erased_by="test", reason="asked")
        store.catch_up(grace=timedelta(0))
        assert _end_reason(database_url, cancelled) == "erased"
        assert ledger.dispute_evidence(ledger.get_dispute(the_dispute)) == {"customer_communication": "erased"}
        assert ledger.cancel_reason(ledger.get_session(cancelled)) == "erased"
        pack = views.evidence_pack(Scope("admin"), the_dispute)
        assert pack is not None
        lines = {line["event_type"]: line["details"] for line in pack["timeline"]}
        assert lines["payment.refunded"]["reason"] == "erased"
        assert lines["payment_session.link_opened"]["ip"] == "erased"
        timeline = {t["event_type"]: t["data"] for t in (views.payment(mine, captured) or {})["timeline"]}
        assert timeline["payment.refunded"]["reason"] == "erased"
    finally:
        views.close()
    assert verify(owner_database_url, list(all_projections(personal_data_reader(settings)).values()), opener) == []
    # Words typed after the erasure about the erased customer are not recorded at all.
    ledger.submit_dispute_evidence("ft-evidence-2", the_dispute, {"product_description": f"sold to {phone}"},
                                   submit=False)
    updated = list(ledger.repository.event_store.get(the_dispute))[-1]
    assert isinstance(updated, Dispute.Updated) and updated.personal == {"erased": True}
    assert ledger.dispute_evidence(ledger.get_dispute(the_dispute)) == {"product_description": "erased"}


def _end_reason(database_url: str, session_id: UUID) -> str | None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT end_reason FROM session_status WHERE session_id = %s", (session_id,)).fetchone()
    assert row is not None
    return row[0]


def _wrapped_under(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT master_key_id, count(*) FROM customer_keys WHERE wrapped_key IS NOT NULL"
                            " GROUP BY master_key_id").fetchall()
    return {r[0]: r[1] for r in rows}


def test_rewrap_moves_every_data_key_to_a_new_master_key(
    ledger: Ledger, database_url: str, owner_database_url: str, settings: Settings, clock: ManualClock,
    processor: SandboxProcessor, servers: ServerURLs, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    merchant_id = new_merchant(ledger)
    phones = ["+14155556501", "+14155556502", "+14155556503"]
    for i, phone in enumerate(phones):
        _pay(ledger, merchant_id, phone, f"rw-{i}", 2_500)
    assert settings.master_key is not None
    old_id = master_key_id(settings.master_key)
    assert _wrapped_under(database_url) == {old_id: 3}
    # One key as a deployment from before 0026 left it: wrapped under the key derived from the hash
    # key, named as the migration names it. It still opens.
    legacy = AESGCM(legacy_master_key(settings.hash_key))
    held = ledger.customer_keys.find(ledger._lookup_hash(phones[0]))
    assert held is not None
    with psycopg.connect(owner_database_url) as conn:
        key_id, wrapped = conn.execute("SELECT key_id, wrapped_key FROM customer_keys WHERE key_id = %s",
                                       (held.key_id,)).fetchone() or (None, None)
        material = AESGCM(settings.master_key).decrypt(bytes(wrapped)[:12], bytes(wrapped)[12:], key_id.bytes)
        conn.execute("UPDATE customer_keys SET wrapped_key = %s, master_key_id = %s WHERE key_id = %s",
                     (b"\x00" * 12 + legacy.encrypt(b"\x00" * 12, material, key_id.bytes), LEGACY_MASTER_KEY_ID,
                      key_id))
    assert {ledger.export_customer(p)["sessions"][0]["phone"] for p in phones} == set(phones)

    # A new master key; the old one kept as previous until the re-wrap ran.
    new_key = b"N" * 32
    rotated = settings.replace(master_key=new_key, previous_master_keys=(settings.master_key,))
    new_only = settings.replace(master_key=new_key)
    before = build_ledger(new_only, database_url, clock=clock, processor=processor)
    try:
        assert before.export_customer(phones[0])["sessions"][0]["phone"] == phones[0]  # the legacy key
        for phone in phones[1:]:
            with pytest.raises(UnknownMasterKey, match="ECHOTRANSACT_PREVIOUS_MASTER_KEYS"):
                before.export_customer(phone)
    finally:
        before.close()

    # `echotransact customers rewrap`, with the rotated settings in the environment.
    for name, value in (("DATABASE_URL", database_url), ("REDIS_URL", servers.redis_url),
                        ("KAFKA_BOOTSTRAP_SERVERS", servers.kafka_bootstrap_servers),
                        ("ECHOTRANSACT_HASH_KEY", settings.hash_key), ("ECHOTRANSACT_MASTER_KEY", new_key),
                        ("ECHOTRANSACT_PREVIOUS_MASTER_KEYS", settings.master_key)):
        monkeypatch.setenv(name, value if isinstance(value, str) else base64.b64encode(value).decode())
    assert main(["customers", "rewrap", "--batch-size", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rewrapped"] == 3 and report["master_key_id"] == master_key_id(new_key)
    assert report["live_keys_by_master_key_id"] == {master_key_id(new_key): 3}
    assert _wrapped_under(database_url) == {master_key_id(new_key): 3}
    with open_database(database_url) as pool:
        assert build_customer_keys(rotated, pool).rewrap() == 0  # nothing left to move

    # Only the new master key is needed now; the old one (and the hash key's) opens nothing.
    after = build_ledger(new_only, database_url, clock=clock, processor=processor)
    try:
        assert {after.export_customer(p)["sessions"][0]["phone"] for p in phones} == set(phones)
    finally:
        after.close()
    for phone in phones:
        with pytest.raises(UnknownMasterKey):
            ledger.export_customer(phone)


def test_projections_open_personal_data_only_with_the_reader_they_are_given(
    ledger: Ledger, database_url: str, owner_database_url: str, settings: Settings,
) -> None:
    """No process-wide reader: building another deployment's opener and reader in this process (a
    second ledger's) changes nothing, and a projection given no reader opens nothing."""
    merchant_id = new_merchant(ledger)
    session_id = UUID(ledger.open_session(
        "iso-open", merchant_id=merchant_id, amount_minor=2_500, currency="USD", customer_phone="+14155557878",
        order_reference="ORDER-iso", voice_platform="alexa", conversation_id="conv-iso",
        line_items=[{"sku": "X", "name": "Thing", "quantity": 1, "unit_amount_minor": 2_500}]).result["session_id"])
    other = settings.replace(master_key=b"O" * 32)
    other_reader = personal_data_reader(other)
    envelope_opener(other)

    def masked(projections: list[Any]) -> str:
        s = ProjectionStore(owner_database_url, projections, envelope_opener(settings))  # a rebuild: the owner's
        try:
            s.rebuild()
        finally:
            s.close()
        with psycopg.connect(owner_database_url) as conn:
            row = conn.execute("SELECT customer_phone_masked FROM session_status WHERE session_id = %s",
                               (session_id,)).fetchone()
        assert row is not None
        return str(row[0])

    assert masked(list(all_projections().values())) == "withheld"
    assert masked(list(all_projections(personal_data_reader(settings)).values())) == "+1******7878"
    # The other deployment's reader cannot unwrap this one's keys (another master key).
    sealed = ledger.get_session(session_id).personal
    with psycopg.connect(owner_database_url) as conn, conn.cursor() as cur, pytest.raises(UnknownMasterKey):
        other_reader.open_many(cur, [sealed])


def test_concurrent_first_sessions_of_a_phone_share_one_key_and_later_ones_only_read_it(
    database_url: str, settings: Settings,
) -> None:
    """Many sessions of a new phone at once make one key; a known phone's key is read, its row
    never written (every session once rewrote it, and sessions of one phone queued on its lock)."""
    import threading

    from adapters.postgres.connection import open_pool

    pool = open_pool(database_url, max_size=8, max_idle_s=2.0, wait_s=10)
    keys = build_customer_keys(settings, pool)
    try:
        lookup = f"lookup-{uuid4()}"
        sessions = [uuid4() for _ in range(8)]
        found: list[Any] = []
        barrier = threading.Barrier(len(sessions))

        def first(session_id: UUID) -> None:
            barrier.wait()
            found.append(keys.key_for(lookup, session_id=session_id))

        threads = [threading.Thread(target=first, args=(s,)) for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(found) == len(sessions) and len({(k.key_id, k.customer_id, k.material) for k in found}) == 1
        with psycopg.connect(database_url) as conn:
            row_version = conn.execute("SELECT xmin::text FROM customer_keys WHERE lookup_hash = %s",
                                       (lookup,)).fetchone()
            keys.key_for(lookup, session_id=uuid4())
            assert conn.execute("SELECT xmin::text FROM customer_keys WHERE lookup_hash = %s",
                                (lookup,)).fetchone() == row_version
            linked = conn.execute("SELECT count(*) FROM customer_sessions WHERE key_id = %s",
                                  (found[0].key_id,)).fetchone()
        assert linked == (len(sessions) + 1,)
    finally:
        pool.close()


def test_a_key_for_a_session_about_to_be_saved_leaves_the_flush_to_that_save(
    database_url: str, settings: Settings,
) -> None:
    """Opening a session reads (or makes) its customer's key and links the session in a commit that
    does not wait for the disk: the session's save comes after it and its flush carries both. Any
    other caller's commit waits for the disk as usual. Looked at inside the statement's own
    transaction, where the setting lives, whether the key was made or found."""
    import contextlib

    with psycopg.connect(database_url) as conn:

        class OneTransaction:  # the pool's interface over one connection, to look inside its transaction
            @contextlib.contextmanager
            def connection(self) -> Iterator[psycopg.Connection[Any]]:
                yield conn

        keys = build_customer_keys(settings, OneTransaction())  # type: ignore[arg-type]
        for saved_after, setting in ((False, "on"), (True, "off")):
            lookup = f"lookup-{uuid4()}"
            made = keys.key_for(lookup, session_id=uuid4(), saved_after=saved_after)
            assert conn.execute("SHOW synchronous_commit").fetchone() == (setting,)
            conn.commit()
            found = keys.key_for(lookup, session_id=uuid4(), saved_after=saved_after)
            assert conn.execute("SHOW synchronous_commit").fetchone() == (setting,)
            conn.commit()
            assert found.key_id == made.key_id
            linked = conn.execute("SELECT count(*) FROM customer_sessions WHERE key_id = %s", (made.key_id,)).fetchone()
            assert linked == (2,)
