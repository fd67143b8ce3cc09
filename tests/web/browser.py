"""Headless Chromium (Debian's chromium + chromium-driver) driven by selenium.

Selenium's calls block, and the gateway under test runs on the test's event loop: every
browser step runs in a worker thread (``Browser.run``) so the gateway keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
# Test artifacts, out of the tree's tracked files; TRIALSTREAM_SCREENSHOTS=docs/screenshots
# refreshes the copies the README and docs show.
SCREENSHOTS = Path(
    os.environ.get("TRIALSTREAM_SCREENSHOTS")
    or Path(__file__).resolve().parents[2] / ".trialstream" / "test-artifacts" / "screenshots"
)
WAIT_S = 30.0

T = TypeVar("T")


class Browser:
    def __init__(self, driver: webdriver.Chrome, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url

    async def run(self, step: Callable[[webdriver.Chrome], T]) -> T:
        return await asyncio.to_thread(step, self.driver)

    async def get(self, path: str) -> None:
        await self.run(lambda d: d.get(self.base_url + path))

    async def wait_for(self, what: str, check: Callable[[webdriver.Chrome], T]) -> T:
        def step(d: webdriver.Chrome) -> T:
            # The pages re-render what they show: an element read while being replaced is
            # simply looked up again at the next poll.
            return WebDriverWait(
                d, WAIT_S, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
            ).until(check, message=f"not within {WAIT_S:.0f} s: {what}")

        return await self.run(step)

    async def css(self, selector: str) -> WebElement:
        return await self.wait_for(
            f"an element {selector}",
            lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, selector)), None),
        )

    async def sign_in(self, path: str, username: str, password: str) -> None:
        """Open ``path``, get sent to the sign-in page, sign in, and land on ``path``."""
        await self.get(path)
        await self.wait_for("the sign-in page", lambda d: "/login" in d.current_url)

        def fill(d: webdriver.Chrome) -> None:
            d.find_element(By.ID, "username").send_keys(username)
            d.find_element(By.ID, "password").send_keys(password)
            d.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()

        await self.run(fill)
        await self.wait_for(f"back on {path}", lambda d: d.current_url == self.base_url + path)

    async def screenshot(self, name: str) -> Path:
        await asyncio.to_thread(SCREENSHOTS.mkdir, parents=True, exist_ok=True)
        path = SCREENSHOTS / name
        await self.run(lambda d: d.execute_script("window.scrollTo(0, 0)"))
        ok = await self.run(lambda d: d.save_screenshot(str(path)))
        assert ok, f"screenshot {name} not saved"
        return path


@pytest.fixture
async def chromium() -> AsyncIterator[webdriver.Chrome]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(
            f"headless Chromium is needed for the page tests: {missing} missing. Run: {INSTALL}"
        )
    profile = tempfile.mkdtemp(prefix="trialstream-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = await asyncio.to_thread(
        webdriver.Chrome, options=options, service=Service(executable_path=CHROMEDRIVER)
    )
    try:
        yield driver
    finally:
        await asyncio.to_thread(driver.quit)
        shutil.rmtree(profile, ignore_errors=True)
