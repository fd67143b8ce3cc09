"""The study's locks page, in headless Chromium against the real gateway and database
(docs/review.md): the study's data manager (an admin) sets late data to be held, locks a day
of the study (a wrong password refused with the API's words and nothing locked), sees the
readings that arrive for it held, and lifts the lock with a signed unlock that stores them.
A site coordinator sees the locks and the policy but no form; a study out of reach is a 404
page. The roles the page offers the forms to are the API's.

A screenshot goes to docs/screenshots/ for docs/review.md."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool
from selenium import webdriver
from selenium.webdriver.common.by import By

from gateway.web import api_review
from storage import locks
from storage.migrate import StorageMode
from tests.alerts.test_engine import rows
from tests.fixtures.waiting import value_when
from tests.storage.test_review_lock import DAY, lock_day, store
from tests.web.browser import SCREENSHOTS, Browser
from tests.web.conftest import PASSWORD, Web
from tests.web.test_pages_review_browser import refused_signature

STUDY_JS = Path(__file__).resolve().parents[2] / "gateway" / "web" / "static" / "study.js"
PAGE = "/studies/S1"
REASON = "database lock for the interim"
# What a data manager typed is shown as text, never run as markup.
EVIL = '<img src="x" onerror="window.__pwned = 1">query <b>answered</b>'


def test_the_page_offers_the_forms_to_the_roles_the_api_accepts() -> None:
    source = STUDY_JS.read_text()
    managers = re.search(r"const LOCK_MANAGERS = (\[.*?\]);", source)
    assert managers is not None
    assert sorted(re.findall(r'"(\w+)"', managers.group(1))) == sorted(
        r.value for r in api_review.DATA_MANAGERS
    )
    limit = re.search(r"const LOCK_REASON_MAX = (\d+);", source)
    assert limit is not None
    assert int(limit.group(1)) == locks.MAX_REASON


async def page(browser: Browser) -> dict[str, Any] | None:
    got: dict[str, Any] | None = await browser.run(
        lambda d: d.execute_script(
            """
            const main = document.getElementById('main');
            if (!main || !document.getElementById('policy-now')) return null;
            const text = (id) => (document.getElementById(id) || {}).textContent || null;
            return {
              policy: text('policy-now'),
              rows: [...main.querySelectorAll('tr.lock')].map((r) => ({
                id: Number(r.dataset.lockId),
                state: r.dataset.state,
                cells: [...r.querySelectorAll(':scope > td')].map((c) => c.textContent),
              })),
              lockForm: Boolean(document.getElementById('lock-form')),
              policyForm: Boolean(document.getElementById('policy-form')),
              unlockForms: main.querySelectorAll('details.unlock').length,
              lockError: text('lock-error'),
              message: text('study-message'),
              markup: Boolean(main.querySelector('td img, td b')),
              pwned: window.__pwned === undefined ? null : window.__pwned,
            };
            """
        )
    )
    return got


async def shown(
    browser: Browser, what: str, check: Callable[[dict[str, Any]], Any]
) -> dict[str, Any]:
    """Wait for the page to satisfy ``check``; it as then shown."""
    return await value_when(lambda: page(browser), check, what)


async def lock(browser: Browser, password: str) -> None:
    def step(d: webdriver.Chrome) -> None:
        # datetime-local: the page's (UTC) wall clock.
        d.execute_script(
            "document.getElementById('lock-from').value = arguments[0];"
            "document.getElementById('lock-to').value = arguments[1];",
            "2026-03-10T00:00",
            "2026-03-11T00:00",
        )
        reason = d.find_element(By.ID, "lock-reason")
        reason.clear()
        reason.send_keys(REASON)
        d.find_element(By.ID, "lock-password").send_keys(password)
        d.find_element(By.CSS_SELECTOR, "#lock-form button[type=submit]").click()

    await browser.run(step)


async def test_a_data_manager_locks_holds_and_lifts_from_the_page(
    web: Web, browser: Browser, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    await browser.run(
        lambda d: d.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "UTC"})
    )
    await browser.sign_in(PAGE, "admin", PASSWORD)
    got = await shown(browser, "the empty page with its forms", lambda p: p["lockForm"])
    assert got["rows"] == []
    assert got["policyForm"]
    assert "refused" in got["policy"]

    # Late data held, not refused.
    def hold(d: webdriver.Chrome) -> None:
        d.execute_script("document.getElementById('policy').value = 'hold'")
        d.find_element(By.CSS_SELECTOR, "#policy-form button[type=submit]").click()

    await browser.run(hold)
    got = await shown(browser, "the policy saved", lambda p: "held" in (p["policy"] or ""))
    assert await rows(web.trial.url, "SELECT late_data_policy FROM studies") == [("hold",)]

    # A wrong password: refused with the API's words, nothing locked, the attempt audited.
    await lock(browser, "not my password")
    got = await shown(browser, "the refusal", lambda p: p["lockError"])
    assert "Not signed: re-authentication failed" in got["lockError"], got
    await refused_signature(browser, web, "lock-password", "period_locks", "admin", "period.lock")

    # The right one: the day locked, listed in force, with the form to lift it.
    await browser.run(lambda d: d.find_element(By.ID, "lock-password").send_keys(PASSWORD))
    await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, "#lock-form button[type=submit]").click()
    )
    got = await shown(browser, "the lock listed", lambda p: len(p["rows"]) == 1)
    ((row,),) = [got["rows"]]
    assert row["state"] == "in-force"
    assert row["cells"][1] == REASON
    assert row["cells"][3] == "0"
    assert got["unlockForms"] == 1
    assert (got["message"] or "").startswith(f"Lock {row['id']} in force")
    assert await rows(
        web.trial.url, "SELECT study_id, from_time, locked_by, reason FROM period_locks"
    ) == [("S1", DAY, "admin", REASON)]

    # Readings for the locked day arrive: held, and the page counts them.
    await store(pool, storage_mode, 2, 3)
    await browser.get(PAGE)
    got = await shown(
        browser, "two readings held", lambda p: p["rows"] and p["rows"][0]["cells"][3] == "2"
    )
    await shot(browser, row["id"])

    # Lifted with a signed unlock: the held readings stored, the row says who, when, why.
    def lift(d: webdriver.Chrome) -> None:
        d.find_element(By.CSS_SELECTOR, f"#unlock-{row['id']}-details summary").click()
        d.find_element(By.ID, f"unlock-{row['id']}-reason").send_keys(EVIL)
        d.find_element(By.ID, f"unlock-{row['id']}-password").send_keys(PASSWORD)
        d.find_element(By.CSS_SELECTOR, f"#unlock-{row['id']}-form button[type=submit]").click()

    await browser.run(lift)
    got = await shown(
        browser, "the lock lifted", lambda p: [r["state"] for r in p["rows"]] == ["lifted"]
    )
    assert got["message"] == f"Lock {row['id']} lifted; 2 held readings stored."
    assert got["rows"][0]["cells"][4].startswith("Lifted by admin")
    assert got["rows"][0]["cells"][4].endswith(EVIL)
    assert (got["markup"], got["pwned"]) == (False, None)
    assert got["unlockForms"] == 0
    assert await rows(web.trial.url, "SELECT count(*) FROM readings") == [(2,)]
    assert await rows(
        web.trial.url,
        "SELECT actor, action FROM audit_log WHERE entity = 'study' ORDER BY audit_id",
    ) == [
        ("admin", "study.late_data_policy_set"),
        ("admin", "period.lock"),
        ("admin", "period.unlock"),
    ]


async def shot(browser: Browser, lock_id: int) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / "study-locks.png"

    def take(d: webdriver.Chrome) -> bool:
        d.find_element(By.CSS_SELECTOR, f"#unlock-{lock_id}-details summary").click()
        d.set_window_size(1280, 1100)
        return bool(d.find_element(By.ID, "main").screenshot(str(path)))

    assert await browser.run(take), "screenshot not saved"
    await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, f"#unlock-{lock_id}-details summary").click()
    )


async def test_a_coordinator_sees_the_locks_and_policy_but_no_form(
    web: Web, browser: Browser
) -> None:
    await lock_day(web.trial.url)
    await browser.sign_in(PAGE, "coordinator", PASSWORD)
    got = await shown(browser, "the lock listed", lambda p: len(p["rows"]) == 1)
    assert (got["lockForm"], got["policyForm"], got["unlockForms"]) == (False, False, 0)
    assert got["rows"][0]["state"] == "in-force"
    assert "refused" in got["policy"]

    await browser.get("/studies/NO-SUCH-STUDY")
    text = await browser.run(lambda d: d.find_element(By.TAG_NAME, "main").text)
    assert "There is no such page within your sites." in text
