"""Adherence for a scripted week, against figures counted by hand (docs/adherence.md).

Participant P2 lives in Europe/Berlin and consents on Monday 2026-03-23 at 09:00 local; the
week ends on Sunday 2026-03-29, when Berlin's clocks go from 02:00 to 03:00 (a 23-hour
day). The study expects heart rate as a continuous stream (1 Hz, worn 12 hours a day) and
glucose four times a day; arm B is exempt from glucose, and P3 (arm B) wears the strap 24
hours a day by a participant override.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from psycopg_pool import AsyncConnectionPool

from ingest.model import AcceptedEnvelope, Batch, Gap, Reading
from storage import adherence, db, schedules, time_zones
from storage.adherence import MetricDay
from storage.migrate import StorageMode
from storage.schedules import Expectation, ScheduleError, ScheduleKind
from storage.writer import BulkWriter
from tests.fixtures.trial import Trial

BERLIN = ZoneInfo("Europe/Berlin")
MONDAY = date(2026, 3, 23)
SUNDAY = date(2026, 3, 29)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_seq = itertools.count(1)


def at(day: date, hh: int, mm: int = 0) -> int:
    """Milliseconds of a Berlin wall-clock time."""
    return int(datetime(day.year, day.month, day.day, hh, mm, tzinfo=BERLIN).timestamp() * 1000)


def minutes(day: date, start: tuple[int, int], end: tuple[int, int]) -> list[int]:
    """One time per minute from ``start`` to ``end`` (exclusive), Berlin wall clock."""
    t, stop = at(day, *start), at(day, *end) if end != (24, 0) else at(day + timedelta(1), 0)
    return list(range(t, stop, 60_000))


def hr(times: Iterable[int], flags: tuple[str, ...] = ()) -> list[Reading]:
    return [Reading(t, "heart_rate", 70.0, "/min", "strap", flags) for t in times]


def glucose(day: date, *hours: int, flags: tuple[str, ...] = ()) -> list[Reading]:
    return [Reading(at(day, h), "glucose", 100.0, "mg/dL", "meter", flags) for h in hours]


async def store(
    pool: AsyncConnectionPool,
    mode: StorageMode,
    participant: str,
    readings: list[Reading],
    gaps: tuple[Gap, ...] = (),
) -> None:
    seq = next(_seq)
    env = AcceptedEnvelope(
        dev=f"hub-{participant}",
        seq=seq,
        participant_id=participant,
        sent_ms=max([r.t_ms for r in readings] + [g.to_ms for g in gaps]) + 1000,
        envelope_sha256=hashlib.sha256(f"{participant}/{seq}".encode()).digest(),
        reading_count=len(readings),
        readings=tuple(readings),
        consent_ids=(None,) * len(readings),
        gaps=gaps,
    )
    received = at(SUNDAY, 23) + 3_600_000
    await BulkWriter(pool, mode).write(Batch(accepted=(env,), rejected=(), received_ms=received))


async def refresh(url: str) -> None:
    async with db.connection(url) as conn:
        await adherence.refresh(conn)


async def week(url: str, participant: str) -> dict[tuple[date, str], MetricDay]:
    async with db.connection(url) as conn:
        rows = await adherence.days(conn, [participant], MONDAY, SUNDAY)
    return {(r.day, r.metric): r for r in rows}


@pytest.fixture
async def study(trial: Trial) -> Trial:
    consent = datetime(2026, 3, 23, 9, tzinfo=BERLIN)
    await trial.add_participant("P2", "hub-P2", consent_at=consent, enrolled_at=consent)
    await trial.add_participant("P3", "hub-P3", consent_at=consent, enrolled_at=consent)
    async with db.connection(trial.url) as conn:
        for p in ("P2", "P3"):
            await time_zones.set_time_zone(
                conn, p, "Europe/Berlin", datetime(2026, 1, 1, tzinfo=UTC), actor="coord"
            )
        await schedules.set_arm(conn, "P3", "B", actor="coord")
        plan = (
            ("heart_rate", Expectation(ScheduleKind.CONTINUOUS, rate_hz=1.0, wear_hours=12), {}),
            ("glucose", Expectation(ScheduleKind.SPOT, per_day=4), {}),
            ("glucose", Expectation(ScheduleKind.NONE), {"arm": "B"}),
            (
                "heart_rate",
                Expectation(ScheduleKind.CONTINUOUS, rate_hz=1.0, wear_hours=24),
                {"participant_id": "P3"},
            ),
        )
        for metric, expectation, scope in plan:
            await schedules.set_schedule(
                conn,
                trial.study_id,
                metric,
                expectation,
                effective_from=date(2026, 1, 1),
                actor="dm",
                **scope,
            )
        await conn.commit()
    return trial


async def test_a_scripted_week_matches_the_hand_counted_figures(
    study: Trial, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    url, mode = study.url, storage_mode
    tue, wed, fri, sat = (MONDAY + timedelta(d) for d in (1, 2, 4, 5))
    # Monday: worn 09:00-17:00 (480 min); the study began at 09:00, so 900 of the day's 1440
    # minutes count: 12 h x 900/1440 = 450 min expected. Glucose: 4 x 900/1440 -> 2.
    await store(pool, mode, "P2", hr(minutes(MONDAY, (9, 0), (17, 0))))
    await store(pool, mode, "P2", glucose(MONDAY, 12, 18))
    # Tuesday: worn 08:00-14:00 (360 of 720), then out of range 14:00-16:00 (a gap).
    out_of_range = Gap(at(tue, 14), at(tue, 16), "out_of_range", "strap")
    await store(pool, mode, "P2", hr(minutes(tue, (8, 0), (14, 0))), (out_of_range,))
    await store(pool, mode, "P2", glucose(tue, 7, 12, 19))
    # Wednesday: 08:00-10:00 without sensor contact (invalid), 10:00-19:00 worn (540 of 720).
    # Glucose four times and a strip error: four done.
    await store(pool, mode, "P2", hr(minutes(wed, (8, 0), (10, 0)), ("no_sensor_contact",)))
    await store(pool, mode, "P2", hr(minutes(wed, (10, 0), (19, 0))))
    await store(pool, mode, "P2", glucose(wed, 7, 12, 17, 21))
    await store(pool, mode, "P2", glucose(wed, 8, flags=("strip_insertion_error",)))
    # Thursday: nothing. Saturday: 12:00-24:00 (720) and Sunday's first five minutes.
    await store(
        pool, mode, "P2", hr(minutes(sat, (12, 0), (24, 0)) + minutes(SUNDAY, (0, 0), (0, 5)))
    )
    # Sunday (23 hours long): 04:00-10:00 local (360) + 5 = 365 of 720.
    await store(pool, mode, "P2", hr(minutes(SUNDAY, (4, 0), (10, 0))))
    # P3: a full 23-hour Sunday is expected of a 24-hour wear schedule.
    await store(pool, mode, "P3", hr(minutes(SUNDAY, (0, 0), (24, 0))))
    await refresh(url)

    days = await week(url, "P2")
    hr_of = {d: days[(d, "heart_rate")] for d in (MONDAY + timedelta(i) for i in range(7))}
    assert hr_of[MONDAY].study_minutes == 900
    assert hr_of[MONDAY].expected_minutes == pytest.approx(450)
    assert (hr_of[MONDAY].worn_minutes, hr_of[MONDAY].adherence) == (480, 1.0)
    assert (hr_of[tue].worn_minutes, hr_of[tue].adherence) == (360, 0.5)
    assert (hr_of[wed].readings, hr_of[wed].invalid, hr_of[wed].worn_minutes) == (660, 120, 540)
    assert hr_of[wed].adherence == pytest.approx(0.75)
    assert hr_of[wed].completeness == pytest.approx(540 / (720 * 60))
    assert (hr_of[MONDAY + timedelta(3)].worn_minutes, hr_of[MONDAY + timedelta(3)].adherence) == (
        0,
        0.0,
    )
    assert hr_of[fri].adherence == 0.0  # nothing yet: Friday comes late, below
    assert (hr_of[sat].worn_minutes, hr_of[sat].adherence) == (720, 1.0)
    assert hr_of[SUNDAY].worn_minutes == 365
    assert hr_of[SUNDAY].adherence == pytest.approx(365 / 720)

    glucose_of = {d: days[(d, "glucose")] for d in (MONDAY, tue, wed, fri)}
    assert (glucose_of[MONDAY].expected_count, glucose_of[MONDAY].adherence) == (2, 1.0)
    assert (glucose_of[tue].expected_count, glucose_of[tue].adherence) == (4, 0.75)
    assert (glucose_of[wed].readings, glucose_of[wed].invalid) == (5, 1)
    assert glucose_of[wed].adherence == 1.0
    assert glucose_of[fri].adherence == 0.0

    async with db.connection(url) as conn:
        gaps = await adherence.gap_minutes(conn, "P2", tue)
    assert [(g.sensor, g.reason, g.minutes) for g in gaps] == [("strap", "out_of_range", 120)]

    # Friday's readings arrive late (a hub back online): the day is counted when they do.
    await store(pool, mode, "P2", hr(minutes(fri, (6, 0), (18, 0))))
    await refresh(url)
    assert (await week(url, "P2"))[(fri, "heart_rate")].adherence == 1.0

    p3 = await week(url, "P3")
    assert p3[(SUNDAY, "heart_rate")].expected_minutes == pytest.approx(23 * 60)
    assert p3[(SUNDAY, "heart_rate")].adherence == 1.0
    assert (SUNDAY, "glucose") not in p3 or p3[(SUNDAY, "glucose")].adherence is None

    async with db.connection(url) as conn:
        cells = {
            (c.participant_id, c.day): c
            for c in await adherence.cohort(conn, ["P2", "P3"], MONDAY, SUNDAY)
        }
    assert cells[("P2", MONDAY)].adherence == 1.0
    assert cells[("P2", tue)].adherence == pytest.approx((0.5 + 0.75) / 2)
    assert (cells[("P2", tue)].metrics_expected, cells[("P2", tue)].metrics_met) == (2, 0)
    assert (cells[("P3", SUNDAY)].metrics_expected, cells[("P3", SUNDAY)].adherence) == (1, 1.0)


async def test_before_consent_nothing_is_expected(study: Trial) -> None:
    async with db.connection(study.url) as conn:
        rows = await adherence.days(conn, ["P2"], MONDAY - timedelta(2), MONDAY - timedelta(1))
        cells = await adherence.cohort(conn, ["P2"], MONDAY - timedelta(2), MONDAY - timedelta(1))
    assert rows
    assert all(r.study_minutes == 0 and r.adherence is None for r in rows)
    assert all(c.adherence is None and c.metrics_expected == 0 for c in cells)


async def test_a_time_zone_change_moves_readings_to_their_new_local_day(
    study: Trial, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    # 23:30 UTC on Tuesday is 00:30 on Wednesday in Berlin, but Tuesday in New York.
    late = int(datetime(2026, 3, 24, 23, 30, tzinfo=UTC).timestamp() * 1000)
    await store(pool, storage_mode, "P2", hr([late]))
    await refresh(study.url)
    assert (await week(study.url, "P2"))[(date(2026, 3, 25), "heart_rate")].worn_minutes == 1
    async with db.connection(study.url) as conn:
        await time_zones.set_time_zone(
            conn, "P2", "America/New_York", datetime(2026, 1, 1, tzinfo=UTC), actor="coord"
        )
        await conn.commit()
    await refresh(study.url)
    days = await week(study.url, "P2")
    assert days[(date(2026, 3, 24), "heart_rate")].worn_minutes == 1
    assert days[(date(2026, 3, 25), "heart_rate")].worn_minutes == 0


async def test_a_replayed_batch_counts_once(
    study: Trial, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    readings = hr(minutes(MONDAY, (10, 0), (10, 30)))
    await store(pool, storage_mode, "P2", readings)
    # A hub's replay is the same (device, seq) again: stored once, counted once.
    seq = next(_seq)
    env = AcceptedEnvelope(
        dev="hub-P2",
        seq=seq,
        participant_id="P2",
        sent_ms=readings[-1].t_ms + 1000,
        envelope_sha256=hashlib.sha256(b"replay").digest(),
        reading_count=len(readings),
        readings=tuple(readings),
        consent_ids=(None,) * len(readings),
    )
    writer = BulkWriter(pool, storage_mode)
    for _ in range(2):
        await writer.write(Batch(accepted=(env,), rejected=(), received_ms=at(SUNDAY, 23)))
    await refresh(study.url)
    day = (await week(study.url, "P2"))[(MONDAY, "heart_rate")]
    assert (day.readings, day.worn_minutes) == (60, 30)


@pytest.mark.parametrize(
    ("metric", "expectation", "scope", "message"),
    [
        ("steps", Expectation(ScheduleKind.NONE), {}, "unknown metric"),
        (
            "glucose",
            Expectation(ScheduleKind.NONE),
            {"arm": "A", "participant_id": "P1"},
            "not both",
        ),
        ("glucose", Expectation(ScheduleKind.NONE), {"arm": "x y"}, "not an arm name"),
        ("glucose", Expectation(ScheduleKind.NONE), {"participant_id": "nobody"}, "no participant"),
    ],
)
async def test_schedule_entries_that_cannot_be_are_refused(
    study: Trial, metric: str, expectation: Expectation, scope: dict[str, str], message: str
) -> None:
    async with db.connection(study.url) as conn:
        with pytest.raises(ScheduleError, match=message):
            await schedules.set_schedule(
                conn,
                study.study_id,
                metric,
                expectation,
                effective_from=MONDAY,
                actor="dm",
                **scope,
            )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": ScheduleKind.CONTINUOUS, "rate_hz": 1.0}, "wear_hours is required"),
        ({"kind": ScheduleKind.CONTINUOUS, "rate_hz": 0.0, "wear_hours": 8}, "rate_hz must be"),
        ({"kind": ScheduleKind.CONTINUOUS, "rate_hz": float("nan"), "wear_hours": 8}, "finite"),
        ({"kind": ScheduleKind.CONTINUOUS, "rate_hz": 1.0, "wear_hours": 25}, "wear_hours must"),
        ({"kind": ScheduleKind.SPOT, "per_day": 0}, "per_day must be"),
        ({"kind": ScheduleKind.SPOT, "per_day": 97}, "per_day must be"),
        ({"kind": ScheduleKind.SPOT, "per_day": 2, "rate_hz": 1.0}, "no rate_hz"),
        ({"kind": ScheduleKind.NONE, "per_day": 2}, "expects nothing"),
    ],
)
def test_expectations_out_of_bounds_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        Expectation(**fields)  # type: ignore[arg-type]


async def test_schedule_changes_are_audited_and_listed_most_general_first(study: Trial) -> None:
    async with db.connection(study.url) as conn:
        entries = await schedules.schedule(conn, study.study_id)
        cur = await conn.execute(
            "SELECT action, count(*) FROM audit_log WHERE action IN"
            " ('schedule.set', 'participant.arm_set') GROUP BY action ORDER BY action"
        )
        audited = await cur.fetchall()
    assert [(e.metric, e.scope, e.kind) for e in entries] == [
        ("glucose", "study", "spot"),
        ("glucose", "arm B", "none"),
        ("heart_rate", "study", "continuous"),
        ("heart_rate", "participant P3", "continuous"),
    ]
    assert audited == [("participant.arm_set", 1), ("schedule.set", 4)]
