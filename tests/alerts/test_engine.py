"""The alert engine inside the batch transaction, against a real database: alert rows, their
events, audit records, NOTIFY, late data through stored readings, overrides and a race."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import psycopg
import pytest

from gateway.alerts import AlertEngine
from ingest.model import Batch
from ingest.rules import Change, Rule, RuleEvent
from storage import alerts, db
from storage.timeconv import from_ms
from tests.alerts.conftest import Clock, Ingest, S, base_ms, envelope
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until


async def rows(url: str, query: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
    async with db.connection(url) as conn:
        cur = await conn.execute(query.encode(), params)
        return list(await cur.fetchall())


async def add_hr_rule(url: str, **kw: object) -> Rule:
    fields: dict[str, object] = {
        "study_id": "S1",
        "name": "hr-high",
        "metric": "heart_rate",
        "created_by": "tester",
        "high": 120.0,
    }
    fields.update(kw)
    async with db.connection(url) as conn:
        rule = await alerts.add_rule(conn, **fields)  # type: ignore[arg-type]
        await conn.commit()
    return rule


def steps(t0: int, start_s: int, stop_s: int, step_s: int, value: float) -> list[tuple[int, float]]:
    return [(t0 + s * S, value) for s in range(start_s, stop_s + 1, step_s)]


async def test_out_of_range_batch_opens_one_alert_with_event_audit_and_notify(
    trial: Trial, ingest: Ingest
) -> None:
    rule = await add_hr_rule(trial.url)
    t0 = base_ms()
    async with db.connection(trial.url, autocommit=True) as listener:
        await listener.execute("LISTEN trialstream_alerts")
        await ingest(steps(t0, 0, 4, 1, 130.0))
        notes = [n async for n in listener.notifies(timeout=10, stop_after=1)]
    assert await rows(
        trial.url,
        "SELECT rule_id, participant_id, state, severity, first_time, condition_time, last_value,"
        " opened_at FROM alerts",
    ) == [
        (
            rule.rule_id,
            "P1",
            "open",
            "warning",
            from_ms(t0),
            from_ms(t0),
            130.0,
            from_ms(ingest.clock.now_ms),
        ),
    ]
    events = await rows(
        trial.url,
        "SELECT event_id, alert_id, event, actor, study_id, site_id, participant_id FROM"
        " alert_events",
    )
    assert len(events) == 1
    event_id, alert_id = events[0][0], events[0][1]
    assert events[0][2:] == ("opened", "system:alerts", "S1", "SITE-A", "P1")
    assert await rows(trial.url, "SELECT event_id FROM alert_outbox") == [(event_id,)]
    assert await rows(
        trial.url,
        "SELECT actor, action, entity, entity_id, detail->>'participant_id' FROM audit_log"
        " WHERE entity = 'alert'",
    ) == [("system:alerts", "alert.opened", "alert", str(alert_id), "P1")]
    assert [json.loads(n.payload) for n in notes] == [
        {
            "event_id": event_id,
            "alert_id": alert_id,
            "event": "opened",
            "study_id": "S1",
            "site_id": "SITE-A",
        }
    ]
    assert {n.channel for n in notes} == {"trialstream_alerts"}


async def test_more_breaching_batches_keep_the_one_alert(trial: Trial, ingest: Ingest) -> None:
    await add_hr_rule(trial.url)
    t0 = base_ms()
    await ingest(steps(t0, 0, 4, 1, 130.0))
    await ingest(steps(t0, 5, 9, 1, 135.0))
    assert await rows(trial.url, "SELECT count(*) FROM alerts") == [(1,)]
    assert await rows(trial.url, "SELECT event FROM alert_events") == [("opened",)]


async def test_data_back_in_range_resolves_the_alert(trial: Trial, ingest: Ingest) -> None:
    await add_hr_rule(trial.url, hysteresis=5.0)
    t0 = base_ms()
    await ingest(steps(t0, 0, 2, 1, 130.0))
    await ingest([(t0 + 3 * S, 118.0)])  # inside the hysteresis band: still open
    assert await rows(trial.url, "SELECT state FROM alerts") == [("open",)]
    await ingest([(t0 + 4 * S, 100.0)])
    assert await rows(
        trial.url, "SELECT state, resolved_by, resolve_note, cleared_time FROM alerts"
    ) == [("resolved", "system:alerts", "cleared by data", from_ms(t0 + 4 * S))]
    assert await rows(trial.url, "SELECT event, actor FROM alert_events ORDER BY event_id") == [
        ("opened", "system:alerts"),
        ("resolved", "system:alerts"),
    ]
    assert await rows(
        trial.url, "SELECT action FROM audit_log WHERE entity = 'alert' ORDER BY audit_id"
    ) == [("alert.opened",), ("alert.resolved",)]
    # A new breach is a new alert.
    await ingest([(t0 + 5 * S, 140.0)])
    assert await rows(trial.url, "SELECT state FROM alerts ORDER BY alert_id") == [
        ("resolved",),
        ("open",),
    ]


async def test_late_reading_filling_a_gap_opens_the_sustained_alert(
    trial: Trial, ingest: Ingest
) -> None:
    rule = await add_hr_rule(trial.url, sustained_s=60, max_gap_s=10)
    t0 = base_ms()
    await ingest([(t0 - 10 * S, 80.0), *steps(t0, 0, 30, 5, 125.0)])
    await ingest(steps(t0, 45, 60, 5, 125.0))  # 30 s -> 45 s: the run is broken
    assert await rows(trial.url, "SELECT count(*) FROM alerts") == [(0,)]
    await ingest([(t0 + 38 * S, 125.0)])  # late: fills the gap
    assert await rows(
        trial.url, "SELECT rule_id, state, first_time, condition_time FROM alerts"
    ) == [(rule.rule_id, "open", from_ms(t0), from_ms(t0 + 60 * S))]
    assert await rows(trial.url, "SELECT evaluated_until, active_since FROM alert_state") == [
        (from_ms(t0 + 60 * S), from_ms(t0))
    ]


async def test_late_in_range_reading_is_judged_at_its_own_time(
    trial: Trial, ingest: Ingest
) -> None:
    await add_hr_rule(trial.url, sustained_s=30, max_gap_s=10)
    t0 = base_ms()
    await ingest([(t0 - 5 * S, 80.0), *steps(t0, 0, 100, 5, 125.0)])
    assert await rows(trial.url, "SELECT first_time, condition_time FROM alerts") == [
        (from_ms(t0), from_ms(t0 + 30 * S))
    ]
    # Judged by arrival, this in-range reading would end the alert while the breach goes on.
    await ingest([(t0 + 52 * S, 100.0)])
    assert await rows(
        trial.url,
        "SELECT state, first_time, condition_time, cleared_time FROM alerts ORDER BY alert_id",
    ) == [
        ("resolved", from_ms(t0), from_ms(t0 + 30 * S), from_ms(t0 + 52 * S)),
        ("open", from_ms(t0 + 55 * S), from_ms(t0 + 85 * S), None),
    ]


async def test_backfilled_episode_is_alerted_and_resolved(trial: Trial, ingest: Ingest) -> None:
    await add_hr_rule(trial.url, sustained_s=60, max_gap_s=10)
    t0 = base_ms()
    await ingest([*steps(t0, 0, 10, 5, 80.0), *steps(t0, 500, 510, 5, 80.0)])
    await ingest([*steps(t0, 100, 200, 5, 125.0), (t0 + 205 * S, 90.0)])
    assert await rows(
        trial.url, "SELECT state, first_time, condition_time, cleared_time FROM alerts"
    ) == [("resolved", from_ms(t0 + 100 * S), from_ms(t0 + 160 * S), from_ms(t0 + 205 * S))]
    assert await rows(trial.url, "SELECT event FROM alert_events ORDER BY event_id") == [
        ("opened",),
        ("resolved",),
    ]
    # One more late reading inside that episode: already alerted, nothing new.
    await ingest([(t0 + 150 * S, 126.0)])
    assert await rows(trial.url, "SELECT count(*) FROM alert_events") == [(2,)]


async def test_backfilled_past_episode_is_reported_while_a_later_alert_is_open(
    trial: Trial, ingest: Ingest
) -> None:
    await add_hr_rule(trial.url, max_gap_s=10)
    t0 = base_ms()
    await ingest([*steps(t0, 0, 10, 5, 80.0), *steps(t0, 500, 510, 5, 130.0)])
    await ingest([*steps(t0, 100, 120, 5, 130.0), (t0 + 125 * S, 80.0)])
    assert await rows(
        trial.url,
        "SELECT state, first_time, condition_time, cleared_time, resolved_by FROM alerts"
        " ORDER BY first_time",
    ) == [
        ("resolved", from_ms(t0 + 100 * S), from_ms(t0 + 100 * S), from_ms(t0 + 125 * S),
         "system:alerts"),
        ("open", from_ms(t0 + 500 * S), from_ms(t0 + 500 * S), None, None),
    ]  # fmt: skip
    assert await rows(
        trial.url,
        "SELECT e.event, a.first_time FROM alert_events e JOIN alerts a USING (alert_id)"
        " ORDER BY event_id",
    ) == [
        ("opened", from_ms(t0 + 500 * S)),
        ("opened", from_ms(t0 + 100 * S)),
        ("resolved", from_ms(t0 + 100 * S)),
    ]


async def test_participant_override_applies_to_that_participant_only(
    trial: Trial, ingest: Ingest
) -> None:
    await trial.add_participant("P2", "hub-2")
    study_rule = await add_hr_rule(trial.url)
    await add_hr_rule(trial.url, high=140.0, participant_id="P1")
    t0 = base_ms()
    await ingest(steps(t0, 0, 2, 1, 130.0), participant="P1", dev="hub-1")
    await ingest(steps(t0, 0, 2, 1, 130.0), participant="P2", dev="hub-2")
    assert await rows(trial.url, "SELECT participant_id, rule_id FROM alerts") == [
        ("P2", study_rule.rule_id)
    ]


async def test_readings_of_other_metrics_and_replays_are_not_judged(
    trial: Trial, ingest: Ingest
) -> None:
    await add_hr_rule(trial.url)
    t0 = base_ms()
    await ingest([(t0, 99.0)], metric="spo2", unit="%")
    assert await rows(trial.url, "SELECT count(*) FROM alert_state") == [(0,)]
    env = envelope("P1", "hub-1", 99, steps(t0, 0, 2, 1, 130.0))
    await ingest.writer.write(Batch((env,), (), ingest.clock.now_ms), also=ingest.engine)
    await ingest.writer.write(Batch((env,), (), ingest.clock.now_ms), also=ingest.engine)
    assert await rows(trial.url, "SELECT count(*) FROM alert_events") == [(1,)]


async def test_two_workers_racing_on_one_participant_open_one_alert(
    trial: Trial, clock: Clock
) -> None:
    await add_hr_rule(trial.url)
    t0 = base_ms()
    first = envelope("P1", "hub-1", 1, steps(t0, 0, 2, 1, 130.0))
    second = envelope("P1", "hub-1", 2, steps(t0, 3, 5, 1, 131.0))
    engine_a, engine_b = AlertEngine(clock=clock), AlertEngine(clock=clock)
    async with (
        db.connection(trial.url) as a,
        db.connection(trial.url) as b,
        db.connection(trial.url, autocommit=True) as watcher,
    ):
        cur = await b.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
        assert row is not None
        b_pid = row[0]
        await engine_a(a, [first])  # holds P1's lock until it commits
        racing = asyncio.create_task(engine_b(b, [second]))

        async def b_waits_for_a_lock() -> bool:
            cur = await watcher.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (b_pid,)
            )
            got = await cur.fetchone()
            return got is not None and got[0] == "Lock"

        await wait_until(b_waits_for_a_lock, "worker b waiting on worker a's lock")
        await a.commit()
        await racing
        await b.commit()
    assert await rows(trial.url, "SELECT participant_id, state FROM alerts") == [("P1", "open")]
    assert await rows(trial.url, "SELECT event FROM alert_events") == [("opened",)]
    # b judged its readings after a's state: one episode, from a's first reading.
    assert await rows(trial.url, "SELECT evaluated_until, active_since FROM alert_state") == [
        (from_ms(t0 + 5 * S), from_ms(t0))
    ]


async def test_the_schema_refuses_a_second_unresolved_alert(trial: Trial) -> None:
    rule = await add_hr_rule(trial.url)
    insert = (
        "INSERT INTO alerts (rule_id, participant_id, state, severity, opened_at, first_time)"
        " VALUES (%s, 'P1', %s, 'warning', now(), now())"
    )
    async with db.connection(trial.url, autocommit=True) as conn:
        await conn.execute(insert, (rule.rule_id, "open"))
        with pytest.raises(psycopg.errors.UniqueViolation):
            await conn.execute(insert, (rule.rule_id, "acknowledged"))
        await conn.execute(insert, (rule.rule_id, "resolved"))


async def test_concurrent_openings_without_the_participant_lock_still_make_one_alert(
    trial: Trial,
) -> None:
    """Two transactions opening the same alert without the participant lock: one alert."""
    rule = await add_hr_rule(trial.url)
    event = RuleEvent(Change.OPENED, rule.rule_id, "P1", base_ms(), base_ms(), 130.0)
    now = base_ms()
    async with db.connection(trial.url) as a, db.connection(trial.url) as b:
        first = await alerts.apply_events(a, [event], {rule.rule_id: rule}, now)
        racing = asyncio.create_task(alerts.apply_events(b, [event], {rule.rule_id: rule}, now))
        await a.commit()
        second = await racing
        await b.commit()
    assert [e.event for e in first] == ["opened"]
    assert second == []
    assert await rows(trial.url, "SELECT count(*) FROM alerts") == [(1,)]
