"""`echotransact webhooks secret` (and `--rotate`) and `replay --verify` over the analytics' card
step and decline reasons, run as an operator runs them (in process, against the test servers)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from adapters.notifications.webhooks import PLATFORM_ID, platform_webhook_secret, webhook_secret
from api.bootstrap import envelope_opener, personal_data_reader
from api.cli import main
from api.settings import Settings
from application.ledger import Ledger
from projections.engine import ProjectionStore
from projections.registry import all_projections
from tests.application.flows import new_merchant, open_session, pay
from tests.e2e.test_cli_tools import cli_env

__all__ = ["cli_env"]  # the fixture, shared with the other operators' tools


def test_secret_prints_the_current_version_and_rotate_prints_the_new_one(
    cli_env: None, ledger: Ledger, settings: Settings, capsys: pytest.CaptureFixture[str],
) -> None:
    merchant = new_merchant(ledger, "m-cli")
    assert main(["webhooks", "secret", "--merchant", str(merchant)]) == 0
    assert capsys.readouterr().out.strip() == webhook_secret(settings.hash_key, merchant, 1)

    assert main(["webhooks", "secret", "--merchant", str(merchant), "--rotate", "--overlap-hours", "2",
                 "--idempotency-key", "rotate-cli-1"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == webhook_secret(settings.hash_key, merchant, 2)
    assert "secret version 2" in out.err
    # The same idempotency key again: the same rotation, still version 2; with another overlap,
    # refused (the key was used for a different request).
    assert main(["webhooks", "secret", "--merchant", str(merchant), "--rotate", "--overlap-hours", "2",
                 "--idempotency-key", "rotate-cli-1"]) == 0
    assert capsys.readouterr().out.strip() == webhook_secret(settings.hash_key, merchant, 2)
    assert main(["webhooks", "secret", "--merchant", str(merchant), "--rotate",
                 "--idempotency-key", "rotate-cli-1"]) == 2
    assert "idempotency_key_reused" in capsys.readouterr().err
    assert ledger.get_merchant(merchant).webhook_secret_version == 2
    assert main(["webhooks", "secret", "--merchant", str(merchant)]) == 0
    assert capsys.readouterr().out.strip() == webhook_secret(settings.hash_key, merchant, 2)

    # The platform's secret has one version; an unknown merchant or a week and more of overlap is refused.
    assert main(["webhooks", "secret", "--merchant", str(PLATFORM_ID)]) == 0
    assert capsys.readouterr().out.strip() == platform_webhook_secret(settings.hash_key)
    for refused in (["--merchant", str(PLATFORM_ID), "--rotate"],
                    ["--merchant", "7b1f2a0e-0000-4000-8000-000000000009"],
                    ["--merchant", str(merchant), "--rotate", "--overlap-hours", "169"]):
        assert main(["webhooks", "secret", *refused]) == 2
        assert capsys.readouterr().out == ""  # no secret printed
    assert ledger.get_merchant(merchant).webhook_secret_version == 2


def test_replay_verify_covers_the_card_step_and_the_reasons(
    cli_env: None, ledger: Ledger, database_url: str, settings: Settings, owner_database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import psycopg

    merchant = new_merchant(ledger, "m-replay")
    session = open_session(ledger, merchant, "s-replay")
    ledger.authorize_payment(pay(ledger, session, last4="0002", prefix="d-"))
    store = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()),
                            envelope_opener(settings))
    store.catch_up(grace=timedelta(0))
    store.close()
    assert main(["replay", "--verify", "--projection", "analytics"]) == 0
    assert "0 difference(s)" in capsys.readouterr().err
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute("UPDATE decline_reasons_daily SET payments = payments + 1")
        conn.execute("UPDATE funnel_daily SET card_attached = 0")
    assert main(["replay", "--verify", "--projection", "analytics"]) == 1
    out = capsys.readouterr().out
    assert "decline_reasons_daily" in out and "funnel_daily" in out
