"""The adherence pages in headless Chromium against the real gateway and database: a
monitor reads a site's heat map (every cell as the API says, reachable with the keyboard),
opens a participant's day from it and reads the day's table and gaps; staff of another site
get the refusal page, and a span the API refuses is shown as text.
Screenshots go to docs/screenshots/ (adherence-cohort.png, adherence-participant.png)."""

from __future__ import annotations

import hashlib
import math
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from ingest.model import AcceptedEnvelope, Batch, Gap, Reading
from storage import adherence, db, schedules
from storage.migrate import StorageMode
from storage.schedules import Expectation, ScheduleKind
from storage.writer import BulkWriter
from tests.web.browser import Browser
from tests.web.conftest import PASSWORD, Web

pytestmark = pytest.mark.slow

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
INVALID = ("invalid_measurement",)
# When the spot checks of a day are taken (UTC hours; the participants have no time zone).
CHECK_HOURS = (7, 12, 17, 21)


def midnight(days_ago: int) -> int:
    """The start (UTC, ms) of the day ``days_ago`` days before today."""
    today = datetime.now(UTC).date()
    start = datetime.combine(today - timedelta(days=days_ago), datetime.min.time(), UTC)
    return int(start.timestamp() * 1000)


def day_of(days_ago: int) -> str:
    return (datetime.now(UTC).date() - timedelta(days=days_ago)).isoformat()


def pct(a: float) -> int:
    """A share as the pages show it: whole percent, rounded down."""
    return math.floor(round(a * 10_000) / 100)


class Seeder:
    """Envelopes of one site's participants, stored through the writer as the gateway does."""

    def __init__(self) -> None:
        self.envelopes: list[AcceptedEnvelope] = []
        self.seq: dict[str, int] = {}

    def day(
        self,
        pid: str,
        hub: str,
        days_ago: int,
        *,
        worn: int,
        checks: int = 0,
        invalid_checks: int = 0,
        gaps: tuple[Gap, ...] = (),
    ) -> None:
        """``worn`` minutes of heart rate from 08:00 (one reading a minute), ``checks`` glucose
        spot checks of which the last ``invalid_checks`` the meter marked invalid."""
        start = midnight(days_ago)
        now = int(time.time() * 1000)
        readings = [
            Reading(
                start + 8 * HOUR_MS + i * MINUTE_MS, "heart_rate", 60.0 + i % 9, "/min", "strap"
            )
            for i in range(worn)
        ]
        for i, hour in enumerate(CHECK_HOURS[:checks]):
            flags = INVALID if i >= checks - invalid_checks else ()
            readings.append(
                Reading(start + hour * HOUR_MS, "glucose", 95.0 + i, "mg/dL", "meter", flags)
            )
        kept = tuple(r for r in readings if r.t_ms < now - MINUTE_MS)
        if not kept and not gaps:
            return
        seq = self.seq[hub] = self.seq.get(hub, 0) + 1
        self.envelopes.append(
            AcceptedEnvelope(
                dev=hub,
                seq=seq,
                participant_id=pid,
                sent_ms=now,
                envelope_sha256=hashlib.sha256(f"{hub}/{seq}".encode()).digest(),
                reading_count=len(kept),
                readings=kept,
                consent_ids=(None,) * len(kept),
                gaps=gaps,
            )
        )


