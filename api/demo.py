"""``echotransact demo``: one complete voice payment against the running system, driven as a
voice platform and a customer would, then the timeline from the read side.

The voice platform opens a session over the API; the customer reads the SMS (the development
mailbox), opens the payment page, enters the code and pays with a test card; the merchant
captures; the read side shows what happened.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from adapters.notifications.sms import dev_inbox
from adapters.postgres.vault import luhn_valid

HIDDEN = re.compile(r'<input[^>]*name="(csrf|form_id)"[^>]*value="([^"]*)"|'
                    r'<input[^>]*value="([^"]*)"[^>]*name="(csrf|form_id)"')


class DemoError(Exception):
    pass


def _hidden_fields(html: str) -> dict[str, str]:
    fields = {}
    for a_name, a_value, b_value, b_name in HIDDEN.findall(html):
        fields[a_name or b_name] = a_value or b_value
    if set(fields) != {"csrf", "form_id"}:
        raise DemoError("the payment page's form did not carry its csrf and form_id fields")
    return fields


def wait_for_state(
    what: str, fetch: Callable[[], httpx.Response], reached: Callable[[dict[str, Any]], bool], *,
    seen: Callable[[dict[str, Any]], Any], hint: str, dead_ends: frozenset[str] = frozenset(),
    timeout_s: float = 30.0, every_s: float = 0.1,
) -> dict[str, Any]:
    """Poll until the read side shows the state a step needs; a DemoError naming the step, the
    state waited for and the last one seen when ``timeout_s`` passes, or at once on a state from
    which the wanted one cannot follow (``dead_ends``)."""
    deadline = time.monotonic() + timeout_s
    last: Any = "nothing (no answer yet)"
    while True:
        response = fetch()
        if response.status_code == 200:
            body = response.json()
            if reached(body):
                return body
            last = seen(body)
            if last in dead_ends:
                raise DemoError(f"{what} will not happen: it is {last}")
        else:
            last = f"HTTP {response.status_code}"
        if time.monotonic() > deadline:
            raise DemoError(f"waited {timeout_s:g} s for {what}; the last state seen was {last} ({hint})")
        time.sleep(every_s)


def fresh_test_card(last4: str = "4242", rng: random.Random | None = None) -> str:
    """A Luhn-valid Visa test number ending in ``last4``, different on each call."""
    rng = rng or random.Random()
    while True:
        number = "4" + "".join(rng.choice("0123456789") for _ in range(11)) + last4
        if luhn_valid(number):
            return number


def run_demo(api_url: str, database_url: str, merchant_key: str, say: Callable[[str], None]) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    api = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {merchant_key}"}, timeout=30)
    page = httpx.Client(base_url=api_url, timeout=30, follow_redirects=True)
    phone = "+1415555" + f"{int(run, 16) % 10_000:04d}"

    say("voice platform: the customer ordered two pizzas; opening a payment session")
    created = api.post("/v1/payment-sessions", headers={"Idempotency-Key": f"demo-{run}"}, json={
        "amount": 3_150, "currency": "USD", "customer_phone": phone,
        "order": {"reference": f"DEMO-{run}", "items": [
            {"sku": "PZ-L", "name": "Large margherita", "quantity": 1, "unit_amount": 1_900},
            {"sku": "PZ-S", "name": "Small pepperoni", "quantity": 1, "unit_amount": 1_250}]},
        "voice": {"platform": "demo-assistant", "conversation_id": f"call-{run}"}})
    if created.status_code != 201:
        raise DemoError(f"opening the session failed: {created.status_code} {created.text}")
    session = created.json()
    say(f"  session {session['id']}: {session['status']}")

    say("customer: waiting for the text message")
    deadline = time.monotonic() + 30
    while not (messages := dev_inbox(database_url, to=phone)):
        if time.monotonic() > deadline:
            raise DemoError("no SMS arrived within 30 s (is `echotransact dispatch` running?)")
        time.sleep(0.5)
    found = re.search(r"(/pay/\S+) - your code is (\d{6})", messages[0]["body"])
    if not found:
        raise DemoError("the SMS did not hold a link and a code")
    link, code = found.groups()
    say(f"  SMS: {messages[0]['body']}")

    say("customer: opening the link and entering the code")
    summary = page.get(link)
    summary.raise_for_status()
    card_page = page.post(f"{link}/code", data={"code": code, **_hidden_fields(summary.text)})
    if "card_number" not in card_page.text:
        raise DemoError(f"the code was not accepted ({card_page.status_code})")

    # A card of its own per run, ending in 4242 (the sandbox approves it): the risk rules allow
    # a card only a few payments in ten minutes, and the demo may be run again and again.
    card = fresh_test_card()
    say(f"customer: paying with the test card {card[:4]} ... {card[-4:]}")
    expiry = f"12/{(time.gmtime().tm_year + 3) % 100:02d}"
    done = page.post(f"{link}/card", data={"card_number": card, "expiry": expiry, "cvv": "123",
                                           **_hidden_fields(card_page.text)})
    if done.status_code != 200:
        raise DemoError(f"the payment did not go through ({done.status_code})")

    status = wait_for_state(
        "the session to show its payment",
        lambda: api.get(f"/v1/payment-sessions/{session['id']}"),
        lambda body: body.get("status") == "completed" and bool(body.get("payment_id")),
        seen=lambda body: body.get("status"),
        hint="is `echotransact worker` running?",
        dead_ends=frozenset({"failed", "cancelled", "expired", "locked"}),
    )
    say(f"voice platform: session is {status['status']}")
    payment_id = status["payment_id"]

    say("merchant: capturing the payment")
    captured = api.post(f"/v1/payments/{payment_id}/capture", headers={"Idempotency-Key": f"demo-cap-{run}"})
    if captured.status_code != 200:
        raise DemoError(f"capture failed: {captured.status_code} {captured.text}")

    say("read side: the payment's timeline")
    payment = wait_for_state(
        "the payment to show its capture",
        lambda: api.get(f"/v1/payments/{payment_id}"),
        lambda body: body.get("status") == "captured",
        seen=lambda body: body.get("status"),
        hint="is `echotransact worker` running?",
    )
    for entry in payment["timeline"]:
        say(f"  v{entry['version']}  {entry['occurred_at']}  {entry['event_type']}")
    say(f"captured {payment['captured_amount']} {payment['currency']} minor units, fee {payment['fee']}")
    return payment
