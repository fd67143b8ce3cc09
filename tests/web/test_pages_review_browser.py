"""Review sign-offs on the participant page, in headless Chromium against the real gateway and
database (docs/review.md): a monitor, in Berlin, signs off a day of P1's data from the page; a
wrong password is refused with the API's words and stores nothing but the failed attempt;
the right one stores the sign-off (the API lists it, the audit trail has it); data stored
later for the day shows it OUTDATED, in words. A site coordinator sees the list and the
study's locks in force, but no form. The roles the page offers the form to are the API's.

A screenshot of the card goes to docs/screenshots/ for docs/review.md."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool
from selenium import webdriver
from selenium.webdriver.common.by import By

from gateway.web import api_review
from storage import review
from storage.migrate import StorageMode
from tests.alerts.test_engine import rows
from tests.fixtures.waiting import value_when
from tests.storage.test_review_lock import DAY, lock_day, store
from tests.web.browser import SCREENSHOTS, Browser
from tests.web.conftest import PASSWORD, Web

PARTICIPANT_JS = (
    Path(__file__).resolve().parents[2] / "gateway" / "web" / "static" / "participant.js"
)
PAGE = "/participants/P1"
REVIEWS = "/api/v1/participants/P1/reviews"
MEANING = "Reviewed, no concerns"
# What a signer typed is shown as text, never run as markup.
EVIL = '<img src="x" onerror="window.__pwned = 1">Reviewed <b>ok</b>'


def test_the_page_offers_the_sign_off_to_the_roles_the_api_accepts() -> None:
    source = PARTICIPANT_JS.read_text()
    signers = re.search(r"const REVIEW_SIGNERS = (\[.*?\]);", source)
    assert signers is not None
    assert sorted(re.findall(r'"(\w+)"', signers.group(1))) == sorted(
        r.value for r in api_review.SIGNERS
    )
    limit = re.search(r"const REVIEW_MEANING_MAX = (\d+);", source)
    assert limit is not None
    assert int(limit.group(1)) == review.MAX_MEANING


async def card(browser: Browser) -> dict[str, Any]:
    got: dict[str, Any] = await browser.run(
        lambda d: d.execute_script(
            """
            const card = document.getElementById('review-signoffs');
            if (!card || !card.querySelector('.reviews-body table, .reviews-body p.empty'))
              return null;
            return {
              rows: [...card.querySelectorAll('tr.review')].map((r) => ({
                state: r.dataset.state,
                cells: [...r.querySelectorAll('td')].map((c) => c.textContent),
              })),
              form: Boolean(card.querySelector('form#review-sign')),
              locks: (card.querySelector('#study-locks') || {}).textContent || null,
              error: (card.querySelector('#review-error') || {}).textContent || null,
              message: (card.querySelector('#review-message') || {}).textContent || null,
              markup: Boolean(card.querySelector('td img, td b')),
              pwned: window.__pwned === undefined ? null : window.__pwned,
            };
            """
        )
    )
    return got


async def shown(
    browser: Browser, what: str, check: Callable[[dict[str, Any]], Any]
) -> dict[str, Any]:
    """Wait for the card to satisfy ``check``; it as then shown."""
    return await value_when(lambda: card(browser), check, what)


async def refused_signature(
    browser: Browser, web: Web, password_field: str, table: str, actor: str, act: str
) -> None:
    """After a wrong password: the cleared password field has the focus, ``table`` holds
    nothing, and the failed attempt is audited with the act it was to sign."""
    assert (
        await browser.run(lambda d: d.switch_to.active_element.get_attribute("id"))
        == password_field
    )
    assert await rows(web.trial.url, f"SELECT count(*) FROM {table}") == [(0,)]
    assert await rows(
        web.trial.url,
        "SELECT actor, detail->>'reauthentication' FROM audit_log"
        " WHERE action = 'user.login_failed'",
    ) == [(actor, act)]


async def sign(browser: Browser, password: str) -> None:
    def step(d: webdriver.Chrome) -> None:
        details = d.find_element(By.ID, "review-sign-details")
        if not details.get_attribute("open"):
            d.find_element(By.CSS_SELECTOR, "#review-sign-details summary").click()
        # datetime-local: the page's (Berlin) wall clock; 01:00 there is DAY's midnight UTC.
        d.execute_script(
            "document.getElementById('review-from').value = arguments[0];"
            "document.getElementById('review-to').value = arguments[1];",
            "2026-03-10T01:00",
            "2026-03-11T01:00",
        )
        meaning = d.find_element(By.ID, "review-meaning")
        meaning.clear()
        meaning.send_keys(MEANING)
        d.find_element(By.ID, "review-password").send_keys(password)
        d.find_element(By.CSS_SELECTOR, "#review-sign button[type=submit]").click()

    await browser.run(step)


async def test_a_monitor_signs_off_from_the_page_and_later_data_outdates_it(
    web: Web, browser: Browser, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    await store(pool, storage_mode, 1, 2, 3)
    await browser.run(
        lambda d: d.execute_cdp_cmd(
            "Emulation.setTimezoneOverride", {"timezoneId": "Europe/Berlin"}
        )
    )
    await browser.sign_in(PAGE, "monitor", PASSWORD)
    got = await shown(browser, "the empty card with its form", lambda c: c["form"])
    assert got["rows"] == []
    assert "No period of the study is locked" in (got["locks"] or "")

    # A wrong password: refused, the API's words shown, nothing signed.
    await sign(browser, "not my password")
    got = await shown(browser, "the refusal", lambda c: c["error"])
    assert "Not signed: re-authentication failed" in got["error"], got
    await refused_signature(
        browser, web, "review-password", "review_signoffs", "monitor", "review.sign"
    )

    # The right one: stored, listed, audited; the meaning shown as text.
    await browser.run(lambda d: d.find_element(By.ID, "review-password").send_keys(PASSWORD))
    await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, "#review-sign button[type=submit]").click()
    )
    got = await shown(browser, "the sign-off listed", lambda c: len(c["rows"]) == 1)
    assert (got["message"] or "").startswith("Signed off"), got
    ((state, cells),) = [(r["state"], r["cells"]) for r in got["rows"]]
    assert state == "current"
    assert cells[1] == "Monitor (monitor, monitor)"
    assert cells[2] == MEANING
    assert cells[4] == "3"
    assert cells[5].startswith("Current")
    resp = await web.call("coordinator", "GET", REVIEWS)
    ((listed,),) = [(await resp.json())["reviews"]]
    assert (listed["from"], listed["to"]) == (
        DAY.isoformat(),
        (DAY + timedelta(days=1)).isoformat(),
    )
    assert (listed["signer"], listed["meaning"], listed["readings"]) == ("monitor", MEANING, 3)
    assert await rows(
        web.trial.url,
        "SELECT actor, detail->>'meaning' FROM audit_log WHERE action = 'review.sign'",
    ) == [("monitor", MEANING)]

    # Data for the day stored later: OUTDATED, with what came, in words.
    late = await store(pool, storage_mode, 4, 5)
    await browser.get(PAGE)
    got = await shown(
        browser, "the sign-off outdated", lambda c: [r["state"] for r in c["rows"]] == ["outdated"]
    )
    text = got["rows"][0]["cells"][5]
    assert text.startswith("OUTDATED since"), text
    assert "2 readings stored later for this period" in text
    assert f"hub hub-1 envelope {late}: 2 readings" in text
    await shot(browser)


async def shot(browser: Browser) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / "review-signoffs.png"

    def take(d: webdriver.Chrome) -> bool:
        d.find_element(By.CSS_SELECTOR, "#review-sign-details summary").click()
        node = d.find_element(By.ID, "review-signoffs")
        d.execute_script("arguments[0].scrollIntoView({block: 'start'})", node)
        return bool(node.screenshot(str(path)))

    assert await browser.run(take), "screenshot not saved"


async def test_a_coordinator_sees_the_sign_offs_and_locks_but_no_form(
    web: Web, browser: Browser, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    await store(pool, storage_mode, 1)
    resp = await web.call(
        "clinician",
        "POST",
        REVIEWS,
        json={
            "from": DAY.isoformat(),
            "to": (DAY + timedelta(days=1)).isoformat(),
            "meaning": EVIL,
            "username": "clinician",
            "password": PASSWORD,
        },
    )
    assert resp.status == 201, await resp.text()
    await lock_day(web.trial.url)
    await browser.sign_in(PAGE, "coordinator", PASSWORD)
    got = await shown(browser, "the listed sign-off", lambda c: len(c["rows"]) == 1)
    assert not got["form"]
    assert got["rows"][0]["cells"][2] == EVIL
    assert (got["markup"], got["pwned"]) == (False, None)
    assert got["rows"][0]["state"] == "current"
    assert got["rows"][0]["cells"][1] == "Clinician (clinician, investigator (clinician))"
    assert got["locks"] is not None
    assert "database lock for the interim" in got["locks"]
    assert "refused" in got["locks"]
