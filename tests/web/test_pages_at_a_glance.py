"""What a monitor needs at a glance, in headless Chromium against the real gateway and
database: the site's cohort with each participant's unresolved alerts and open queries; a
query opened from the live view on a metric's range as its chart shows it, listed there and
on the participant page (for staff, not for the participant); text from the data shown as
text."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from selenium import webdriver
from selenium.webdriver.common.by import By

from storage.migrate import StorageMode
from tests.web.browser import Browser
from tests.web.conftest import PASSWORD, Web
from tests.web.test_at_a_glance import Hubs, hr

pytestmark = pytest.mark.slow

EVIL = '<img src="x" onerror="window.__pwned = 1">'


def now_ms() -> int:
    return int(time.time() * 1000)


async def test_a_monitor_sees_the_cohort_and_opens_a_query_from_the_live_view(
    web: Web, browser: Browser, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    trial = web.trial
    await trial.add_participant("P3", "hub-3")
    now = now_ms()
    readings = [hr(now - 300_000 + i * 5000, 70.0 + i % 7) for i in range(60)]
    await Hubs(pool, storage_mode).send("P1", "hub-1", readings, received_ms=now)
    await web.new_alert("P1")
    await web.new_alert("P1")

    # The site page: two unresolved alerts for P1, none for P3 (nothing sent yet either).
    await browser.sign_in("/sites/SITE-A", "monitor", PASSWORD)
    await browser.css("tr.cohort-row[data-participant=P3]")

    def cohort(d: webdriver.Chrome) -> dict[str, Any]:
        return d.execute_script(  # type: ignore[no-any-return]
            """
            const out = {};
            for (const row of document.querySelectorAll('tr.cohort-row')) {
              const cell = (c) => row.querySelector(c).textContent;
              out[row.dataset.participant] = [cell('td.last-data'), cell('td.alerts'),
                cell('td.queries')];
            }
            out.headers = [...document.querySelectorAll('tr.cohort-row')[0]
              .closest('table').querySelectorAll('th')].map((h) => h.textContent);
            return out;
            """
        )

    got = await browser.run(cohort)
    assert "Unresolved alerts" in got["headers"]
    assert got["P1"][1:] == ["2", "none"]
    assert got["P1"][0].endswith(" ago")
    assert got["P3"] == ["none in 30 days", "0", "none"]

    # The live view: the monitor asks about heart rate over the range the chart shows.
    await browser.get("/participants/P1/live")
    await browser.css("#latest-heart_rate")
    await browser.css("#queries p.empty")
    await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, "#metric-heart_rate .ask-box summary").click()
    )
    shown = await browser.wait_for(
        "the range of the form",
        lambda d: d.find_element(By.ID, "ask-heart_rate-range").text or None,
    )
    assert shown.startswith("About heart rate from ")
    # An empty question is not sent.
    await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, "#ask-heart_rate button[type=submit]").click()
    )
    error = await browser.wait_for(
        "the form's error", lambda d: d.find_element(By.ID, "ask-heart_rate-error").text or None
    )
    assert error == "Write the question for the site."
    before = now_ms()
    await browser.run(
        lambda d: d.find_element(By.ID, "ask-heart_rate-text").send_keys(f"Artefact? {EVIL}")
    )
    await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, "#ask-heart_rate button[type=submit]").click()
    )
    row = await browser.css("#queries tr.query")
    cells = await browser.run(lambda _: [c.text for c in row.find_elements(By.TAG_NAME, "td")])
    assert cells[1:3] == [f"Artefact? {EVIL}", "open"]
    assert cells[0].startswith("heart rate from ")
    assert await browser.run(lambda d: d.execute_script("return window.__pwned")) is None

    # Stored as the chart showed it: heart rate over the last 10 minutes.
    resp = await web.call("monitor", "GET", "/api/v1/participants/P1/queries")
    (query,) = (await resp.json())["queries"]
    assert (query["target"], query["metric"], query["state"]) == ("range", "heart_rate", "open")
    start, end = datetime.fromisoformat(query["from"]), datetime.fromisoformat(query["to"])
    assert (end - start).total_seconds() == pytest.approx(600, abs=1)
    assert before - 30_000 <= end.timestamp() * 1000 <= now_ms() + 1000

    # The participant page lists it for staff; the participant sees no queries.
    await browser.get("/participants/P1")
    listed = await browser.css("#data-queries tr.query")
    assert "Artefact?" in await browser.run(lambda _: listed.text)
    await browser.run(lambda d: d.delete_all_cookies())
    await browser.sign_in("/participants/P1", "participant", PASSWORD)
    await browser.css("#consent-history")
    assert not await browser.run(lambda d: d.find_elements(By.ID, "data-queries"))
