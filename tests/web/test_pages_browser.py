"""The pages in headless Chromium against the real gateway, broker and database: a monitor
sees an alert raised by an out-of-range envelope arrive without reloading, acknowledges it
and sees the audit trail; a clinician's live view shows new heart-rate values arriving and
marks the readings their device doubted; the site and participant pages show their data,
with a script tag in a name rendered as text.
Screenshots go to docs/screenshots/ for the README's tour."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from ingest.envelope import seal
from ingest.model import Gap, Payload, Reading, SensorReport
from ingest.pipeline import up_topic
from ingest.rules import Severity
from storage import (
    adherence,
    alerts,
    db,
    notifications,
    rollups,
    schedules,
    time_zones,
    users,
)
from storage.migrate import StorageMode
from storage.schedules import Expectation, ScheduleKind
from storage.users import Role
from tests.fixtures.mqtt import MqttProbe
from tests.fixtures.notify import Hook
from tests.fixtures.postgres import database_mode
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until
from tests.web.browser import Browser
from tests.web.conftest import PASSWORD, Web

pytestmark = pytest.mark.slow

# The marks of doubted readings, as the live view draws them and names them in its badges.
CROSS = "\N{MULTIPLICATION SIGN}"
CIRCLE = "\N{WHITE CIRCLE}"


def now_ms() -> int:
    return int(time.time() * 1000)


def publish(
    probe: MqttProbe,
    trial: Trial,
    seq: int,
    values: list[float],
    *,
    t0: int,
    gaps: tuple[Gap, ...] = (),
) -> None:
    hub = trial.hubs["hub-1"]
    readings = tuple(
        Reading(t0 + i * 1000, "heart_rate", v, "/min", "hr-strap-1") for i, v in enumerate(values)
    )
    payload = Payload(dev=hub.device_id, seq=seq, sent_ms=now_ms(), readings=readings, gaps=gaps)
    probe.publish(up_topic(hub.device_id), seal(payload, hub.key))


def has(url: str, query: str, want: int):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return await count(url, query) == want

    return check


async def count(url: str, query: str, *args: object) -> int:
    async with db.connection(url) as conn:
        cur = await conn.execute(query.encode(), args)
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_the_board_shows_what_was_sent_to_the_people_on_call_and_what_failed(
    web: Web, browser: Browser, probe: MqttProbe, hook: Hook
) -> None:
    now = datetime.now(UTC)
    async with db.connection(web.trial.url, autocommit=True) as conn:
        await alerts.add_rule(
            conn,
            study_id="S1",
            name="heart rate very high",
            metric="heart_rate",
            high=140.0,
            severity=Severity.CRITICAL,
            created_by="tester",
        )
        # E-mail too, though this gateway has no SMTP server: that delivery must show failed.
        await notifications.set_contact(
            conn,
            username="monitor",
            email="monitor@site-a.example",
            webhook_url=hook.url,
            webhook_secret=bytes(32),
            events=[notifications.Event.CRITICAL],
            actor="tester",
        )
        await notifications.add_on_call(
            conn,
            site_id="SITE-A",
            username="monitor",
            from_time=now - timedelta(hours=1),
            to_time=now + timedelta(hours=8),
            actor="tester",
        )
    await browser.sign_in("/monitor", "monitor", PASSWORD)
    await browser.wait_for("the live feed", lambda d: d.find_element(By.ID, "live").text == "Live")
    publish(probe, web.trial, 1, [170.0, 172.0], t0=now_ms() - 10_000)
    await browser.css("tr.alert[data-state=open]")
    sent = await browser.css("tr.delivery[data-state=sent]")
    failed = await browser.css("tr.delivery[data-state=failed]")
    assert "monitor by webhook" in await browser.run(lambda _: sent.text)
    failed_text = await browser.run(lambda _: failed.text)
    assert "monitor by email" in failed_text
    assert "no SMTP server configured" in failed_text
    warning = await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, "#deliveries p.warning").text
    )
    assert warning.startswith("1 of the latest 2 deliveries failed or reached no one")
    assert len(hook.requests) == 1
    await browser.screenshot("monitor-deliveries.png")


async def test_monitor_sees_an_alert_arrive_live_acknowledges_it_and_sees_the_trail(
    web: Web, browser: Browser, probe: MqttProbe
) -> None:
    async with db.connection(web.trial.url) as conn:
        await alerts.add_rule(
            conn,
            study_id="S1",
            name="heart rate high",
            metric="heart_rate",
            high=120.0,
            sustained_s=3,
            created_by="tester",
        )
        await conn.commit()
    await browser.sign_in("/monitor", "monitor", PASSWORD)
    await browser.wait_for(
        "the live feed connected",
        lambda d: d.find_element(By.ID, "live").text == "Live",
    )
    # Marks this page load: a reload would lose it.
    await browser.run(lambda d: d.execute_script("window.__sameLoad = true"))

    publish(probe, web.trial, 1, [150.0, 152.0, 155.0, 151.0, 149.0], t0=now_ms() - 30_000)
    row = await browser.css("tr.alert[data-state=open]")
    assert "P1" in row.text
    assert "heart rate high" in row.text
    # What opened it: the reading that met the rule (the fourth: 3 s above 120 by then)
    # against the bound; and the participant's latest value.
    opened = await browser.run(lambda d: d.find_element(By.CSS_SELECTOR, "tr.alert td.what").text)
    assert opened.startswith("151 /min > 120 /min (high) for 3 s"), opened
    assert "rule: 3 s or longer" in opened
    latest = await browser.run(lambda d: d.find_element(By.CSS_SELECTOR, "tr.alert td.now").text)
    assert latest.startswith("149 /min"), latest
    assert await browser.run(lambda d: d.execute_script("return window.__sameLoad === true"))
    await browser.screenshot("monitor-board.png")

    await browser.run(lambda d: d.find_element(By.CSS_SELECTOR, "tr.alert button.ack").click())
    await browser.css("tr.alert[data-state=acknowledged]")
    await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, "tr.alert button.secondary").click()
    )
    trail = await browser.wait_for(
        "the audit trail of the alert",
        lambda d: next(
            (e for e in d.find_elements(By.CSS_SELECTOR, "ol.history") if "acknowledged" in e.text),
            None,
        ),
    )
    text = await browser.run(lambda _: trail.text)
    assert "opened by system:alerts" in text
    assert "acknowledged by monitor" in text
    assert await browser.run(lambda d: d.execute_script("return window.__sameLoad === true"))
    url = web.trial.url
    assert (
        await count(
            url,
            "SELECT count(*) FROM audit_log WHERE action = 'alert.acknowledged'"
            " AND actor = 'monitor'",
        )
        == 1
    )
    assert (
        await count(
            url, "SELECT count(*) FROM audit_log WHERE action = 'user.login' AND actor = 'monitor'"
        )
        == 1
    )


async def test_clinician_live_view_shows_new_heart_rate_values_arriving(
    web: Web, browser: Browser, probe: MqttProbe
) -> None:
    trial = web.trial
    # Hours of history (consent began a day ago) for the rollup chart.
    start = now_ms() - 20 * 3600_000
    hub = trial.hubs["hub-1"]
    history = tuple(
        Reading(start + i * 600_000, "heart_rate", 60.0 + (i % 12) * 2, "/min", "hr-strap-1")
        for i in range(115)
    )
    strap = SensorReport("hr-strap-1", manufacturer="Polar", model="H10", battery_level=85)
    probe.publish(
        up_topic(hub.device_id),
        seal(
            Payload(dev=hub.device_id, seq=1, sent_ms=now_ms(), readings=history, sensors=(strap,)),
            hub.key,
        ),
    )
    await wait_until(has(trial.url, "SELECT count(*) FROM readings", 115), "history stored")
    if database_mode(trial.url) is StorageMode.PLAIN:
        # TimescaleDB's continuous aggregate answers from the readings until materialized.
        async with db.connection(trial.url) as conn:
            assert await rollups.refresh_rollups(conn, StorageMode.PLAIN) > 0

    t0 = now_ms() - 120_000
    publish(
        probe,
        trial,
        2,
        [71.0, 72.0, 73.0, 74.0],
        t0=t0,
        gaps=(Gap(t0 + 4000, t0 + 40_000, "out_of_range"),),
    )
    # A monitor asked the site about two ranges; the clinician answered the first.
    asked = []
    for question in ("Strap loose during the gap?", "Was the participant exercising?"):
        resp = await web.call(
            "monitor",
            "POST",
            "/api/v1/participants/P1/queries",
            json={
                "target": "range",
                "metric": "heart_rate",
                "from": datetime.fromtimestamp(t0 / 1000, UTC).isoformat(),
                "to": datetime.fromtimestamp((t0 + 40_000) / 1000, UTC).isoformat(),
                "text": question,
            },
        )
        assert resp.status == 201, await resp.text()
        asked.append((await resp.json())["query_id"])
    resp = await web.call(
        "clinician",
        "POST",
        f"/api/v1/queries/{asked[0]}/answer",
        json={"text": "Yes: re-fitted at the visit."},
    )
    assert resp.status == 200, await resp.text()
    await browser.sign_in("/participants/P1/live", "clinician", PASSWORD)
    latest = await browser.css(
        "#latest-heart_rate[data-value='74.0'], #latest-heart_rate[data-value='74']"
    )
    assert "/min" in await browser.run(lambda _: latest.text)
    # The participant's open and answered queries above the charts: about what, the
    # question, the state, who opened it, and the last step.
    await browser.css("#queries tr.query")
    listed = await browser.run(
        lambda d: [
            [c.text for c in r.find_elements(By.CSS_SELECTOR, "td")]
            for r in d.find_elements(By.CSS_SELECTOR, "#queries tr.query")
        ]
    )
    assert [(r[1], r[2]) for r in listed] == [
        ("Was the participant exercising?", "open"),
        ("Strap loose during the gap?", "answered"),
    ]
    assert all(r[0].startswith("heart rate from ") and r[3].startswith("monitor, ") for r in listed)
    assert listed[0][4] == "—"
    assert listed[1][4].startswith("answer by clinician, ")
    assert listed[1][4].endswith(": Yes: re-fitted at the visit.")
    # A clinician answers queries but does not open them: no form here.
    assert not await browser.run(lambda d: d.find_elements(By.CSS_SELECTOR, "form.ask"))
    publish(probe, trial, 3, [88.0, 91.0], t0=t0 + 60_000)
    await browser.wait_for(
        "the new value on the page",
        lambda d: (
            d.find_element(By.ID, "latest-heart_rate").get_attribute("data-value") in ("91", "91.0")
        ),
    )
    counted = await browser.run(
        lambda d: d.find_element(By.ID, "live-heart_rate").get_attribute("data-count")
    )
    assert counted == "6"
    await browser.css("#days-heart_rate svg polyline")
    await browser.css("#live-heart_rate svg rect.gap")
    # The strap: last seen at its newest reading (a minute ago), whatever its hub last
    # reported about it (its battery, with the history a moment ago).
    wearable = await browser.wait_for(
        "the strap in the wearables",
        lambda d: next(
            (
                [c.text for c in r.find_elements(By.CSS_SELECTOR, "td")]
                for r in d.find_elements(By.CSS_SELECTOR, "#devices tbody tr")
                if "hr-strap-1" in r.text
            ),
            None,
        ),
    )
    assert wearable[2:4] == ["H10", "85 %"]
    assert wearable[4].endswith(" ago")
    await browser.screenshot("clinician-live.png")


async def test_site_and_participant_pages_show_their_data_and_render_names_inert(
    web: Web, browser: Browser, probe: MqttProbe
) -> None:
    trial = web.trial
    evil = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2">'
    async with db.connection(trial.url) as conn:
        await users.create_user(
            conn,
            actor="tester",
            username="coord2",
            display_name=evil,
            role=Role.SITE_COORDINATOR,
            password=PASSWORD,
            sites=["SITE-A"],
        )
        await conn.commit()
    async with db.connection(trial.url) as conn:
        await schedules.set_schedule(
            conn,
            "S1",
            "heart_rate",
            Expectation(ScheduleKind.CONTINUOUS, rate_hz=1.0, wear_hours=12),
            effective_from=date(2026, 1, 1),
            actor="admin",
        )
        await conn.commit()
    t0 = now_ms() - 60_000
    publish(probe, trial, 1, [70.0, 71.0, 72.0], t0=t0)
    await wait_until(has(trial.url, "SELECT count(*) FROM envelopes", 1), "stored")
    async with db.connection(trial.url) as conn:
        await adherence.refresh(conn)
    resp = await web.call(
        "monitor",
        "POST",
        "/api/v1/participants/P1/queries",
        json={
            "target": "range",
            "metric": "heart_rate",
            "from": datetime.fromtimestamp(t0 / 1000, UTC).isoformat(),
            "to": datetime.fromtimestamp((t0 + 2000) / 1000, UTC).isoformat(),
            "text": "Only three readings?",
        },
    )
    assert resp.status == 201, await resp.text()

    await browser.sign_in("/sites/SITE-A", "coord2", PASSWORD)
    await browser.css("#main table")
    who = await browser.run(lambda d: d.find_element(By.CSS_SELECTOR, "header .who").text)
    assert evil in who
    assert await browser.run(lambda d: d.execute_script("return window.__pwned")) is None
    # The cohort at a glance: P1's newest reading a minute ago, a query awaiting the site's
    # answer, today's adherence; no alert column for a site coordinator.
    cohort = await browser.run(
        lambda d: d.execute_script(
            """
            const row = document.querySelector('tr.cohort-row[data-participant="P1"]');
            const cell = (c) => row.querySelector(c).textContent;
            return {
              headers: [...row.closest('table').querySelectorAll('th')].map((h) => h.textContent),
              last: cell('td.last-data'), queries: cell('td.queries'),
              adherence: cell('td.adherence'), alerts: row.querySelector('td.alerts'),
            };
            """
        )
    )
    assert cohort["headers"] == [
        "Participant",
        "Consent",
        "Last data",
        "Data queries",
        "Adherence today",
        "Active hubs",
        "",
    ]
    assert cohort["last"].endswith(" ago")
    assert cohort["queries"] == "1 open"
    assert cohort["adherence"].endswith("met in full")
    assert cohort["alerts"] is None

    await browser.run(lambda d: d.find_element(By.ID, "new-participant").send_keys("P7"))
    await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, "form.inline button[type=submit]").click()
    )
    await browser.wait_for(
        "P7 in the participant list",
        lambda d: "P7" in d.find_element(By.CSS_SELECTOR, "#main table").text,
    )
    await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, "#code-participant").send_keys("P1")
    )
    await browser.run(
        lambda d: d.find_elements(By.CSS_SELECTOR, "form.inline button[type=submit]")[1].click()
    )
    code = await browser.wait_for(
        "an enrollment code", lambda d: d.find_element(By.ID, "code").text or None
    )
    assert "valid until" in code
    # The code list reloads with the new code in it, made by this user and not yet used.
    codes = await browser.wait_for(
        "the new code in the list",
        lambda d: next(
            (
                s.text
                for s in d.find_elements(By.CSS_SELECTOR, "section.card")
                if s.text.startswith("Enrollment codes") and "coord2" in s.text
            ),
            None,
        ),
    )
    assert "not yet" in codes
    # The same code as a QR image drawn by the gateway (an SVG data URI, nothing fetched).
    qr = await browser.css("img#code-qr")
    src = await browser.run(lambda _: qr.get_attribute("src"))
    assert src.startswith("data:image/svg+xml")
    assert await browser.wait_for(
        "the QR image decoded", lambda d: d.execute_script("return arguments[0].naturalWidth", qr)
    )
    assert code.split()[0] in await browser.run(lambda _: qr.get_attribute("alt"))
    assert await browser.run(lambda d: d.switch_to.active_element.get_attribute("id")) == "code"
    await browser.screenshot("site-page.png")

    await browser.run(lambda d: d.delete_all_cookies())
    await browser.sign_in("/participants/P1", "participant", PASSWORD)
    await browser.wait_for(
        "the envelope received",
        lambda d: (
            "hub-1" in d.find_element(By.ID, "main").text
            and "Consent history" in d.find_element(By.ID, "main").text
        ),
    )
    await browser.screenshot("participant-page.png")
    # No card shows its title twice (a heading, and a table caption saying the same).
    doubled = await browser.run(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('section.card')].filter((s) =>"
            " [...s.querySelectorAll('caption')].some((c) =>"
            " c.textContent === s.querySelector('h2').textContent)).length"
        )
    )
    assert doubled == 0


async def test_live_view_marks_the_readings_the_device_doubted(
    web: Web, browser: Browser, probe: MqttProbe
) -> None:
    """A questionable reading is a hollow circle on the line, an invalid one a cross off it
    (and off the scale), each listed with a badge and its flags in words; context alone is
    listed as text; clean readings are neither marked nor listed."""
    trial = web.trial
    hub = trial.hubs["hub-1"]
    t0 = now_ms() - 200_000
    statuses: list[tuple[float, tuple[str, ...]]] = [
        (70.0, ()),
        (72.0, ()),
        (71.0, ()),
        (74.0, ("body_movement", "poor_signal")),
        (73.0, ()),
        (20.0, ("no_sensor_contact",)),
        (75.0, ("location_finger",)),
        (74.0, ()),
        (76.0, ()),
    ]
    t = [t0 + i * 20_000 for i in range(len(statuses))]
    readings = tuple(
        Reading(at, "heart_rate", v, "/min", "hr-strap-1", flags)
        for at, (v, flags) in zip(t, statuses, strict=True)
    )
    probe.publish(
        up_topic(hub.device_id),
        seal(Payload(dev=hub.device_id, seq=1, sent_ms=now_ms(), readings=readings), hub.key),
    )
    # The participant lives in Berlin: times are shown in their zone, beside UTC.
    async with db.connection(trial.url, autocommit=True) as conn:
        await time_zones.set_time_zone(
            conn, "P1", "Europe/Berlin", datetime(2020, 1, 1, tzinfo=UTC), actor="tester"
        )
    await browser.sign_in("/participants/P1/live", "clinician", PASSWORD)
    await browser.css("#latest-heart_rate[data-value='76']")
    await browser.css("#said-heart_rate tr.said-row")

    def clock(t_ms: int) -> str:
        at = datetime.fromtimestamp(t_ms / 1000, UTC)
        local = at.astimezone(ZoneInfo("Europe/Berlin"))
        return f"{local:%H:%M:%S} Europe/Berlin ({at:%H:%M:%S} UTC)"

    async def zoned() -> bool:
        latest = await browser.run(
            lambda d: d.find_element(By.ID, "latest-heart_rate").text  # type: ignore[no-any-return]
        )
        return "Europe/Berlin" in str(latest)

    await wait_until(zoned, "times shown in the participant's zone")

    def page_state(d: webdriver.Chrome) -> dict[str, Any]:
        return d.execute_script(  # type: ignore[no-any-return]
            """
            const chart = document.querySelector('#live-heart_rate svg');
            const text = (n) => n ? n.textContent : null;
            return {
              count: document.querySelector('#live-heart_rate').dataset.count,
              marks: [...chart.querySelectorAll('g.mark')].map((g) => [
                g.getAttribute('class'), Number(g.dataset.t),
                g.firstElementChild.tagName, text(g.querySelector('title')).split(': ').pop()]),
              line: [...chart.querySelectorAll('polyline.line')].map(
                (l) => l.getAttribute('points').split(' ').length),
              scale: [...chart.querySelectorAll('text.axis')].slice(0, 2).map(text),
              rows: [...document.querySelectorAll('#said-heart_rate tr.said-row')].map((r) => [
                Number(r.dataset.t), r.getAttribute('class'),
                text(r.querySelector('.badge')), text(r.querySelector('.said'))]),
              measured: [...document.querySelectorAll('#said-heart_rate tr.said-row')].map(
                (r) => text(r.querySelector('td'))),
              legend: text(document.querySelector('#metric-heart_rate .legend')),
              latest: document.querySelector('#latest-heart_rate').textContent,
              styles: ['invalid', 'questionable'].map((q) => {
                const s = getComputedStyle(document.querySelector(`.badge.quality-${q}`));
                return [s.backgroundColor, s.borderStyle];
              }),
            };
            """,
            t[-1],
        )

    state = await browser.run(page_state)
    assert state["count"] == "9"
    assert state["marks"] == [
        [
            "mark mark-questionable",
            t[3],
            "circle",
            "74 /min, questionable (body movement, poor signal)",
        ],
        ["mark mark-invalid", t[5], "path", "20 /min, invalid (no sensor contact)"],
    ]
    # The invalid reading is left out of the line and of the scale.
    assert state["line"] == [8]
    assert state["scale"] == ["76", "70"]
    assert state["rows"] == [
        [t[6], "said-row quality-info", None, "location finger"],
        [
            t[5],
            "said-row quality-invalid",
            f"{CROSS} invalid",
            f"{CROSS} invalid no sensor contact",
        ],
        [
            t[3],
            "said-row quality-questionable",
            f"{CIRCLE} questionable",
            f"{CIRCLE} questionable body movement, poor signal",
        ],
    ]
    assert state["legend"] == (
        f"On the chart: {CIRCLE} questionable the device doubted the reading; {CROSS} invalid"
        " the device says it is not a measurement (not joined to the line)."
    )
    # The newest reading is clean: its value and time, nothing more; times are the
    # participant's, beside UTC.
    assert state["latest"] == f"76 /min at {clock(t[-1])}"
    assert state["measured"] == [clock(t[6]), clock(t[5]), clock(t[3])]
    # Invalid and questionable badges differ in fill and border, not in colour alone.
    (invalid_bg, invalid_border), (questionable_bg, questionable_border) = state["styles"]
    assert invalid_bg != questionable_bg
    assert (invalid_border, questionable_border) == ("none", "dashed")
    await browser.screenshot("clinician-live-doubted.png")
