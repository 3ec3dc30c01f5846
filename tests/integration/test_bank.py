"""The Bank port's HTTP client (adapters/banks/http.py) against the sandbox bank
(adapters/dev/bank_server.py), a real local HTTP service: a key pays once whatever happens to
the answer (a replay, a 503, a timeout, a restart), a refusal records nothing, and a malformed
request is answered 400 naming what is wrong."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from adapters.banks.http import BankProtocolError, HttpBank
from adapters.dev.bank_server import SandboxBankServer
from application.errors import BankTransferRejected, BankUnavailable
from application.ports import BankTransfer

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_DELAY_S = 0.8  # a transfer chosen by time_out_next is answered this late
CLIENT_TIMEOUT_S = 0.2  # the impatient client gives up well before that
KEY = "payout:0001"
TRANSFER: dict[str, Any] = {"merchant_id": "m-1", "amount_minor": 12_345, "currency": "USD",
                            "description": "EchoTransact payout 2026-01-02"}


@pytest.fixture
def server() -> Iterator[SandboxBankServer]:
    with SandboxBankServer(timeout_delay_s=TIMEOUT_DELAY_S) as started:
        yield started


@pytest.fixture
def bank(server: SandboxBankServer) -> Iterator[HttpBank]:
    with HttpBank(server.url, timeout_s=5.0) as client:
        yield client


@pytest.fixture
def impatient_bank(server: SandboxBankServer) -> Iterator[HttpBank]:
    with HttpBank(server.url, timeout_s=CLIENT_TIMEOUT_S) as client:
        yield client


def send(bank: HttpBank, key: str = KEY, **changes: Any) -> BankTransfer:
    return bank.transfer(key=key, **{**TRANSFER, **changes})


def post(server: SandboxBankServer, body: Any, key: str | None = KEY) -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return httpx.post(f"{server.url}/v1/transfers", json=body, headers=headers)


def test_a_transfer_pays_once_and_the_same_key_answers_it_again(server: SandboxBankServer, bank: HttpBank) -> None:
    first = send(bank)
    assert re.fullmatch(r"bank_tr_[0-9a-f]{32}", first.reference)
    assert send(bank) == first
    assert server.money_movements(KEY) == 1
    assert server.requests(KEY) == 2
    assert server.paid_total("m-1", "USD") == 12_345
    assert server.paid_total("m-1", "EUR") == server.paid_total("m-2", "USD") == 0
    [recorded] = server.transfers()
    assert (recorded.idempotency_key, recorded.transfer_id) == (KEY, first.reference)

    replay = post(server, TRANSFER)
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == {**TRANSFER, "transfer_id": first.reference, "status": "paid",
                             "created_at": recorded.created_at.isoformat()}
    status = httpx.get(f"{server.url}/v1/transfers/{quote(KEY, safe='')}")
    assert (status.status_code, status.json()) == (200, replay.json())
    unknown = httpx.get(f"{server.url}/v1/transfers/payout:unknown")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "transfer_not_found")
    assert server.money_movements(KEY) == 1


def test_a_new_transfer_is_answered_201_without_the_replay_header(server: SandboxBankServer) -> None:
    made = post(server, TRANSFER, key="payout:fresh")
    assert made.status_code == 201 and "Idempotent-Replayed" not in made.headers
    assert made.json()["status"] == "paid"


def test_the_same_key_for_another_transfer_is_refused_as_a_bug(server: SandboxBankServer, bank: HttpBank) -> None:
    send(bank)
    with pytest.raises(BankProtocolError) as raised:
        send(bank, amount_minor=99)
    assert isinstance(raised.value, RuntimeError)
    assert (raised.value.status_code, raised.value.error_code) == (409, "idempotency_key_reused")
    assert post(server, {**TRANSFER, "description": "another"}).json()["error"] == "idempotency_key_reused"
    assert server.paid_total("m-1", "USD") == 12_345
    assert server.money_movements(KEY) == 1


def test_a_failed_request_sent_again_pays_once(server: SandboxBankServer, bank: HttpBank) -> None:
    server.fail_next(1)
    with pytest.raises(BankUnavailable, match="503"):
        send(bank)
    assert server.transfers() == []
    assert send(bank).reference == server.transfers()[0].transfer_id
    assert (server.requests(KEY), server.money_movements(KEY)) == (2, 1)


def test_a_timed_out_transfer_was_paid_and_the_same_key_gets_it_back(
    server: SandboxBankServer, impatient_bank: HttpBank, bank: HttpBank,
) -> None:
    server.time_out_next(1)
    started = time.monotonic()
    with pytest.raises(BankUnavailable, match="outcome is unknown"):
        send(impatient_bank)
    assert time.monotonic() - started < TIMEOUT_DELAY_S
    [paid] = server.transfers()  # the money moved; the client does not know it
    started = time.monotonic()
    # A replay is answered at once (by a patient client: a stall of this loaded machine must not
    # time it out; that it is not delayed like the first is the timing checked).
    assert send(bank).reference == paid.transfer_id
    assert time.monotonic() - started < TIMEOUT_DELAY_S
    assert server.money_movements(KEY) == 1
    assert server.paid_total("m-1", "USD") == 12_345


def test_a_closed_account_is_refused_for_good_and_records_nothing(server: SandboxBankServer, bank: HttpBank) -> None:
    server.reject_account("m-1")
    with pytest.raises(BankTransferRejected, match="account_closed") as raised:
        send(bank)
    assert raised.value.details == {"status_code": 422, "error_code": "account_closed"}
    assert server.transfers() == []
    assert server.money_movements(KEY) == 0
    send(bank, key="payout:0002", merchant_id="m-2")  # other merchants are still paid
    assert server.paid_total("m-2", "USD") == 12_345


def test_a_restarted_bank_still_knows_the_key(server: SandboxBankServer, bank: HttpBank) -> None:
    first = send(bank)
    url = server.url
    server.stop()
    with pytest.raises(BankUnavailable, match="ConnectError"):
        send(bank)
    assert server.start() == url
    assert send(bank) == first
    assert server.money_movements(KEY) == 1


def test_a_bank_that_is_down_answers_503_to_everything(server: SandboxBankServer, bank: HttpBank) -> None:
    server.set_down(True)
    with pytest.raises(BankUnavailable, match="503 unavailable"):
        send(bank)
    assert httpx.get(f"{server.url}/v1/transfers/{KEY}").status_code == 503
    assert server.requests(KEY) == 0
    server.set_down(False)
    send(bank)
    assert server.money_movements(KEY) == 1


@pytest.mark.parametrize(("change", "field"), [
    ({"merchant_id": ""}, "merchant_id"),
    ({"merchant_id": None}, "merchant_id"),
    ({"amount_minor": 0}, "amount_minor"),
    ({"amount_minor": -5}, "amount_minor"),
    ({"amount_minor": 1.5}, "amount_minor"),
    ({"amount_minor": True}, "amount_minor"),
    ({"amount_minor": "100"}, "amount_minor"),
    ({"currency": "usd"}, "currency"),
    ({"currency": "USDX"}, "currency"),
    ({"currency": 840}, "currency"),
    ({"description": None}, "description"),
    ({"description": "x" * 141}, "description"),
])
def test_a_malformed_transfer_is_answered_400_naming_the_field(
    server: SandboxBankServer, change: dict[str, Any], field: str,
) -> None:
    answer = post(server, {**TRANSFER, **change})
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_request"
    assert answer.json()["message"].startswith(f"{field} must be")
    assert server.transfers() == [] and server.requests(KEY) == 0


def test_a_request_without_a_usable_key_or_json_object_is_answered_400(server: SandboxBankServer) -> None:
    for key in (None, "", "k" * 256):
        answer = post(server, TRANSFER, key=key)
        assert (answer.status_code, answer.json()["error"]) == (400, "idempotency_key_required")
    for body in ([TRANSFER], "a transfer"):
        answer = post(server, body)
        assert (answer.status_code, answer.json()["error"]) == (400, "invalid_request")
    not_json = httpx.post(f"{server.url}/v1/transfers", content=b"{", headers={"Idempotency-Key": KEY})
    assert (not_json.status_code, not_json.json()["message"]) == (400, "the body is not JSON")
    assert server.transfers() == []


def test_the_client_takes_a_malformed_transfer_as_refused_for_good(server: SandboxBankServer, bank: HttpBank) -> None:
    with pytest.raises(BankTransferRejected, match="invalid_request: currency must be"):
        send(bank, currency="usd")
    assert server.transfers() == []


def test_a_wrong_bank_url_leaves_the_transfer_for_later(server: SandboxBankServer) -> None:
    with HttpBank(f"{server.url}/not-the-api") as misconfigured, \
            pytest.raises(BankUnavailable, match=r"404 not_found.*check the bank's URL"):
        send(misconfigured)
    assert server.transfers() == []


def test_the_controls_work_over_http(server: SandboxBankServer, bank: HttpBank) -> None:
    control = f"{server.url}/v1/sandbox"
    assert httpx.post(f"{control}/fail-next", json={"n": 1}).json()["fail_next"] == 1
    assert httpx.post(f"{control}/time-out-next", json={"n": 2}).json()["time_out_next"] == 2
    assert httpx.post(f"{control}/reject-account", json={"merchant_id": "m-9"}).json()["closed_accounts"] == ["m-9"]
    assert httpx.post(f"{control}/down", json={"down": True}).json()["down"] is True
    assert httpx.post(f"{control}/down", json={"down": False}).json()["down"] is False
    for path, body in (("fail-next", {"n": -1}), ("fail-next", {}), ("reject-account", {"merchant_id": 7})):
        refused = httpx.post(f"{control}/{path}", json=body)
        assert (refused.status_code, refused.json()["error"]) == (400, "invalid_request")
    with pytest.raises(BankUnavailable):
        send(bank)
    server.time_out_next(0)
    send(bank)
    assert httpx.get(f"{control}/counters").json() == {"requests": {KEY: 2}, "money_movements": {KEY: 1}}


def test_the_bank_runs_as_a_process_of_its_own() -> None:
    process = subprocess.Popen([sys.executable, "-m", "adapters.dev.bank_server", "--port", "0"],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        match = re.search(r"listening on (http://\S+)", process.stdout.readline())
        assert match, "the server prints its URL first"
        with HttpBank(match.group(1), timeout_s=5.0) as bank:
            assert send(bank) == send(bank)
        assert httpx.get(f"{match.group(1)}/v1/sandbox/counters").json()["money_movements"] == {KEY: 1}
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
