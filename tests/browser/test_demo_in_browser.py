"""The demo's referral journey and operator retry, clicked through in Chromium.

Everything goes through the real pages of a demo served on 127.0.0.1, with the
sandbox mounted under /_mmolove/ as ``python -m example_app`` runs it. JavaScript is
off in these pages: the portal is plain forms and links.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from example_app.demo import DemoServer

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

PASSWORD = "correct horse battery"


def expect(target: Any) -> Any:
    # Imported late, so that a machine without Playwright gets the fixture's skip
    # message rather than a collection error.
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def reload_until(page: Page, url: str, ready: Callable[[], bool], what: str) -> None:
    """Open ``url`` again and again until ``ready()``: these pages do not refresh."""
    deadline = time.monotonic() + 15
    while True:
        page.goto(url)
        if ready():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{url} never showed {what}")
        page.wait_for_timeout(150)


def nav(page: Page) -> Locator:
    return page.get_by_role("navigation", name="Main")


def register(page: Page, name: str) -> None:
    page.get_by_label("Player name").fill(name)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Repeat the password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page).to_have_url(re.compile(r"/play$"))
    expect(page.get_by_role("status")).to_contain_text(f"Welcome to Emberfall, {name}!")


def log_in(page: Page, name: str, password: str = PASSWORD) -> None:
    page.get_by_label("Player name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def log_out(page: Page, name: str) -> None:
    page.get_by_role("button", name=f"Log out {name}").click()
    expect(page.get_by_role("status")).to_contain_text("You are logged out.")


def delivery_rows(page: Page, event: str, status: str) -> Locator:
    """Rows of the sandbox log for ``event`` answered with ``status``."""
    return (
        page.locator("tbody tr")
        .filter(has=page.locator("td:nth-child(3)", has_text=re.compile(f"^{event}$")))
        .filter(has=page.locator("td:nth-child(6)", has_text=re.compile(rf"^\s*{status}\s*$")))
    )


def test_a_referral_from_share_link_to_reward(
    page: Page, demo: DemoServer, shoot: Callable[[str], None]
) -> None:
    # Ayla plays already; she copies her share link from Rewards.
    page.goto("/")
    expect(page.get_by_role("heading", name="Try a referral")).to_be_visible()
    shoot("home")
    page.get_by_role("link", name="Create an account").first.click()
    expect(page.get_by_text("You were invited by a friend")).to_have_count(0)
    register(page, "ayla")
    nav(page).get_by_role("link", name="Rewards").click()
    share_link = page.get_by_label("Your share link").input_value()
    assert share_link.startswith(f"{demo.url}/_mmolove/r/emberfall-demo?ref=")
    log_out(page, "ayla")

    # Bram follows it: MMOLove (the sandbox) sends him to /register with a token.
    page.goto(share_link)
    expect(page).to_have_url(re.compile(r"/register\?mmref=[^&]+$"))
    expect(page.get_by_text("You were invited by a friend")).to_be_visible()
    shoot("register-invited")
    register(page, "bram")

    log = f"{demo.url}/_mmolove/log"
    reload_until(
        page, log, lambda: delivery_rows(page, "registered", "200").count() == 1, "registered"
    )

    # Bram plays to the milestone, level 3: four quests of 50 XP.
    page.goto("/play")
    quest = page.get_by_role("button", name=re.compile("Complete a quest"))
    for level in ("1", "2", "2", "3"):
        quest.click()
        expect(page.locator("#level")).to_have_text(level)
        if level == "2":
            assert delivery_count(demo, "qualified") == 0
    expect(page.get_by_role("status")).to_contain_text("You reached the milestone")
    expect(page.get_by_text("You reached the milestone (level 3)")).to_be_visible()
    shoot("play")
    reload_until(
        page, log, lambda: delivery_rows(page, "qualified", "200").count() == 1, "qualified"
    )
    expect(delivery_rows(page, "registered", "200")).to_have_count(1)
    shoot("sandbox-log")

    # Ayla's reward, granted once.
    page.goto("/")
    log_out(page, "bram")
    nav(page).get_by_role("link", name="Log in").click()
    log_in(page, "ayla")
    reload_until(
        page,
        f"{demo.url}/rewards",
        lambda: page.locator("tbody tr").count() > 0,
        "the reward",
    )
    expect(page.locator("tbody tr")).to_have_count(1)
    expect(page.locator("tbody tr")).to_contain_text("bram")
    expect(page.locator("tbody tr")).to_contain_text("500 gold")
    expect(page.locator("#gold")).to_have_text("500")
    shoot("rewards")

    # More quests past the milestone send nothing more and grant nothing more.
    log_out(page, "ayla")
    nav(page).get_by_role("link", name="Log in").click()
    log_in(page, "bram")
    page.get_by_role("button", name=re.compile("Complete a quest")).click()
    expect(page.locator("#level")).to_have_text("3")
    time.sleep(0.5)
    assert delivery_count(demo, "qualified") == 1


def delivery_count(demo: DemoServer, event: str) -> int:
    return demo.sandbox_state.accepted_count(event)


def test_the_operator_retries_a_dead_letter(
    page: Page, demo: DemoServer, shoot: Callable[[str], None]
) -> None:
    # A fault scripted through the sandbox's HTTP API: the next event gets a 400,
    # which MMOLove means as "do not retry": the event is dead-lettered.
    scripted = page.request.post(
        f"{demo.url}/_mmolove/_faults",
        data={"kind": "status", "status": 400, "body": {"error": "scripted by the browser test"}},
    )
    assert scripted.ok

    page.goto(f"{demo.url}/_mmolove/r/emberfall-demo?ref={demo.admin_code}")
    register(page, "bram")
    log_out(page, "bram")

    # The operator view sends the anonymous to the login page, and back.
    page.goto("/mmolove/?state=dead")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    log_in(page, "admin", demo.admin_password)
    expect(page).to_have_url(re.compile(r"/mmolove/\?state=dead$"))
    reload_until(
        page,
        f"{demo.url}/mmolove/?state=dead",
        lambda: page.locator("tr.state-dead").count() == 1,
        "the dead letter",
    )
    dead = page.locator("tr.state-dead")
    expect(dead).to_contain_text("registered")
    expect(dead).to_contain_text("400")
    expect(dead).to_contain_text("scripted by the browser test")
    expect(dead.locator("td:nth-child(5)")).to_have_text("1")
    shoot("operator-dead-letter")

    dead.get_by_role("button", name=re.compile(r"Retry event \d+")).click()
    expect(page.get_by_role("status")).to_contain_text("is queued to be sent again")
    reload_until(
        page,
        f"{demo.url}/mmolove/?state=delivered",
        lambda: page.locator("tr.state-delivered").count() == 1,
        "the retried event delivered",
    )
    expect(page.get_by_role("link", name=re.compile("Dead letters"))).to_contain_text("0")
    shoot("operator-delivered")

    page.goto(f"{demo.url}/_mmolove/log")
    expect(delivery_rows(page, "registered", "400")).to_have_count(1)
    expect(delivery_rows(page, "registered", "200")).to_have_count(1)
    content = page.content()
    assert "emberfall-local-sandbox-secret" not in content


def test_the_operator_view_is_closed_to_players(page: Page, demo: DemoServer) -> None:
    page.goto("/register")
    register(page, "ayla")
    expect(page.get_by_role("link", name="Deliveries")).to_have_count(0)
    response = page.goto("/mmolove/")
    assert response is not None
    assert response.status == 403
    expect(page.get_by_role("heading", name="Forbidden")).to_be_visible()


def test_forms_are_labelled_and_focus_is_visible(js_page: Page) -> None:
    page = js_page
    page.goto("/register")
    for name in ("Player name", "Password", "Repeat the password"):
        expect(page.get_by_label(name, exact=True)).to_be_visible()
    page.get_by_role("button", name="Create account").click()
    field = page.get_by_label("Player name")
    expect(field).to_have_attribute("aria-invalid", "true")
    expect(field).to_have_attribute("aria-describedby", "username-hint username-error")
    page.keyboard.press("Tab")
    focused = page.evaluate("document.activeElement.textContent")
    assert focused == "Skip to content"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none")
