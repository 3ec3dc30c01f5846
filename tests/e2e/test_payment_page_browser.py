"""The payment page in headless Chromium (Debian's /usr/bin/chromium, driven by the PyPI playwright
package, no browser download) against the page served by uvicorn on real PostgreSQL and Redis,
on a phone-sized viewport: the issue's six journeys and a new code by SMS, with no console errors
(a CSP violation is one).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.dev.servers import ServerURLs
from api.settings import Settings
from tests.api.test_payment_page import (
    VISA_DECLINED,
    PageSystem,
    make_page_system,
    page_settings,
    texted_new_codes,
    wrong,
)

CHROMIUM = Path(os.environ.get("ECHOTRANSACT_CHROMIUM", "/usr/bin/chromium"))
if not CHROMIUM.exists():
    pytest.skip(f"browser tests need Chromium at {CHROMIUM}: apt-get install -y chromium "
                "(or set ECHOTRANSACT_CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="browser tests need the playwright package: pip install playwright"
)
# The page's own timeout (15 s, set per page) does not reach expect(), which keeps 5 s by default.
sync_api.expect.set_options(timeout=15_000)

LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
               "--disable-component-update", "--disable-sync"]
PHONE = {"width": 390, "height": 844}
# Chromium reports every 4xx document (an expired link is a 410) as a console error; those are expected.
ERROR_STATUS = "Failed to load resource: the server responded with a status of 4"
SCREENSHOT_DIR_ENV = "ECHOTRANSACT_SCREENSHOT_DIR"


@pytest.fixture
def settings() -> Settings:
    return page_settings()


@pytest.fixture
def system(settings: Settings, database_url: str, servers: ServerURLs, clock: ManualClock,
           processor: SandboxProcessor) -> Iterator[PageSystem]:
    """The page served by uvicorn on loopback, as in tests/api/test_payment_page.py."""
    yield from make_page_system(settings, database_url, servers, clock, processor)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def phone(browser: Any, system: PageSystem) -> Iterator[Any]:
    """A phone-sized page; fails the test on any console error or uncaught page error."""
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True, base_url=system.url,
                                  locale="en-US")
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text)
            if message.type == "error" and not message.text.startswith(ERROR_STATUS) else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    yield page
    context.close()
    assert problems == [], f"console errors (a CSP violation shows here): {problems}"


def enter_code(page: Any, code: str) -> None:
    page.get_by_label("6-digit code").fill(code)
    page.get_by_label("6-digit code").press("Enter")  # keyboard submit
    page.wait_for_load_state()


def enter_card(page: Any, number: str, expiry: str = "12/34", cvv: str = "123") -> None:
    page.get_by_label("Card number").fill(number)
    page.get_by_label("Expiry (MM/YY)").fill(expiry)
    page.get_by_label("Security code").fill(cvv)


def pay_button(page: Any) -> Any:
    return page.get_by_role("button", name="Pay ")


def assert_fits_a_phone(page: Any) -> None:
    """No sideways scrolling, every input labelled, every button at least 44 px tall."""
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert page.evaluate(
        "[...document.querySelectorAll('input:not([type=hidden])')].every(i => i.labels.length > 0)")
    for box in (b.bounding_box() for b in page.locator("button, a.button").all()):
        assert box is not None and box["height"] >= 44


def heading(page: Any, text: str) -> None:
    sync_api.expect(page.get_by_role("heading", name=text)).to_be_visible()


def test_happy_path(phone: Any, system: PageSystem, tmp_path: Path) -> None:
    _, token, code = system.link()
    response = phone.goto(f"/pay/{token}")
    assert response.headers["cache-control"] == "no-store"
    heading(phone, "Pay Luigi's Pizza")
    sync_api.expect(phone.locator(".total")).to_contain_text("25.00 USD")
    sync_api.expect(phone.locator(".items")).to_contain_text("Large pizza")
    assert_fits_a_phone(phone)
    shot = tmp_path / "payment-summary-390x844.png"
    phone.screenshot(path=str(shot), full_page=True)
    if target := os.environ.get(SCREENSHOT_DIR_ENV):
        shutil.copy(shot, Path(target) / shot.name)
    enter_code(phone, code)
    heading(phone, "Pay by card")
    assert_fits_a_phone(phone)
    enter_card(phone, "4242 4242 4242 4242")
    pay_button(phone).click()
    heading(phone, "Payment complete")
    sync_api.expect(phone.get_by_role("status")).to_contain_text("Visa ending in 4242")
    assert len({key for op, key in system.processor.calls if op == "authorize"}) == 1


def test_wrong_code_five_times_locks(phone: Any, system: PageSystem) -> None:
    session_id, token, code = system.link()
    phone.goto(f"/pay/{token}")
    for left in ("4 tries", "3 tries", "2 tries", "1 try"):
        enter_code(phone, wrong(code))
        message = f"That code is not right. You have {left} left."
        sync_api.expect(phone.locator(".error")).to_have_text(message)
        sync_api.expect(phone.get_by_label("6-digit code")).to_have_attribute("aria-invalid", "true")
    enter_code(phone, wrong(code))
    heading(phone, "This payment is locked")
    sync_api.expect(phone.get_by_role("alert")).to_contain_text("You have not been charged")
    assert system.status(session_id) == "locked"


def test_expired_link(phone: Any, system: PageSystem) -> None:
    _, token, _ = system.link()
    phone.goto(f"/pay/{token}")
    heading(phone, "Pay Luigi's Pizza")
    system.clock.advance(timedelta(minutes=16))
    response = phone.reload()
    assert response.status == 410
    heading(phone, "This payment link has expired")
    sync_api.expect(phone.locator("main")).to_contain_text("you have not been charged")


def test_a_new_code_by_sms(phone: Any, system: PageSystem) -> None:
    session_id, token, _ = system.link()
    phone.goto(f"/pay/{token}")
    sync_api.expect(phone.locator("main")).to_contain_text("Didn't get it?")
    phone.get_by_role("button", name="Send a new code").click()
    sync_api.expect(phone.get_by_role("status")).to_contain_text("We sent a new code to +1 ••• ••• 0123.")
    sync_api.expect(phone.get_by_role("status")).to_contain_text("You can ask for 2 more new codes.")
    assert_fits_a_phone(phone)
    (new_code,) = texted_new_codes(system)
    enter_code(phone, new_code)
    heading(phone, "Pay by card")
    assert system.status(session_id) == "code_verified"


def test_identity_path_above_the_threshold(phone: Any, system: PageSystem) -> None:
    session_id, token, code = system.link(amount_minor=15_000)
    phone.goto(f"/pay/{token}")
    sync_api.expect(phone.locator(".total")).to_contain_text("150.00 USD")
    enter_code(phone, code)
    heading(phone, "Confirm it is you")
    assert_fits_a_phone(phone)
    phone.get_by_label("Date of birth").fill("1970-01-01")
    phone.get_by_label("Postal code").fill("94103")
    phone.get_by_role("button", name="Continue").click()
    sync_api.expect(phone.get_by_role("alert")).to_contain_text("We could not confirm your identity")
    phone.get_by_label("Date of birth").fill("1990-01-01")
    phone.get_by_role("button", name="Continue").click()
    heading(phone, "Pay by card")
    enter_card(phone, "5555 5555 5555 4444")
    pay_button(phone).click()
    heading(phone, "Payment complete")
    sync_api.expect(phone.locator("main")).to_contain_text("Mastercard ending in 4444")
    assert system.status(session_id) == "completed"


def test_declined_card_then_another(phone: Any, system: PageSystem) -> None:
    _, token, code = system.link()
    phone.goto(f"/pay/{token}")
    enter_code(phone, code)
    enter_card(phone, VISA_DECLINED)
    pay_button(phone).click()
    alert = phone.get_by_role("alert")
    sync_api.expect(alert).to_contain_text("Your bank declined the card: not enough funds.")
    sync_api.expect(phone.get_by_label("Card number")).to_have_value("")  # never echoed back
    enter_card(phone, "4242424242424242")
    pay_button(phone).click()
    heading(phone, "Payment complete")


def test_double_submit_of_the_card_form_charges_once(
    phone: Any, system: PageSystem, monkeypatch: pytest.MonkeyPatch,
) -> None:
    session_id, token, code = system.link()
    phone.goto(f"/pay/{token}")
    enter_code(phone, code)
    enter_card(phone, "4242424242424242")
    # A bank that takes a moment, so the second tap lands while the first is still on its way.
    authorize = system.processor.authorize

    def slow_authorize(**kwargs: Any) -> Any:
        time.sleep(2.5)  # the second click must come while the first POST waits
        return authorize(**kwargs)

    monkeypatch.setattr(system.processor, "authorize", slow_authorize)
    posts: list[str] = []
    phone.on("request", lambda r: posts.append(r.url)
             if r.method == "POST" and r.url.endswith("/card") else None)
    box = pay_button(phone).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    phone.mouse.click(x, y)  # raw input: a locator click would wait for the first navigation
    phone.wait_for_timeout(200)
    phone.mouse.click(x, y)
    heading(phone, "Payment complete")
    assert len(posts) == 2, posts  # the browser really sent the form twice
    payment_id = system.services.ledger.get_session(session_id).payment_id
    assert system.authorize_keys() == [f"authorize:{payment_id}"]  # one call to the processor
    with psycopg.connect(system.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM card_vault").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM ledger_events WHERE topic LIKE %s",
                            ("%Payment.Initiated",)).fetchone() == (1,)
