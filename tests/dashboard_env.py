"""The dashboard's test helpers: a browser (Debian's chromium driven by Playwright), signing in, local
time strings for the page's date inputs, and where screenshots go."""

from __future__ import annotations

import datetime
from pathlib import Path

from playwright.sync_api import Browser, Page

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def launch_chromium(playwright: object) -> Browser:
    """Debian's chromium (never Playwright's download), headless, as root (no sandbox)."""
    if not Path(CHROMIUM).exists():
        raise AssertionError(f"{CHROMIUM} is missing: run `bash scripts/dev.sh setup` (installs chromium)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # type: ignore[attr-defined]


def sign_in(browser: Browser, url: str, token: str, route: str = "#/vms") -> Page:
    """A fresh page (its own session storage) signed in with ``token`` at ``route``."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(f"{url}/{route}")
    page.fill("#token", token)
    page.click("#sign-in-button")
    return page


def local_input(seconds: float) -> str:
    """A ``datetime-local`` input value (local time, whole seconds) for Unix time ``seconds``."""
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%dT%H:%M:%S")


def screenshot(page: Page, name: str) -> Path:
    """Save a screenshot as ``tests/artifacts/NAME.png`` (ignored by git) for a person to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path
