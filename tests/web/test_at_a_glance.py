"""What a monitor or a site needs at a glance, through the API, on hand-made data: an alert
with the value, bound and duration that opened it and the participant's latest value; a
wearable's "last seen" as its newest reading, not its hub's last report; a site's cohort with
each participant's newest reading, unresolved alerts, open queries and today's adherence."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from ingest.model import AcceptedEnvelope, Batch, Reading, SensorReport
from ingest.rules import Change, RuleEvent, RuleKind, Severity
from storage import adherence, alerts, db, schedules
from storage.migrate import StorageMode
from storage.schedules import Expectation, ScheduleKind
from storage.timeconv import from_ms
from storage.writer import BulkWriter
from tests.web.conftest import Web

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE


def now_ms() -> int:
    return int(time.time()) * SECOND


def iso(t_ms: int) -> str:
    return from_ms(t_ms).isoformat()


class Hubs:
    """Envelopes of hand-made readings and sensor reports, stored through the writer as the
    gateway stores them (without judging alert rules)."""

    def __init__(self, pool: AsyncConnectionPool, mode: StorageMode) -> None:
        self.writer = BulkWriter(pool, mode)
        self.seq: dict[str, int] = {}

    async def send(
        self,
        pid: str,
        hub: str,
        readings: list[Reading],
        *,
        received_ms: int,
        reports: tuple[SensorReport, ...] = (),
    ) -> None:
        seq = self.seq[hub] = self.seq.get(hub, 0) + 1
        env = AcceptedEnvelope(
            dev=hub,
            seq=seq,
            participant_id=pid,
            sent_ms=received_ms - SECOND,
            envelope_sha256=hashlib.sha256(f"{hub}/{seq}".encode()).digest(),
            reading_count=len(readings),
            readings=tuple(readings),
            consent_ids=(None,) * len(readings),
            sensors=reports,
        )
        await self.writer.write(Batch((env,), (), received_ms))


def hr(t_ms: int, value: float, sensor: str = "strap") -> Reading:
    return Reading(t_ms, "heart_rate", value, "/min", sensor)


async def open_alert(
    web: Web,
    *,
    name: str,
    metric: str,
    first_ms: int,
    at_ms: int,
    value: float | None,
    kind: RuleKind = RuleKind.RANGE,
    high: float | None = None,
    sustained_s: int = 0,
    participant_id: str = "P1",
) -> int:
    """A rule and an alert it opened: its episode from ``first_ms``, met at ``at_ms`` by
    ``value``, as the alert engine records it."""
    async with db.connection(web.trial.url) as conn:
        rule = await alerts.add_rule(
            conn,
            study_id="S1",
            name=name,
            metric=metric,
            kind=kind,
            high=high,
            sustained_s=sustained_s,
            severity=Severity.CRITICAL,
            created_by="tester",
        )
        async with conn.transaction():
            (event,) = await alerts.apply_events(
                conn,
                [RuleEvent(Change.OPENED, rule.rule_id, participant_id, at_ms, first_ms, value)],
                {rule.rule_id: rule},
                now_ms(),
            )
        await conn.commit()
    return event.alert_id


async def get(web: Web, key: str, path: str) -> Any:
    resp = await web.call(key, "GET", path)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_an_alert_carries_the_values_that_opened_it_and_the_latest_value(
    web: Web, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    now = now_ms()
    t0 = now - 10 * MINUTE
    # Heart rate above 120 for a minute from t0 (every 10 s), then back to 96 by now.
    run = [
        hr(t0 + i * 10 * SECOND, v)
        for i, v in enumerate([131.0, 140.0, 152.0, 149.0, 150.0, 147.0, 152.0])
    ]
    latest = hr(now - 2 * SECOND, 96.0)
    await Hubs(pool, storage_mode).send("P1", "hub-1", [*run, latest], received_ms=now)
    tachycardia = await open_alert(
        web,
        name="tachycardia",
        metric="heart_rate",
        high=120.0,
        sustained_s=60,
        first_ms=t0,
        at_ms=t0 + 60 * SECOND,
        value=152.0,
    )
    # No SpO2 at all for 15 minutes since the baseline: a missing-data alert, no value.
    silent_since = now - 20 * MINUTE
    silence = await open_alert(
        web,
        name="no spo2",
        metric="spo2",
        kind=RuleKind.MISSING_DATA,
        sustained_s=900,
        first_ms=silent_since,
        at_ms=silent_since + 900 * SECOND,
        value=None,
    )

    listed = {a["alert_id"]: a for a in (await get(web, "monitor", "/api/v1/alerts"))["alerts"]}
    got = listed[tachycardia]
    assert {k: got[k] for k in ("rule", "metric", "severity", "kind")} == {
        "rule": "tachycardia",
        "metric": "heart_rate",
        "severity": "critical",
        "kind": "range",
    }
    # The value that met the rule, the bound it crossed, the rule's duration, when it was met
    # and how long the condition had held by then.
    assert (got["value"], got["unit"], got["low"], got["high"]) == (152.0, "/min", None, 120.0)
    assert (got["sustained_s"], got["held_s"]) == (60, 60.0)
    assert (got["first_time"], got["condition_time"]) == (iso(t0), iso(t0 + 60 * SECOND))
    assert got["cleared_time"] is None
    # The participant's value now: the newest reading of the metric, whatever the alert.
    assert got["latest"] == {
        "time": iso(latest.t_ms),
        "value": 96.0,
        "unit": "/min",
        "flags": [],
        "quality": None,
    }

    quiet = listed[silence]
    assert (quiet["kind"], quiet["value"], quiet["high"], quiet["low"]) == (
        "missing_data",
        None,
        None,
        None,
    )
    assert (quiet["sustained_s"], quiet["held_s"], quiet["unit"]) == (900, 900.0, "%")
    assert quiet["latest"] is None

    # The same on the alert's own page and in what the clinician reads.
    one = await get(web, "clinician", f"/api/v1/alerts/{tachycardia}")
    assert one["alert"] == got


async def test_a_wearables_last_seen_is_its_last_reading_not_its_hubs_last_report(
    web: Web, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    now = now_ms()
    two_hours_ago = now - 2 * HOUR
    hubs = Hubs(pool, storage_mode)
    # Two hours ago the hub reported its three wearables (the strap, an oximeter clip and a
    # cuff that never measured), with a heart rate and an SpO2 reading.
    await hubs.send(
        "P1",
        "hub-1",
        [hr(two_hours_ago, 70.0), Reading(two_hours_ago, "spo2", 97.0, "%", "clip")],
        received_ms=two_hours_ago,
        reports=(
            SensorReport("strap", model="H10", battery_level=80),
            SensorReport("clip", model="PO3"),
            SensorReport("cuff", model="BP5"),
        ),
    )
    # Since, the strap streamed (one reading a second for the last 10 minutes, the newest 1 s
    # ago) and the clip sent one more reading an hour ago; no report came with them, nor
    # for a scale the hub never described.
    stream = [hr(now - 600 * SECOND + i * SECOND, 70.0 + i % 5) for i in range(600)]
    await hubs.send(
        "P1",
        "hub-1",
        [
            Reading(now - HOUR, "spo2", 96.0, "%", "clip"),
            Reading(now - 30 * MINUTE, "body_weight", 71.5, "kg", "scale"),
        ],
        received_ms=now,
    )
    await hubs.send("P1", "hub-1", stream, received_ms=now)

    body = await get(web, "clinician", "/api/v1/participants/P1")
    (hub,) = body["devices"]
    seen = {s["sensor"]: (s["last_seen"], s["last_report"]) for s in hub["sensors"]}
    assert seen == {
        "strap": (iso(stream[-1].t_ms), iso(two_hours_ago)),
        "clip": (iso(now - HOUR), iso(two_hours_ago)),
        "cuff": (None, iso(two_hours_ago)),
        "scale": (iso(now - 30 * MINUTE), None),
    }
    assert [s["sensor"] for s in hub["sensors"]] == ["clip", "cuff", "scale", "strap"]
    scale = hub["sensors"][2]
    assert (scale["model"], scale["battery_level"], scale["first_seen"]) == (None, None, None)
    # The site's device list says the same.
    site = await get(web, "coordinator", "/api/v1/sites/SITE-A")
    (p1,) = [p for p in site["participants"] if p["participant_id"] == "P1"]
    assert p1["devices"] == body["devices"]


async def test_a_sites_cohort_shows_last_data_open_alerts_and_queries_and_todays_adherence(
    web: Web, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    trial = web.trial
    await trial.add_participant("P3", "hub-3")  # enrolled, consented, nothing sent yet
    now = now_ms() // MINUTE * MINUTE
    async with db.connection(trial.url) as conn:
        await schedules.set_schedule(
            conn,
            "S1",
            "heart_rate",
            Expectation(ScheduleKind.CONTINUOUS, rate_hz=1 / 60, wear_hours=12),
            effective_from=date(2026, 1, 1),
            actor="admin",
        )
        await conn.commit()
    # P1 wore the strap for the last half hour, one reading a minute; P2 (site B) too.
    hubs = Hubs(pool, storage_mode)
    worn = [hr(now - (30 - i) * MINUTE, 72.0) for i in range(30)]
    await hubs.send("P1", "hub-1", worn, received_ms=now)
    await hubs.send("P2", "hub-2", [hr(now - MINUTE, 80.0)], received_ms=now)
    async with db.connection(trial.url) as conn:
        await adherence.refresh(conn)

    # P1: two alerts unresolved (one open, one acknowledged), one resolved; P2 one open.
    ids = [
        await open_alert(
            web, name=f"hr-{i}", metric="heart_rate", high=120.0, first_ms=now, at_ms=now, value=130
        )
        for i in range(3)
    ]
    second, third = ids[1], ids[2]
    async with db.connection(trial.url) as conn:
        await alerts.acknowledge(conn, second, by="monitor")
        await alerts.acknowledge(conn, third, by="monitor")
        await alerts.resolve(conn, third, by="monitor")
    await web.new_alert("P2")
    # P1: a query awaiting the site's answer, one answered, one closed.
    opened = []
    for text in ("Why so flat?", "Strap off at lunch?", "Duplicate?"):
        resp = await web.call(
            "monitor",
            "POST",
            "/api/v1/participants/P1/queries",
            json={
                "target": "range",
                "metric": "heart_rate",
                "from": iso(now - 20 * MINUTE),
                "to": iso(now - 10 * MINUTE),
                "text": text,
            },
        )
        assert resp.status == 201, await resp.text()
        opened.append((await resp.json())["query_id"])
    for key, action, qid in (("clinician", "answer", opened[1]), ("monitor", "close", opened[2])):
        resp = await web.call(key, "POST", f"/api/v1/queries/{qid}/{action}", json={"text": "ok"})
        assert resp.status == 200, await resp.text()

    today = datetime.now(UTC).date()
    heat = await get(web, "monitor", f"/api/v1/sites/SITE-A/adherence?from={today}&to={today}")
    cells = {p["participant_id"]: p["days"][0] for p in heat["participants"]}

    body = await get(web, "monitor", "/api/v1/sites/SITE-A")
    rows = {p["participant_id"]: p for p in body["participants"]}
    assert sorted(rows) == ["P1", "P3"]  # P2 is site B's
    p1, p3 = rows["P1"], rows["P3"]
    assert p1["last_reading"] == iso(worn[-1].t_ms)
    assert (p1["unresolved_alerts"], p1["open_queries"], p1["answered_queries"]) == (2, 1, 1)
    assert p1["consent"]["action"] == "consent"
    assert p3["last_reading"] is None
    assert (p3["unresolved_alerts"], p3["open_queries"], p3["answered_queries"]) == (0, 0, 0)
    # Today's adherence (the UTC date's), as the heat map has it: one metric expected.
    for pid in ("P1", "P3"):
        cell = cells[pid]
        assert rows[pid]["adherence_today"] == {
            "day": today.isoformat(),
            # Today counts up to now: read a moment later, a little more was expected.
            "adherence": pytest.approx(cell["adherence"], rel=1e-3),
            "metrics_expected": cell["metrics_expected"],
            "metrics_met": cell["metrics_met"],
        }
        assert cell["metrics_expected"] == 1
    assert p3["adherence_today"]["adherence"] == 0
    midnight = datetime.combine(today, datetime.min.time(), UTC)
    # Worn minutes today against 12 hours a day, prorated to the part of today gone by (P1
    # consented yesterday).
    worn_today = sum(1 for r in worn if from_ms(r.t_ms) >= midnight)
    so_far = (datetime.now(UTC) - midnight) / timedelta(days=1)
    assert p1["adherence_today"]["adherence"] == pytest.approx(
        min(1.0, worn_today / (12 * 60 * so_far)), rel=1e-2
    )

    # A site coordinator does not see alerts: no count of them either.
    coordinated = await get(web, "coordinator", "/api/v1/sites/SITE-A")
    assert [p["unresolved_alerts"] for p in coordinated["participants"]] == [None, None]
    assert [p["open_queries"] for p in coordinated["participants"]] == [1, 0]
