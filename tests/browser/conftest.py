"""Fixtures for driving the demo in Debian's Chromium through Playwright (sync API).

Chromium is Debian's (/usr/bin/chromium): Playwright's own browser download is not
used. Without it the tests skip, unless CI=true or MMOLOVE_REQUIRE_ALL_TESTS=1, where
a missing browser is a failure, not a silent skip.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from example_app.demo import DemoServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ADMIN_PASSWORD = "operator-password"
ROOT = Path(__file__).resolve().parents[2]
#: Set to a directory (or 1 for docs/screenshots) to save the README's screenshots.
SCREENSHOTS_ENV = "MMOLOVE_SCREENSHOTS"


def _required() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1") or os.environ.get(
        "MMOLOVE_REQUIRE_ALL_TESTS", ""
    ) not in ("", "0")


def _unavailable(reason: str) -> None:
    if _required():
        pytest.fail(f"{reason} (required: CI or MMOLOVE_REQUIRE_ALL_TESTS is set)")
    pytest.skip(reason)


# Module scope, not session: while Playwright's sync API is running, its event loop
# is the running loop of this thread, and later tests that call async code (Flask's
# async views through asgiref) would fail.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        _unavailable(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright is missing: pip install -e '.[test]'")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[DemoServer]:
    """``python -m example_app`` as a newcomer runs it: sandbox mounted, thread delivery."""
    server = DemoServer(
        port=0,
        instance_path=str(tmp_path / "instance"),
        admin_password=ADMIN_PASSWORD,
        environ={},
        quiet=True,
    ).start()
    try:
        yield server
    finally:
        server.stop()


def _page(browser: Browser, demo: DemoServer, *, javascript: bool) -> Iterator[Page]:
    context = browser.new_context(
        base_url=demo.url,
        java_script_enabled=javascript,
        viewport={"width": 1100, "height": 760},
    )
    context.set_default_timeout(10_000)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def page(browser: Browser, demo: DemoServer) -> Iterator[Page]:
    """A page with JavaScript off: the portal must work without it."""
    yield from _page(browser, demo, javascript=False)


@pytest.fixture
def js_page(browser: Browser, demo: DemoServer) -> Iterator[Page]:
    """A page with JavaScript on, for checks that read computed styles."""
    yield from _page(browser, demo, javascript=True)


@pytest.fixture
def shoot(page: Page) -> Callable[[str], None]:
    """Save a full-page screenshot named ``name`` when MMOLOVE_SCREENSHOTS is set."""
    setting = os.environ.get(SCREENSHOTS_ENV, "")

    def take(name: str) -> None:
        if setting in ("", "0"):
            return
        folder = ROOT / "docs" / "screenshots" if setting == "1" else Path(setting)
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / f"{name}.png"), full_page=True)

    return take
