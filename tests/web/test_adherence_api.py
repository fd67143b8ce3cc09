"""The adherence API: a participant's days, one day's detail with its gaps, a site's cohort."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, date, datetime, timedelta

from psycopg_pool import AsyncConnectionPool

from ingest.model import AcceptedEnvelope, Batch, Gap, Reading
from storage import adherence, db, schedules
from storage.migrate import StorageMode
from storage.schedules import Expectation, ScheduleKind
from storage.writer import BulkWriter
from tests.web.conftest import Web


async def hour_of_heart_rate(web: Web, pool: AsyncConnectionPool, mode: StorageMode) -> int:
    """P1 wore the strap for the last hour (one reading a minute), then lost it for ten
    minutes; the study expects 12 hours a day. Returns the first reading's time."""
    url = web.trial.url
    now_ms = int(time.time() * 1000) // 60_000 * 60_000
    # The hour and the gap after it fall in one UTC day: in the first 70 minutes of a day
    # they end at its midnight instead.
    if now_ms % 86_400_000 < 70 * 60_000:
        now_ms -= now_ms % 86_400_000
    first = now_ms - 70 * 60_000
    readings = tuple(
        Reading(first + i * 60_000, "heart_rate", 70.0, "/min", "strap") for i in range(60)
    )
    gap = Gap(first + 60 * 60_000, now_ms, "out_of_range", "strap")
    env = AcceptedEnvelope(
        dev="hub-1",
        seq=1,
        participant_id="P1",
        sent_ms=now_ms,
        envelope_sha256=hashlib.sha256(b"P1/1").digest(),
        reading_count=len(readings),
        readings=readings,
        consent_ids=(None,) * len(readings),
        gaps=(gap,),
    )
    async with db.connection(url) as conn:
        await schedules.set_schedule(
            conn,
            "S1",
            "heart_rate",
            Expectation(ScheduleKind.CONTINUOUS, rate_hz=1.0, wear_hours=12),
            effective_from=date(2026, 1, 1),
            actor="admin",
        )
        await conn.commit()
    await BulkWriter(pool, mode).write(Batch((env,), (), now_ms))
    async with db.connection(url) as conn:
        await adherence.refresh(conn)
    return first


async def test_a_participants_days_and_one_days_gaps(
    web: Web, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    first = await hour_of_heart_rate(web, pool, storage_mode)
    resp = await web.call("monitor", "GET", "/api/v1/participants/P1/adherence")
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    today = datetime.now(UTC).date()
    assert (body["from"], body["to"]) == (
        (today - timedelta(days=13)).isoformat(),
        today.isoformat(),
    )
    hr = [m for d in body["days"] for m in d["metrics"] if m["metric"] == "heart_rate"]
    assert sum(m["worn_minutes"] for m in hr) == 60
    assert sum(m["readings"] for m in hr) == 60
    assert all(m["kind"] == "continuous" for m in hr)
    # Before consent (a day ago) nothing was expected; since, 12 h a day prorated.
    assert all(m["adherence"] is None for m in hr if m["study_minutes"] == 0)

    day = datetime.fromtimestamp(first / 1000, UTC).date().isoformat()
    resp = await web.call("clinician", "GET", f"/api/v1/participants/P1/adherence/{day}")
    assert resp.status == 200, await resp.text()
    detail = await resp.json()
    assert [m["metric"] for m in detail["metrics"]] == ["heart_rate"]
    assert [(g["sensor"], g["reason"]) for g in detail["gaps"]] == [("strap", "out_of_range")]
    assert 0 < detail["gaps"][0]["minutes"] <= 10


async def test_a_sites_cohort_lists_its_own_participants_only(
    web: Web, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    await hour_of_heart_rate(web, pool, storage_mode)
    today = datetime.now(UTC).date()
    span = f"from={(today - timedelta(days=2)).isoformat()}&to={today.isoformat()}"
    resp = await web.call("coordinator", "GET", f"/api/v1/sites/SITE-A/adherence?{span}")
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert [p["participant_id"] for p in body["participants"]] == ["P1"]
    cells = body["participants"][0]["days"]
    assert [c["day"] for c in cells] == [(today - timedelta(days=d)).isoformat() for d in (2, 1, 0)]
    assert cells[0]["adherence"] is None  # two days ago: before P1's consent
    assert cells[-1]["metrics_expected"] == 1
    resp = await web.call("other_coordinator", "GET", f"/api/v1/sites/SITE-A/adherence?{span}")
    assert resp.status == 404
