"""Signing in and out in headless Chromium, as the pages are used: after signing in, the
sign-in page goes to its ``next`` address only when that stays on the gateway; signing out
works from every page, the "not available" page included."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from storage import db
from tests.web.browser import Browser
from tests.web.conftest import PASSWORD, Web

pytestmark = pytest.mark.slow


async def sign_in_with_next(browser: Browser, nxt: str, username: str = "monitor") -> str:
    """Sign in from ``/login?next=<nxt>``; the address the browser goes to then."""
    await browser.get(f"/login?next={quote(nxt, safe='')}")

    def fill(d: webdriver.Chrome) -> None:
        d.find_element(By.ID, "username").send_keys(username)
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


async def test_sign_out_from_the_not_available_page_ends_the_session(
    web: Web, browser: Browser
) -> None:
    """That page runs no script of its own, so the sign-out button had no CSRF token: the
    gateway refused the sign-out, and the page went to the sign-in page all the same,
    leaving the session open."""
    await sign_in_with_next(browser, "/monitor", "participant")
    await browser.wait_for("the refusal", lambda d: "Not available" in d.title)
    await browser.run(lambda d: d.find_element(By.ID, "sign-out").click())
    await browser.wait_for("the sign-in page", lambda d: "/login" in d.current_url)
    async with db.connection(web.trial.url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM web_sessions s JOIN users u USING (user_id)"
            " WHERE u.username = 'participant' AND s.ended_at IS NULL"
        )
        assert await cur.fetchone() == (0,)


async def test_a_participant_withdraws_on_their_page_signing_with_their_password(
    web: Web, browser: Browser
) -> None:
    await sign_in_with_next(browser, "/participants/P1", "participant")
    await browser.wait_for("the withdrawal", lambda d: d.find_elements(By.ID, "withdraw-details"))

    def withdraw(password: str):  # type: ignore[no-untyped-def]
        def step(d: webdriver.Chrome) -> None:
            d.find_element(By.CSS_SELECTOR, "#withdraw-details summary").click()
            box = d.find_element(By.ID, "withdraw-password")
            box.clear()
            box.send_keys(password)
            d.find_element(By.CSS_SELECTOR, "#withdraw button[type=submit]").click()

        return step

    await browser.run(withdraw("not my password"))
    await browser.wait_for(
        "the refusal", lambda d: "Not withdrawn" in d.find_element(By.ID, "withdraw-error").text
    )
    await browser.run(lambda d: d.find_element(By.ID, "withdraw-password").send_keys(PASSWORD))
    await browser.run(lambda d: d.find_element(By.CSS_SELECTOR, "#withdraw button").click())
    await browser.wait_for(
        "the confirmation",
        lambda d: "Consent withdrawn" in d.find_element(By.ID, "signed-message").text,
    )
    assert not await browser.run(lambda d: d.find_elements(By.ID, "withdraw-details"))
    async with db.connection(web.trial.url) as conn:
        cur = await conn.execute(
            "SELECT c.action, c.meaning FROM consents c WHERE c.action <> 'consent'"
        )
        assert await cur.fetchall() == [("withdraw", "withdrawal of consent, by the participant")]
