"""The operators' tools as a compliance analyst runs them: replay (--verify), audit verify/export."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from adapters.dev.servers import ServerURLs
from api.bootstrap import envelope_opener, personal_data_reader
from api.cli import main
from api.settings import Settings
from application.ledger import Ledger
from projections.engine import ProjectionStore
from projections.registry import all_projections
from tests.application.flows import new_merchant, open_session, pay


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, servers: ServerURLs, database_url: str, owner_database_url: str,
            settings: Settings, tmp_path: Path) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)  # the application's role
    monkeypatch.setenv("MIGRATION_DATABASE_URL", owner_database_url)  # the owner's, for replay
    monkeypatch.setenv("REDIS_URL", servers.redis_url)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", servers.kafka_bootstrap_servers)
    monkeypatch.setenv("ECHOTRANSACT_HASH_KEY", base64.b64encode(settings.hash_key).decode())
    monkeypatch.setenv("ECHOTRANSACT_MASTER_KEY", base64.b64encode(settings.master_key or b"").decode())
    monkeypatch.setenv("ECHOTRANSACT_ENCRYPTION_KEY", base64.b64encode(settings.encryption_key or b"").decode())
    monkeypatch.setenv("ECHOTRANSACT_DATA_DIR", str(tmp_path / "data"))


@pytest.fixture
def projected(ledger: Ledger, database_url: str, settings: Settings) -> dict[str, object]:
    merchant = new_merchant(ledger, "m1")
    other = new_merchant(ledger, "m2")
    payment = pay(ledger, open_session(ledger, merchant, "s1"))
    ledger.authorize_payment(payment)
    ledger.capture_payment("cap", payment)
    open_session(ledger, other, "s2")
    store = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()),
                            envelope_opener(settings))
    store.catch_up(grace=timedelta(0))
    store.close()
    return {"merchant": merchant, "other": other, "payment": payment}


def test_replay_verify_finds_a_tampered_row_and_replay_repairs_it(
    cli_env: None, projected: dict[str, object], owner_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", "--verify"]) == 0
    assert "0 difference(s)" in capsys.readouterr().err
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute("UPDATE payment_status SET status = 'settled' WHERE payment_id = %s", (projected["payment"],))
    assert main(["replay", "--verify", "--projection", "status"]) == 1
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert {(r["table"], r["side"], r["row"]["status"]) for r in rows} == {
        ("payment_status", "live only", "settled"), ("payment_status", "rebuild only", "captured")}
    assert main(["replay", "--projection", "status"]) == 0
    assert main(["replay", "--verify"]) == 0


def test_unknown_projection_is_a_readable_error(cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--projection", "statuz"]) == 2
    err = capsys.readouterr().err
    assert "unknown projection statuz" in err and "Traceback" not in err


def test_audit_verify_and_export(
    cli_env: None, projected: dict[str, object], database_url: str, owner_database_url: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["audit", "verify"]) == 0
    assert "audit chain intact" in capsys.readouterr().out
    target = tmp_path / "audit.jsonl"
    assert main(["audit", "export", "--merchant", str(projected["merchant"]), "-o", str(target)]) == 0
    exported = [json.loads(line) for line in target.read_text().splitlines()]
    with psycopg.connect(database_url) as conn:
        expected = conn.execute("SELECT count(*) FROM audit_log WHERE merchant_id = %s",
                                (projected["merchant"],)).fetchone()[0]
    assert len(exported) == expected > 5
    assert {row["merchant_id"] for row in exported} == {str(projected["merchant"])}
    assert "+14155550123" not in target.read_text()

    with psycopg.connect(owner_database_url, autocommit=True) as conn:  # the application may not
        victim = conn.execute("SELECT position FROM audit_log ORDER BY position OFFSET 3 LIMIT 1").fetchone()[0]
        conn.execute("UPDATE audit_log SET event_type = 'payment.settled' WHERE position = %s", (victim,))
    assert main(["audit", "verify"]) == 1
    assert f"broken at position {victim}" in capsys.readouterr().err


def test_audit_export_rejects_bad_filters_readably(cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["audit", "export", "--from", "yesterday"])
    assert exit_.value.code == 2
    assert "is not an ISO 8601 time" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["audit", "export", "--merchant", "acme"])
    assert "is not a UUID" in capsys.readouterr().err


def test_keys_create_prints_a_working_key_once(
    cli_env: None, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    merchant = new_merchant(ledger, "keys-merchant")
    assert main(["keys", "create", "--role", "merchant", "--merchant", str(merchant), "--label", "till 1"]) == 0
    token = capsys.readouterr().out.strip()
    key = ledger.authenticate(token)
    assert key is not None and key.merchant_id == merchant and key.label == "till 1"
    assert main(["keys", "create", "--role", "analyst"]) == 0
    assert ledger.authenticate(capsys.readouterr().out.strip()).role == "analyst"  # type: ignore[union-attr]
    assert main(["keys", "create", "--role", "merchant"]) == 2
    assert "--merchant ID is required" in capsys.readouterr().err
    assert main(["keys", "create", "--role", "merchant", "--merchant", "00000000-0000-0000-0000-000000000001"]) == 2
    assert "no merchant" in capsys.readouterr().err


@pytest.mark.usefixtures("away_from_midnight")
def test_reconcile_reports_the_day_settles_its_captures_and_says_so_when_run_again(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, settings: Settings, database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from datetime import UTC, datetime

    from adapters.clock import ManualClock
    from adapters.dev.processor_server import SandboxProcessorServer
    from adapters.processors.client import HttpProcessor
    from api.bootstrap import build_ledger

    with SandboxProcessorServer("primary") as sandbox, SandboxProcessorServer("secondary") as other:
        monkeypatch.setenv("ECHOTRANSACT_PROCESSORS", f"primary={sandbox.url},secondary={other.url}")
        ledger = build_ledger(settings, database_url, clock=ManualClock(),
                              processor=HttpProcessor("primary", sandbox.url))
        try:
            merchant = new_merchant(ledger, "cli-rec")
            for n in range(2):
                payment = pay(ledger, open_session(ledger, merchant, f"cli-rec-{n}"), prefix=f"cli-rec{n}-")
                ledger.authorize_payment(payment)
                ledger.capture_payment(f"cli-rec-cap-{n}", payment)
        finally:
            ledger.close()
        store = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()),
                                envelope_opener(settings))
        store.catch_up(grace=timedelta(0))
        store.close()
        day = datetime.now(UTC).date().isoformat()
        capsys.readouterr()
        assert main(["reconcile", "--processor", "primary", "--date", day]) == 1  # the day is still open
        assert "has not closed" in capsys.readouterr().err
        sandbox.close_day(datetime.now(UTC).date())
        assert main(["reconcile", "--processor", "primary", "--date", day]) == 0
        assert capsys.readouterr().out.strip() == f"primary {day} USD: 2 matched; 2 payments settled"
        assert main(["reconcile", "--processor", "primary", "--date", day]) == 0
        assert "reconciled before: the same result" in capsys.readouterr().out
        assert main(["reconcile", "--processor", "tertiary", "--date", day]) == 2
        assert "no processor named 'tertiary'; configured: primary, secondary" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(["reconcile", "--processor", "primary", "--date", "yesterday"])
        assert "expected a date as YYYY-MM-DD" in capsys.readouterr().err


def test_balances_now_and_as_of_a_time_and_readable_refusals(
    cli_env: None, projected: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    payable = f"merchant:{projected['merchant']}:payable"
    assert main(["balances"]) == 0
    out = capsys.readouterr()
    assert payable in out.out and "platform:fees" in out.out
    assert "now" in out.err and "sum per currency: USD 0" in out.err  # the admin's view balances
    assert main(["balances", "--as-of", "2001-01-01T00:00:00Z"]) == 0  # the platform's: nothing then
    assert capsys.readouterr().err.startswith("0 balance(s) as of 2001-01-01T00:00:00+00:00")

    assert main(["balances", "--merchant", str(projected["merchant"])]) == 0
    mine = capsys.readouterr().out.splitlines()
    assert mine and all(line.startswith(f"merchant:{projected['merchant']}:") for line in mine)
    assert main(["balances", "--merchant", str(projected["other"])]) == 0  # registered, no money yet
    assert capsys.readouterr().out == ""

    for as_of, says in [("2999-01-01T00:00:00Z", "in the future"), ("2001-01-01T00:00:00Z", "before merchant")]:
        assert main(["balances", "--merchant", str(projected["merchant"]), "--as-of", as_of]) == 2
        err = capsys.readouterr().err
        assert says in err and "--as-of" in err and "Traceback" not in err
    for bad in ("yesterday", "2026-11-23T10:00:00"):  # not a time; no zone
        with pytest.raises(SystemExit) as exit_:
            main(["balances", "--as-of", bad])
        assert exit_.value.code == 2
        assert "--as-of" in capsys.readouterr().err
