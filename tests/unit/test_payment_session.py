"""PaymentSession: transitions per state, expiry, code lockout, resends, identity, declines, hashes only."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any
from uuid import uuid4

import pytest

from domain.errors import (
    AmountTooLarge,
    DomainError,
    IdentityCheckNotRequired,
    IdentityCheckRequired,
    InvalidAmount,
    InvalidField,
    InvalidPaymentMethod,
    InvalidPhone,
    InvalidTransition,
    ItemsDoNotSum,
    LinkExpired,
    LinkNotExpired,
    ResendLimitReached,
    SessionLocked,
    UnknownCurrency,
)
from domain.payment_session import CodeCheck, PaymentSession

from .builders import (
    AFTER_EXPIRY,
    CODE_HASH,
    EXPIRES_AT,
    LINK_TOKEN_HASH,
    NOW,
    SESSION_AMOUNT_MINOR,
    WRONG_CODE_HASH,
    attach,
    fake_seal,
    line_items_for,
    open_session,
    session_in,
)

STATES = [
    "awaiting_customer",
    "link_sent",
    "link_opened",
    "code_verified",
    "identity_verified",
    "payment_method_attached",
    "completed",
    "expired",
    "cancelled",
    "failed",
    "locked",
]
TERMINAL = {"completed", "expired", "cancelled", "failed", "locked"}
ABANDONABLE = set(STATES) - TERMINAL - {"payment_method_attached"}

# Written from the journey in the product brief, not read off the code.
ALLOWED: dict[str, set[str]] = {
    "send_link": {"awaiting_customer"},
    "open_link": {"link_sent", "link_opened"},
    "resend_code": {"link_sent", "link_opened"},
    "verify_code": {"link_sent", "link_opened"},
    "record_identity_check": {"code_verified"},
    "attach_payment_method": {"code_verified", "identity_verified"},
    "complete": {"payment_method_attached"},
    "record_decline": {"payment_method_attached"},
    "expire": ABANDONABLE,
    "cancel": ABANDONABLE,
    "fail": set(STATES) - TERMINAL - {"payment_method_attached"},
}

Command = Callable[[PaymentSession], Any]

# Every command with arguments that would be accepted in an allowed state, before expiry
# (expire() gets a time after expiry so only the state can refuse it).
COMMANDS: dict[str, Command] = {
    "send_link": lambda s: s.send_link(LINK_TOKEN_HASH, CODE_HASH, NOW),
    "open_link": lambda s: s.open_link(NOW),
    "resend_code": lambda s: s.resend_code("hash-of-new-code", NOW),
    "verify_code": lambda s: s.verify_code(CODE_HASH, NOW),
    "record_identity_check": lambda s: s.record_identity_check(
        verified=True, verifier="kba", reason="", now=NOW
    ),
    "attach_payment_method": lambda s: attach(s),
    "complete": lambda s: s.complete(s.payment_id or uuid4()),
    "record_decline": lambda s: s.record_decline(s.payment_id or uuid4(), "do_not_honor"),
    "expire": lambda s: s.expire(AFTER_EXPIRY),
    "cancel": lambda s: s.cancel("customer hung up", seal=fake_seal),
    "fail": lambda s: s.fail("processor_unavailable"),
}


def wrong_state_cases() -> Iterator[Any]:
    for command, allowed in ALLOWED.items():
        for state in STATES:
            if state not in allowed:
                yield pytest.param(command, state, id=f"{command}-in-{state}")


def right_state_cases() -> Iterator[Any]:
    for command, allowed in ALLOWED.items():
        for state in sorted(allowed):
            yield pytest.param(command, state, id=f"{command}-in-{state}")


@pytest.mark.parametrize(("command", "state"), list(wrong_state_cases()))
def test_command_in_wrong_state_is_refused_without_an_event(command: str, state: str) -> None:
    session = session_in(state, identity_required=True)
    session.collect_events()
    before = dict(vars(session))
    expected = SessionLocked if state == "locked" else InvalidTransition
    with pytest.raises(expected) as caught:
        COMMANDS[command](session)
    assert type(caught.value) is expected
    if expected is InvalidTransition:
        assert caught.value.details["state"] == state
    assert session.collect_events() == []
    assert vars(session) == before


@pytest.mark.parametrize(("command", "state"), list(right_state_cases()))
def test_command_in_allowed_state_is_accepted(command: str, state: str) -> None:
    session = session_in(
        state, identity_required=state == "identity_verified" or command == "record_identity_check"
    )
    session.collect_events()
    COMMANDS[command](session)
    if not (command == "open_link" and state == "link_opened"):
        assert session.collect_events(), "an accepted command records an event"


def test_opening_the_link_again_records_nothing() -> None:
    session = session_in("link_opened")
    session.collect_events()
    session.open_link(NOW)
    assert session.collect_events() == []
    assert session.status == "link_opened"


# -- opening --------------------------------------------------------------------------------


def test_open_records_the_order() -> None:
    session = open_session(metadata={"store": "12"})
    assert session.status == "awaiting_customer"
    assert session.amount_minor == SESSION_AMOUNT_MINOR
    assert session.line_items == line_items_for(SESSION_AMOUNT_MINOR)
    # Personal data (the phone, free-text metadata) is recorded only as the seal returned it.
    assert session.personal == fake_seal({"phone": "+14155550123", "metadata": {"store": "12"}})
    assert "customer_phone" not in session.__dict__
    assert session.expires_at == EXPIRES_AT
    assert session.code_attempts_left == 5


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"currency": "XXX"}, UnknownCurrency),
        ({"amount_minor": 0}, InvalidAmount),
        ({"amount_minor": 100_000_001, "line_items": line_items_for(1)}, AmountTooLarge),
        ({"line_items": line_items_for(SESSION_AMOUNT_MINOR - 1)}, ItemsDoNotSum),
        ({"customer_phone": "4155550123"}, InvalidPhone),
        ({"callback_url": "ftp://x.example"}, InvalidField),
        ({"order_reference": ""}, InvalidField),
        ({"order_reference": "R" * 101}, InvalidField),
        ({"voice_platform": ""}, InvalidField),
        ({"conversation_id": " "}, InvalidField),
        ({"metadata": {f"k{i}": "v" for i in range(21)}}, InvalidField),
        ({"metadata": {"k": 1}}, InvalidField),
        ({"metadata": {"": "v"}}, InvalidField),
        ({"metadata": ["k", "v"]}, InvalidField),
    ],
    ids=repr,
)
def test_open_rejections(overrides: dict[str, Any], error: type[DomainError]) -> None:
    with pytest.raises(error):
        open_session(**overrides)


@pytest.mark.parametrize(
    ("threshold", "required"),
    [
        (SESSION_AMOUNT_MINOR - 1, True),  # amount above the threshold
        (SESSION_AMOUNT_MINOR, False),  # equal is not above
        (SESSION_AMOUNT_MINOR + 1, False),
        (0, True),
    ],
)
def test_identity_is_required_only_above_the_threshold(threshold: int, required: bool) -> None:
    session = open_session(identity_threshold_minor=threshold)
    assert session.identity_required is required


# -- expiry ---------------------------------------------------------------------------------

LIVE_COMMANDS: list[tuple[str, str, Callable[[PaymentSession, Any], Any]]] = [
    ("send_link", "awaiting_customer", lambda s, now: s.send_link(LINK_TOKEN_HASH, CODE_HASH, now)),
    ("open_link", "link_sent", lambda s, now: s.open_link(now)),
    ("resend_code", "link_sent", lambda s, now: s.resend_code("hash-of-new-code", now)),
    ("verify_code", "link_opened", lambda s, now: s.verify_code(CODE_HASH, now)),
    (
        "record_identity_check",
        "code_verified",
        lambda s, now: s.record_identity_check(verified=True, verifier="kba", reason="", now=now),
    ),
    ("attach_payment_method", "code_verified", lambda s, now: attach(s, now=now)),
    ("attach_payment_method", "identity_verified", lambda s, now: attach(s, now=now)),
]


@pytest.mark.parametrize("late", [timedelta(0), timedelta(seconds=1), timedelta(days=30)], ids=str)
@pytest.mark.parametrize(
    ("name", "state", "command"), LIVE_COMMANDS, ids=[f"{c[0]}-in-{c[1]}" for c in LIVE_COMMANDS]
)
def test_customer_steps_at_or_after_expiry_raise_link_expired(
    name: str, state: str, command: Callable[[PaymentSession, Any], Any], late: timedelta
) -> None:
    session = session_in(state, identity_required=name == "record_identity_check")
    session.collect_events()
    with pytest.raises(LinkExpired):
        command(session, EXPIRES_AT + late)
    assert session.collect_events() == []
    assert session.status == state


@pytest.mark.parametrize(
    ("name", "state", "command"), LIVE_COMMANDS, ids=[f"{c[0]}-in-{c[1]}" for c in LIVE_COMMANDS]
)
def test_customer_steps_just_before_expiry_are_accepted(
    name: str, state: str, command: Callable[[PaymentSession, Any], Any]
) -> None:
    session = session_in(state, identity_required=name == "record_identity_check")
    session.collect_events()
    command(session, EXPIRES_AT - timedelta(microseconds=1))
    assert session.collect_events()


@pytest.mark.parametrize("state", sorted(ABANDONABLE))
def test_expire_before_expiry_is_refused(state: str) -> None:
    session = session_in(state)
    session.collect_events()
    with pytest.raises(LinkNotExpired):
        session.expire(EXPIRES_AT - timedelta(microseconds=1))
    assert session.status == state
    assert session.collect_events() == []


@pytest.mark.parametrize("state", sorted(ABANDONABLE))
def test_expire_at_expiry_ends_the_session(state: str) -> None:
    session = session_in(state)
    session.expire(EXPIRES_AT)
    assert session.status == "expired"
    assert session.end_reason == "link_expired"
    assert session.is_terminal


def test_expire_is_not_allowed_while_a_payment_is_in_flight_but_the_payment_may_complete() -> None:
    session = session_in("payment_method_attached")
    with pytest.raises(InvalidTransition):
        session.expire(AFTER_EXPIRY + timedelta(days=1))
    assert session.payment_id is not None
    session.complete(session.payment_id)
    assert session.status == "completed"


# -- one-time code ----------------------------------------------------------------------------


def test_five_wrong_codes_lock_the_session() -> None:
    session = session_in("link_opened")
    outcomes = [session.verify_code(WRONG_CODE_HASH, NOW) for _ in range(4)]
    assert outcomes == [CodeCheck.INCORRECT] * 4
    assert session.code_attempts_left == 1
    assert session.status == "link_opened"
    assert session.verify_code(WRONG_CODE_HASH, NOW) is CodeCheck.LOCKED
    assert session.status == "locked"
    assert session.end_reason == "too_many_code_attempts"
    assert session.code_attempts_left == 0
    assert session.is_terminal
    events = session.collect_events()
    assert [type(e).__name__ for e in events[-6:]] == ["CodeRejected"] * 5 + ["Locked"]
    assert [getattr(e, "attempts", None) for e in events[-6:]] == [1, 2, 3, 4, 5, 5]


@pytest.mark.parametrize(
    "command",
    [
        lambda s: s.verify_code(CODE_HASH, NOW),  # even the right code
        lambda s: s.verify_code(WRONG_CODE_HASH, NOW),
        lambda s: s.resend_code("hash-of-new-code", NOW),
        lambda s: s.open_link(NOW),
        lambda s: s.cancel("customer hung up", seal=fake_seal),
    ],
    ids=["right-code", "wrong-code", "resend", "open", "cancel"],
)
def test_a_locked_session_refuses_further_commands(command: Command) -> None:
    session = session_in("locked")
    session.collect_events()
    with pytest.raises(SessionLocked) as caught:
        command(session)
    assert caught.value.code == "session_locked"
    assert session.collect_events() == []


def test_four_wrong_codes_then_the_right_one_verifies() -> None:
    session = session_in("link_sent")
    for _ in range(4):
        session.verify_code(WRONG_CODE_HASH, NOW)
    assert session.verify_code(CODE_HASH, NOW) is CodeCheck.VERIFIED
    assert session.status == "code_verified"


def test_a_resend_replaces_the_code_and_does_not_reset_attempts() -> None:
    session = session_in("link_opened")
    for _ in range(4):
        session.verify_code(WRONG_CODE_HASH, NOW)
    session.resend_code("hash-of-new-code", NOW)
    assert session.code_attempts_left == 1
    assert session.verify_code(CODE_HASH, NOW) is CodeCheck.LOCKED  # the old code no longer counts


def test_the_resent_code_verifies() -> None:
    session = session_in("link_opened")
    session.resend_code("hash-of-new-code", NOW)
    assert session.verify_code("hash-of-new-code", NOW) is CodeCheck.VERIFIED


def test_the_code_may_be_resent_three_times_only() -> None:
    session = session_in("link_sent")
    for n in range(1, 4):
        session.resend_code(f"hash-of-code-{n}", NOW)
    assert [e.resends for e in session.collect_events() if isinstance(e, PaymentSession.CodeResent)] == [
        1,
        2,
        3,
    ]
    with pytest.raises(ResendLimitReached):
        session.resend_code("hash-of-code-4", NOW)
    assert session.code_hash == "hash-of-code-3"
    assert session.collect_events() == []


# -- hashes only ------------------------------------------------------------------------------


def _all_event_values(events: Sequence[Any]) -> list[Any]:
    values: list[Any] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                walk(v)
        else:
            values.append(value)

    for event in events:
        walk(vars(event))
    return values


def test_events_store_exactly_the_hashes_given_and_never_a_guess() -> None:
    session = open_session()
    session.send_link(LINK_TOKEN_HASH, CODE_HASH, NOW)
    session.open_link(NOW)
    session.verify_code(WRONG_CODE_HASH, NOW)
    session.resend_code("hash-of-resent-code", NOW)
    session.verify_code("hash-of-resent-code", NOW)
    events = session.collect_events()
    (sent,) = [e for e in events if isinstance(e, PaymentSession.LinkSent)]
    assert (sent.link_token_hash, sent.code_hash) == (LINK_TOKEN_HASH, CODE_HASH)
    (resent,) = [e for e in events if isinstance(e, PaymentSession.CodeResent)]
    assert resent.code_hash == "hash-of-resent-code"
    values = _all_event_values(events)
    assert WRONG_CODE_HASH not in values
    assert values.count(LINK_TOKEN_HASH) == 1
    assert values.count(CODE_HASH) == 1
    assert values.count("hash-of-resent-code") == 1  # the successful guess is not stored again
    assert not any(isinstance(v, str) and WRONG_CODE_HASH in v for v in values)


def test_link_token_matches_only_the_stored_hash() -> None:
    session = open_session()
    assert session.link_token_matches(LINK_TOKEN_HASH) is False  # no link yet
    session.send_link(LINK_TOKEN_HASH, CODE_HASH, NOW)
    assert session.link_token_matches(LINK_TOKEN_HASH) is True
    assert session.link_token_matches(LINK_TOKEN_HASH[:-1]) is False
    assert session.link_token_matches(CODE_HASH) is False


def test_attached_card_is_stored_as_token_brand_and_last_four_only() -> None:
    session = session_in("code_verified")
    session.collect_events()
    attach(session)
    (attached,) = session.collect_events()
    assert {k: v for k, v in vars(attached).items() if k.startswith("card_")} == {
        "card_token": "tok_visa_4242",
        "card_brand": "visa",
        "card_last4": "4242",
    }


# -- identity -------------------------------------------------------------------------------


def test_attach_before_identity_check_is_refused_when_required() -> None:
    session = session_in("code_verified", identity_required=True)
    session.collect_events()
    with pytest.raises(IdentityCheckRequired):
        attach(session)
    assert session.collect_events() == []
    assert not session.ready_for_payment_method


def test_identity_check_when_not_required_is_refused() -> None:
    session = session_in("code_verified", identity_required=False)
    with pytest.raises(IdentityCheckNotRequired):
        session.record_identity_check(verified=True, verifier="kba", reason="", now=NOW)
    assert session.ready_for_payment_method


def test_identity_verified_then_attach() -> None:
    session = session_in("code_verified", identity_required=True)
    session.record_identity_check(verified=True, verifier="kba", reason="", now=NOW)
    assert session.status == "identity_verified"
    assert session.ready_for_payment_method
    attach(session)
    assert session.status == "payment_method_attached"


def test_three_failed_identity_checks_fail_the_session() -> None:
    session = session_in("code_verified", identity_required=True)
    for _ in range(2):
        session.record_identity_check(verified=False, verifier="kba", reason="wrong answer", now=NOW)
        assert session.status == "code_verified"
    session.record_identity_check(verified=False, verifier="kba", reason="wrong answer", now=NOW)
    assert session.status == "failed"
    assert session.end_reason == "identity_not_verified"
    assert session.identity_attempts == 3


# -- payment method and outcome -------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"card_brand": "bitcoin"}, InvalidPaymentMethod),
        ({"card_brand": "VISA"}, InvalidPaymentMethod),
        ({"card_last4": "424"}, InvalidPaymentMethod),
        ({"card_last4": "42424"}, InvalidPaymentMethod),
        ({"card_last4": "42a4"}, InvalidPaymentMethod),
        ({"card_last4": 4242}, InvalidPaymentMethod),
        ({"card_token": ""}, InvalidField),
        ({"card_token": "t" * 65}, InvalidField),
    ],
    ids=repr,
)
def test_attach_rejections(overrides: dict[str, Any], error: type[DomainError]) -> None:
    session = session_in("code_verified")
    session.collect_events()
    kwargs: dict[str, Any] = {
        "payment_id": uuid4(),
        "card_token": "tok_visa_4242",
        "card_brand": "visa",
        "card_last4": "4242",
        "now": NOW,
    }
    with pytest.raises(error):
        session.attach_payment_method(**(kwargs | overrides))
    assert session.collect_events() == []
    assert session.status == "code_verified"


@pytest.mark.parametrize(
    "command",
    [lambda s: s.complete(uuid4()), lambda s: s.record_decline(uuid4(), "do_not_honor")],
    ids=["complete", "decline"],
)
def test_outcome_for_another_payment_is_refused(command: Command) -> None:
    session = session_in("payment_method_attached")
    session.collect_events()
    with pytest.raises(InvalidField):
        command(session)
    assert session.status == "payment_method_attached"
    assert session.collect_events() == []


@pytest.mark.parametrize(
    ("identity_required", "ready_state"), [(False, "code_verified"), (True, "identity_verified")]
)
def test_a_decline_returns_to_the_ready_state(identity_required: bool, ready_state: str) -> None:
    session = session_in("payment_method_attached", identity_required=identity_required)
    declined_payment = session.payment_id
    assert declined_payment is not None
    session.record_decline(declined_payment, "do_not_honor")
    assert session.status == ready_state
    assert (session.payment_id, session.card_token, session.card_brand, session.card_last4) == (None,) * 4
    assert session.declines == 1
    with pytest.raises(InvalidTransition):
        session.complete(declined_payment)
    attach(session)
    assert session.status == "payment_method_attached"


@pytest.mark.parametrize("identity_required", [False, True])
def test_three_declines_fail_the_session(identity_required: bool) -> None:
    session = session_in("code_verified", identity_required=identity_required)
    if identity_required:
        session.record_identity_check(verified=True, verifier="kba", reason="", now=NOW)
    for n in range(1, 4):
        payment_id = attach(session)
        session.record_decline(payment_id, "insufficient_funds")
        assert session.declines == n
    assert session.status == "failed"
    assert session.end_reason == "too_many_declines"
    events = session.collect_events()
    assert [type(e).__name__ for e in events[-2:]] == ["PaymentDeclined", "Failed"]


def test_complete_ends_the_session() -> None:
    session = session_in("payment_method_attached")
    assert session.payment_id is not None
    session.complete(session.payment_id)
    assert session.status == "completed"
    assert session.is_terminal


@pytest.mark.parametrize("state", sorted(ABANDONABLE))
def test_cancel_records_the_reason(state: str) -> None:
    session = session_in(state)
    session.cancel("customer hung up", seal=fake_seal)
    # The words may name the customer: only sealed; the aggregate knows it was cancelled.
    assert (session.status, session.end_reason) == ("cancelled", "cancelled")
    assert session.cancel_personal == fake_seal({"reason": "customer hung up"})


def test_cancel_needs_a_reason() -> None:
    session = session_in("link_sent")
    with pytest.raises(InvalidField):
        session.cancel("  ", seal=fake_seal)
    assert session.status == "link_sent"


def test_fail_is_refused_while_a_payment_is_in_flight() -> None:
    session = session_in("payment_method_attached")
    with pytest.raises(InvalidTransition):
        session.fail("processor_timeout")
    assert session.status == "payment_method_attached"
