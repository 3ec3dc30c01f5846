"""The Customer aggregate and a session's recognition of an identity check on file."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

import pytest

from domain.customer import Customer
from domain.errors import IdentityCheckNotRequired, InvalidTransition

from .builders import NOW, attach, open_session

YEAR = timedelta(days=365)


def test_a_check_on_file_stands_in_for_a_year_and_not_before_it_passed() -> None:
    customer = Customer.register(uuid4())
    assert not customer.identity_on_file(NOW, YEAR)
    customer.record_identity_verified(verifier="dev", session_id=uuid4(), now=NOW)
    assert customer.identity_on_file(NOW, YEAR)
    assert customer.identity_on_file(NOW + YEAR - timedelta(seconds=1), YEAR)
    assert not customer.identity_on_file(NOW + YEAR, YEAR)
    assert not customer.identity_on_file(NOW - timedelta(seconds=1), YEAR)  # a clock behind the record
    assert customer.merchant_id is None


def test_a_recognized_session_goes_from_the_code_to_the_card() -> None:
    session = open_session(identity_required=True)
    session.recognize_identity(uuid4(), NOW)
    session.send_link("link", "code", NOW)
    session.verify_code("code", NOW)
    assert session.identity_required and not session.needs_identity_check and session.ready_for_payment_method
    with pytest.raises(IdentityCheckNotRequired):
        session.record_identity_check(verified=True, verifier="dev", reason="", now=NOW)
    payment_id = attach(session)
    session.record_decline(payment_id, "insufficient_funds")
    assert session.status == "code_verified"  # back to the card, not to an identity step


def test_recognition_only_at_opening_and_only_above_the_threshold() -> None:
    with pytest.raises(IdentityCheckNotRequired):
        open_session(identity_required=False).recognize_identity(uuid4(), NOW)
    session = open_session(identity_required=True)
    session.send_link("link", "code", NOW)
    with pytest.raises(InvalidTransition):
        session.recognize_identity(uuid4(), NOW)
