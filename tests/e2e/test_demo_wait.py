"""`echotransact demo` waits for the state each step needs, not for a while: against a small
local HTTP server whose answers it cannot predict."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from api.demo import DemoError, wait_for_state


@pytest.fixture
def statuses() -> Iterator[tuple[str, list[str]]]:
    """A server answering GET /s with {"status": <next of the list>}; the last one repeats."""
    answers: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = answers.pop(0) if len(answers) > 1 else answers[0]
            body = json.dumps({"status": status, "payment_id": "p-1" if status == "completed" else None}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answers
    finally:
        server.shutdown()
        server.server_close()


def _wait(url: str, timeout_s: float = 10.0) -> dict[str, object]:
    with httpx.Client(base_url=url) as client:
        return wait_for_state(
            "the session to show its payment", lambda: client.get("/s"),
            lambda body: body.get("status") == "completed", seen=lambda body: body.get("status"),
            hint="is the worker running?", dead_ends=frozenset({"failed"}), timeout_s=timeout_s, every_s=0.01,
        )


def test_waits_through_earlier_states_until_the_one_it_needs(statuses: tuple[str, list[str]]) -> None:
    url, answers = statuses
    answers[:] = ["link_sent", "link_sent", "code_verified", "payment_method_attached", "completed"]
    assert _wait(url) == {"status": "completed", "payment_id": "p-1"}


def test_a_state_never_reached_ends_with_the_step_and_the_state_seen(statuses: tuple[str, list[str]]) -> None:
    url, answers = statuses
    answers[:] = ["link_sent"]
    with pytest.raises(DemoError, match=r"for the session to show its payment; the last state seen was link_sent"):
        _wait(url, timeout_s=0.2)


def test_a_dead_end_ends_the_wait_at_once(statuses: tuple[str, list[str]]) -> None:
    url, answers = statuses
    answers[:] = ["link_sent", "failed"]
    with pytest.raises(DemoError, match="will not happen: it is failed"):
        _wait(url, timeout_s=60)


def test_each_demo_run_pays_with_a_card_of_its_own_that_the_sandbox_approves() -> None:
    from adapters.postgres.vault import luhn_valid
    from api.demo import fresh_test_card

    cards = {fresh_test_card() for _ in range(50)}
    assert len(cards) == 50 and all(luhn_valid(c) and c.startswith("4") and c.endswith("4242") for c in cards)
    assert luhn_valid("4242424242424242") and not luhn_valid("4242424242424241")