async def seed_site(web: Web, pool: AsyncConnectionPool, mode: StorageMode) -> None:
    """SITE-A's cohort over the last two weeks. The study expects heart rate worn 12 hours a
    day and four glucose checks a day; arm B (P6) takes no glucose. P1 (the fixture's)
    consented a day ago; P3 to P6 three weeks ago:

    - P3 wears and checks nearly every day; three days ago only 6 hours and 3 usable checks
      of 4 (one invalid), the strap out of range for 2 hours and the hub's outbox full for 30
      minutes;
    - P4 wore well and then less and less;
    - P5 takes weekends off and checks twice a day;
    - P6 (arm B) lost the strap for two days (the hub says: out of range).
    """
    trial = web.trial
    three_weeks = datetime.now(UTC) - timedelta(days=21)
    for n in (3, 4, 5, 6):
        await trial.add_participant(
            f"P{n}", f"hub-{n}", consent_at=three_weeks, enrolled_at=three_weeks
        )
    async with db.connection(trial.url) as conn:
        for metric, expectation in (
            ("heart_rate", Expectation(ScheduleKind.CONTINUOUS, rate_hz=1 / 60, wear_hours=12)),
            ("glucose", Expectation(ScheduleKind.SPOT, per_day=4)),
        ):
            await schedules.set_schedule(
                conn, "S1", metric, expectation, effective_from=date(2026, 1, 1), actor="admin"
            )
        await schedules.set_arm(conn, "P6", "B", actor="coordinator")
        await schedules.set_schedule(
            conn,
            "S1",
            "glucose",
            Expectation(ScheduleKind.NONE),
            effective_from=date(2026, 1, 1),
            actor="admin",
            arm="B",
        )
        await conn.commit()

    s = Seeder()
    s.day("P1", "hub-1", 1, worn=300, checks=2)
    s.day("P1", "hub-1", 0, worn=200, checks=1)
    for k in range(14):
        weekday = date.fromisoformat(day_of(k)).weekday()
        if k == 3:
            strap_lost = midnight(3) + 14 * HOUR_MS
            s.day(
                "P3",
                "hub-3",
                k,
                worn=360,
                checks=4,
                invalid_checks=1,
                gaps=(
                    Gap(strap_lost, strap_lost + 2 * HOUR_MS, "out_of_range", "strap"),
                    Gap(
                        strap_lost + 3 * HOUR_MS,
                        strap_lost + 3 * HOUR_MS + 30 * MINUTE_MS,
                        "outbox_full",
                    ),
                ),
            )
        else:
            s.day("P3", "hub-3", k, worn=700 + 10 * (k % 3), checks=4 - (k % 5 == 4))
        s.day("P4", "hub-4", k, worn=min(720, 60 * k), checks=min(4, k // 3))
        if weekday < 5:
            s.day("P5", "hub-5", k, worn=540, checks=2)
        if k in (5, 6):
            s.day(
                "P6",
                "hub-6",
                k,
                worn=0,
                gaps=(Gap(midnight(k), midnight(k) + DAY_MS, "out_of_range", "strap"),),
            )
        else:
            s.day("P6", "hub-6", k, worn=620)
    await BulkWriter(pool, mode).write(Batch(tuple(s.envelopes), (), int(time.time() * 1000)))
    async with db.connection(trial.url) as conn:
        await adherence.refresh(conn)


async def api(web: Web, key: str, path: str) -> Any:
    resp = await web.call(key, "GET", path)
    assert resp.status == 200, await resp.text()
    return await resp.json()


CELLS_JS = """
return [...document.querySelectorAll(arguments[0])].map((a) => ({
  participant: a.dataset.participant, day: a.dataset.day,
  text: (a.querySelector('text') || {}).textContent || '',
  label: a.getAttribute('aria-label'), title: a.querySelector('title').textContent,
  tabindex: a.getAttribute('tabindex'), current: a.getAttribute('aria-current'),
}));
"""


def expected_label(cell: dict[str, Any]) -> str:
    if cell["adherence"] is None:
        return "nothing expected"
    n = cell["metrics_expected"]
    return (
        f"{pct(cell['adherence'])} % adherence, {cell['metrics_met']} of {n} "
        f"{'metric' if n == 1 else 'metrics'} met in full"
    )


async def test_monitor_reads_the_heat_map_and_opens_a_participants_day(
    web: Web, browser: Browser, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    await seed_site(web, pool, storage_mode)
    await browser.sign_in("/sites/SITE-A/adherence", "monitor", PASSWORD)
    participants = ["P1", "P3", "P4", "P5", "P6"]
    await browser.wait_for(
        "the heat map's cells",
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, "#heatmap a.cell")) == 14 * len(participants)
        ),
    )
    main = await browser.css("#main[data-from]")
    first, last = await browser.run(
        lambda _: (main.get_attribute("data-from"), main.get_attribute("data-to"))
    )
    assert (first, last) == (day_of(13), day_of(0))

    # Every cell says what the API says, as a number in the cell and in its name and title.
    body = await api(web, "monitor", f"/api/v1/sites/SITE-A/adherence?from={first}&to={last}")
    assert [p["participant_id"] for p in body["participants"]] == participants
    want = {(p["participant_id"], c["day"]): c for p in body["participants"] for c in p["days"]}
    shown = await browser.run(lambda d: d.execute_script(CELLS_JS, "#heatmap a.cell"))
    assert {(c["participant"], c["day"]) for c in shown} == set(want)
    for c in shown:
        cell = want[(c["participant"], c["day"])]
        where = f"{c['participant']} {c['day']}"
        assert c["text"] == ("" if cell["adherence"] is None else str(pct(cell["adherence"]))), (
            where
        )
        assert c["label"].endswith(": " + expected_label(cell)), (where, c["label"])
        assert c["label"].startswith(c["participant"] + ", "), where
        assert c["title"] == c["label"], where
    # The figures themselves, for the participant described above: heart rate 6 of 12 hours
    # (50 %) and glucose 3 usable checks of 4 (75 %), a mean of 62.5 %.
    p3 = want[("P3", day_of(3))]
    assert (p3["metrics_expected"], p3["metrics_met"]) == (2, 0)
    assert pct(p3["adherence"]) == 62
    assert want[("P1", day_of(5))]["adherence"] is None  # before P1's consent
    assert want[("P6", day_of(5))]["adherence"] == 0  # the strap lost, no glucose expected
    await browser.screenshot("adherence-cohort.png")

    # One tab stop for the map (the first row's latest day); the arrow keys move in it.
    start = [c for c in shown if c["tabindex"] == "0"]
    assert [(c["participant"], c["day"]) for c in start] == [("P1", last)]

    def keys(d: webdriver.Chrome) -> Any:
        d.execute_script("document.querySelector('#heatmap a.cell[tabindex=\"0\"]').focus()")
        ActionChains(d).send_keys(
            Keys.ARROW_DOWN, Keys.ARROW_LEFT, Keys.ARROW_LEFT, Keys.ARROW_LEFT
        ).perform()
        return d.execute_script(
            "const a = document.activeElement;"
            "return {p: a.dataset.participant, day: a.dataset.day, tab: a.getAttribute('tabindex')}"
        )

    assert await browser.run(keys) == {"p": "P3", "day": day_of(3), "tab": "0"}

    # A click on the cell opens that participant's day, in the same span.
    await browser.run(
        lambda d: d.find_element(
            By.CSS_SELECTOR, f'#heatmap a.cell[data-participant="P3"][data-day="{day_of(3)}"]'
        ).click()
    )
    await browser.wait_for(
        "the participant's page", lambda d: "/participants/P3/adherence?" in d.current_url
    )
    assert f"day={day_of(3)}" in await browser.run(lambda d: d.current_url)
    await browser.css(f'#day-detail[data-loaded="{day_of(3)}"]')

    rows = await browser.run(
        lambda d: d.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('#day-detail tr.metric-row')]"
            ".map((r) => [r.dataset.metric, [...r.cells].map((c) => c.textContent)]))"
        )
    )
    assert rows == {
        "glucose": ["glucose", "spot checks", "3 of 4 spot checks", "75 %", "1 of 4", "—"],
        "heart_rate": [
            "heart rate",
            "worn continuously",
            "6.0 h of 12.0 h worn (360 min of 720 min)",
            "50 %",
            "0 of 360",
            "50 %",
        ],
    }
    gaps = await browser.run(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#day-detail tr.gap-row')]"
            ".map((r) => [...r.cells].map((c) => c.textContent))"
        )
    )
    assert gaps == [
        ["strap", "out of range", "120 min"],
        ["the whole hub", "outbox full", "30 min"],
    ]

    # The bars say what the participant's API says, the selected day marked.
    days = await api(web, "monitor", f"/api/v1/participants/P3/adherence?from={first}&to={last}")
    for metric in ("heart_rate", "glucose"):
        selector = f"#bars-{metric} a.bar"
        bars = await browser.run(lambda d: d.execute_script(CELLS_JS, selector))  # noqa: B023
        assert len(bars) == 14
        got = {b["day"]: b for b in bars}
        for day in days["days"]:
            (m,) = [x for x in day["metrics"] if x["metric"] == metric]
            b = got[day["day"]]
            a = m["adherence"]
            assert b["label"].endswith("nothing expected" if a is None else f": {pct(a)} %"), b
            assert b["text"] == ("" if a is None else str(pct(a))), b
        assert [b["day"] for b in bars if b["current"] == "date"] == [day_of(3)]
    await browser.run(lambda d: d.set_window_size(1280, 1250))
    await browser.screenshot("adherence-participant.png")


