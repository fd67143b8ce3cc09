"""Alert rules on adherence: opened when each of the last D days the schedule expected the
metric fell below X %, cleared once that no longer holds (a good day, or a backfill that
lifted one); judged from complete local days by the sweep, never by the readings' path."""

from __future__ import annotations

import hashlib
import itertools
import time
from datetime import UTC, date, datetime, timedelta

import pytest
from psycopg_pool import AsyncConnectionPool

from gateway.alerts import AlertEngine
from ingest.model import AcceptedEnvelope, Batch, Reading
from ingest.rules import (
    DAY_S,
    AdherenceDay,
    Change,
    Rule,
    RuleError,
    RuleKind,
    RuleState,
    judge_adherence,
)
from storage import adherence, alerts, db, schedules
from storage.migrate import StorageMode
from storage.schedules import Expectation, ScheduleKind
from storage.writer import BulkWriter
from tests.alerts.test_engine import rows
from tests.fixtures.trial import Trial

DAY_MS = DAY_S * 1000
RULE = Rule(7, "S1", "wears it", "glucose", RuleKind.ADHERENCE, low=50.0, sustained_s=3 * DAY_S)


def days(*shares: float | None) -> list[AdherenceDay]:
    return [AdherenceDay(i * DAY_MS, (i + 1) * DAY_MS, a) for i, a in enumerate(shares)]


def test_it_opens_on_the_last_expected_days_below_and_clears_when_that_no_longer_holds() -> None:
    # Two bad days are not three; a day with nothing expected is passed over, not counted.
    assert judge_adherence(RULE, RuleState(), days(0.9, 0.2, 0.1), "P1").events == ()
    opened = judge_adherence(RULE, RuleState(), days(0.9, 0.2, None, 0.1, 0.4), "P1")
    (event,) = opened.events
    assert (event.change, event.first_ms, event.at_ms) == (Change.OPENED, 1 * DAY_MS, 5 * DAY_MS)
    assert event.value == pytest.approx(40.0)
    assert opened.state == RuleState(active_since=DAY_MS)
    # Still below: nothing new (a person may have resolved the alert meanwhile).
    assert judge_adherence(RULE, opened.state, days(0.2, 0.1, 0.3), "P1").events == ()
    # Exactly the threshold is not below it: cleared at the end of that day.
    cleared = judge_adherence(RULE, opened.state, days(0.2, 0.1, 0.5), "P1")
    (event,) = cleared.events
    assert (event.change, event.first_ms, event.at_ms) == (Change.CLEARED, DAY_MS, 3 * DAY_MS)
    assert cleared.state == RuleState()
    # Nothing expected any more (the study ended): cleared too.
    (gone,) = judge_adherence(RULE, opened.state, days(None, None), "P1").events
    assert gone.change is Change.CLEARED


@pytest.mark.parametrize(
    "fields",
    [
        {"low": None},
        {"low": 0.0},
        {"low": 100.5},
        {"high": 90.0},
        {"sustained_s": 0},
        {"sustained_s": DAY_S + 1},
        {"sustained_s": 32 * DAY_S},
    ],
)
def test_a_rule_that_cannot_be_is_refused(fields: dict[str, object]) -> None:
    base: dict[str, object] = {"low": 50.0, "sustained_s": 3 * DAY_S}
    with pytest.raises(RuleError):
        Rule(1, "S1", "r", "glucose", RuleKind.ADHERENCE, **{**base, **fields})  # type: ignore[arg-type]


_seq = itertools.count(1)


async def store(url: str, pool: AsyncConnectionPool, mode: StorageMode, times: list[int]) -> None:
    """Glucose checks of P9 at ``times``, stored, and the adherence days brought up to date."""
    readings = tuple(Reading(t, "glucose", 100.0, "mg/dL", "meter") for t in times)
    seq = next(_seq)
    env = AcceptedEnvelope(
        dev="hub-9",
        seq=seq,
        participant_id="P9",
        sent_ms=max(times) + 1000,
        envelope_sha256=hashlib.sha256(f"P9/{seq}".encode()).digest(),
        reading_count=len(readings),
        readings=readings,
        consent_ids=(None,) * len(readings),
    )
    now = int(time.time() * 1000)
    await BulkWriter(pool, mode).write(Batch(accepted=(env,), rejected=(), received_ms=now))
    async with db.connection(url) as conn:
        await adherence.refresh(conn)


async def sweep(url: str, engine: AlertEngine) -> list[alerts.AlertEvent]:
    async with db.connection(url) as conn, conn.transaction():
        return await engine.sweep(conn, int(time.time() * 1000))


async def test_the_sweep_opens_and_clears_an_adherence_alert(
    trial: Trial, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    today = datetime.now(UTC).date()

    def noon(day: date, hour: int = 12) -> int:
        return int(datetime(day.year, day.month, day.day, hour, tzinfo=UTC).timestamp() * 1000)

    consented = datetime.now(UTC) - timedelta(days=10)
    await trial.add_participant("P9", "hub-9", consent_at=consented, enrolled_at=consented)
    async with db.connection(trial.url) as conn:
        await schedules.set_schedule(
            conn, trial.study_id, "glucose", Expectation(ScheduleKind.SPOT, per_day=4),
            effective_from=date(2026, 1, 1), actor="dm",
        )  # fmt: skip
        rule = await alerts.add_rule(
            conn, study_id=trial.study_id, name="glucose checks", metric="glucose",
            created_by="dm", kind=RuleKind.ADHERENCE, low=50.0, sustained_s=3 * DAY_S,
        )  # fmt: skip
        await conn.commit()
    engine = AlertEngine(clock=time.time)
    # One glucose check a day over the last five days: 25 % of the four expected.
    await store(
        trial.url, pool, storage_mode, [noon(today - timedelta(days=d)) for d in range(1, 6)]
    )
    recorded = await sweep(trial.url, engine)
    assert {(e.event, e.participant_id) for e in recorded} >= {("opened", "P9")}
    ((state, first, last_value),) = await rows(
        trial.url,
        "SELECT state, first_time, last_value FROM alerts WHERE rule_id = %s"
        " AND participant_id = 'P9'",
        (rule.rule_id,),
    )
    three_days_ago = today - timedelta(days=3)
    assert state == "open"
    assert first == datetime(three_days_ago.year, three_days_ago.month, three_days_ago.day,
                             tzinfo=UTC)  # fmt: skip
    assert last_value == pytest.approx(25.0)
    # Within the minute the sweep does not look again; a new engine (another minute) does.
    assert await sweep(trial.url, engine) == []
    # Yesterday's missing checks arrive late: 4 of 4, so the last three days no longer all
    # fall short, and the alert clears.
    yesterday = today - timedelta(days=1)
    await store(trial.url, pool, storage_mode, [noon(yesterday, h) for h in (8, 16, 20)])
    cleared = await sweep(trial.url, AlertEngine(clock=time.time))
    assert [(e.event, e.participant_id) for e in cleared if e.rule_id == rule.rule_id] == [
        ("resolved", "P9")
    ]
    assert await rows(
        trial.url, "SELECT state FROM alerts WHERE rule_id = %s AND participant_id = 'P9'",
        (rule.rule_id,),
    ) == [("resolved",)]  # fmt: skip
