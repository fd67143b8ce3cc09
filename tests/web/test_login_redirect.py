"""After signing in, the sign-in page goes to its ``next`` address only when that stays on
the gateway: addresses a browser resolves to another host are replaced by ``/`` (headless
Chromium, as the pages are used)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from tests.web.browser import Browser
from tests.web.conftest import PASSWORD, Web

pytestmark = pytest.mark.slow


@pytest.fixture
async def browser(web: Web, chromium: webdriver.Chrome) -> Browser:
    return Browser(chromium, web.url)


async def sign_in_with_next(browser: Browser, nxt: str) -> str:
    """Sign in from ``/login?next=<nxt>``; the address the browser goes to then."""
    await browser.get(f"/login?next={quote(nxt, safe='')}")

    def fill(d: webdriver.Chrome) -> None:
        d.find_element(By.ID, "username").send_keys("monitor")
        d.find_element(By.ID, "password").send_keys(PASSWORD)
        d.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()

    await browser.run(fill)
    return await browser.wait_for(
        "leaving the sign-in page", lambda d: "/login" not in d.current_url and d.current_url
    )


@pytest.mark.parametrize(
    "nxt",
    ["/\\evil.example", "//evil.example", "/\t/evil.example", "https://evil.example/", "evil"],
    ids=["backslash", "protocol-relative", "tab", "absolute", "relative"],
)
async def test_a_next_address_off_the_gateway_goes_home(browser: Browser, nxt: str) -> None:
    landed = await sign_in_with_next(browser, nxt)
    assert landed.startswith(browser.base_url + "/"), landed
    assert "evil" not in landed


async def test_a_next_path_on_the_gateway_is_kept(browser: Browser) -> None:
    assert await sign_in_with_next(browser, "/monitor?x=1") == browser.base_url + "/monitor?x=1"