async def test_other_sites_staff_are_refused_and_refused_spans_are_shown_as_text(
    web: Web, browser: Browser
) -> None:
    await browser.sign_in("/sites/SITE-A/adherence", "other_coordinator", PASSWORD)
    refusal = await browser.css("p.refusal")
    assert await browser.run(lambda _: refusal.text) == "There is no such page within your sites."
    await browser.get("/participants/P1/adherence")
    refusal = await browser.css("p.refusal")
    assert await browser.run(lambda _: refusal.text) == "There is no such page within your sites."
    for path in ("/sites/SITE-A/adherence", "/participants/P1/adherence"):
        assert (await web.call("other_coordinator", "GET", path)).status == 404
        assert (await web.call("participant", "GET", path)).status == 403
        assert (await web.call("coordinator", "GET", path)).status == 200

    # Their own site, with a day that does not exist: the API's refusal, as text.
    await browser.get("/sites/SITE-B/adherence?from=2026-02-30&to=2026-03-02")
    error = await browser.css("#main p.error[role=alert]")
    text = await browser.run(lambda _: error.text)
    assert text.startswith("Could not load the site's adherence:"), text
    assert "'from'" in text, text
    await browser.get("/sites/SITE-B/adherence")
    await browser.css("#heatmap a.cell[data-participant=P2]")
