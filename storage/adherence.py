"""Adherence (docs/adherence.md): per participant, metric and participant-local day, what
arrived against what the protocol's schedule (``storage.schedules``) expects.

Kept current as data arrives, never by rescanning readings:

1. The writer folds each stored batch into 15-minute slots (``storage.deltas``): readings, those the
   device marked invalid, and a bitmap of the slot's minutes that hold a usable reading. It
   appends them to ``adherence_deltas`` in the batch's own transaction (insert-only: no two
   batches wait on one row), so a late backfill counts the day it belongs to, however late.
2. ``refresh`` (the gateway's maintenance loop) merges the deltas into ``adherence_slots``
   and sums the slots of each day it touched into ``adherence_days`` by the participant's
   local day (the zone valid at the slot's start; every UTC offset in use is a multiple of
   15 minutes, so a slot never straddles two local days). A time zone change has the
   participant's days summed again.
3. ``days`` and ``cohort`` set those counts against the schedule when asked: wear time of a
   continuous stream (minutes with a usable reading, against ``wear_hours`` of the day),
   spot checks done against ``per_day``, both prorated on a day only partly inside the
   participant's study period (consent to withdrawal, and today up to now) and on a
   daylight-saving day's length.

Gaps the hub reported (``gap_minutes``) explain a day's missing wear: out of range, hub
offline, outbox full.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final, TypeVar

from psycopg.rows import class_row

from ingest.rules import AdherenceDay
from storage import adherence_math
from storage.adherence_math import Counts, Inputs, Person, Rule, ZoneSpan
from storage.adherence_math import MetricDay as MetricDay
from storage.adherence_math import ParticipantDay as ParticipantDay
from storage.db import Conn
from storage.timeconv import to_ms
from storage.zones import zone_join

SLOT_MS: Final = 15 * 60_000
# The local days adherence is asked about: a span's defaults and a day's end must stay inside
# the calendar Python and PostgreSQL share, and no trial runs outside these.
FIRST_DAY: Final = date(2000, 1, 1)
LAST_DAY: Final = date(2099, 12, 31)
MINUTE_MS: Final = 60_000
# Serializes refreshes (several gateway workers run one each): a day summed from slots one
# refresh has not committed yet would be stale until it was touched again.
ADHERENCE_LOCK_KEY: Final = 0x6164_6865_7265

T = TypeVar("T")


_MERGE = """
WITH taken AS (DELETE FROM adherence_deltas RETURNING *),
batch AS (
    SELECT u.p, u.m, u.s, sum(u.n)::int AS n, sum(u.i)::int AS i, bit_or(u.b) AS b
    FROM taken, unnest(taken.participant_ids, taken.metrics, taken.slots, taken.readings,
                       taken.invalid, taken.minutes) AS u(p, m, s, n, i, b)
    GROUP BY u.p, u.m, u.s
)
INSERT INTO adherence_slots AS a (participant_id, metric, slot, readings, invalid, minutes)
SELECT p, m, s, n, i, b FROM batch
ON CONFLICT (participant_id, metric, slot) DO UPDATE SET
    readings = a.readings + excluded.readings,
    invalid = a.invalid + excluded.invalid,
    minutes = a.minutes | excluded.minutes
RETURNING participant_id, metric, slot
"""

_TAKE_REBUILDS = "DELETE FROM adherence_rebuilds RETURNING participant_id"
_SLOTS_OF = (
    "SELECT participant_id, metric, slot FROM adherence_slots WHERE participant_id = ANY(%s)"
)
_FORGET_DAYS = "DELETE FROM adherence_days WHERE participant_id = ANY(%s)"

_SLOT_TIME = "to_timestamp({slot} * 900)"
_SUM_DAYS = f"""
WITH keys AS (
    SELECT DISTINCT t.p AS participant_id, t.m AS metric,
        ({_SLOT_TIME.format(slot="t.s")} AT TIME ZONE coalesce(tz.time_zone, 'UTC'))::date AS day
    FROM unnest(%(p)s::text[], %(m)s::text[], %(s)s::int8[]) AS t(p, m, s)
    {zone_join("tz", "t.p", _SLOT_TIME.format(slot="t.s"))}
),
summed AS (
    SELECT k.participant_id, k.metric, k.day, sum(a.readings)::int AS readings,
           sum(a.invalid)::int AS invalid,
           sum(bit_count(a.minutes::bit(15)))::int AS worn_minutes
    FROM keys k
    JOIN adherence_slots a ON a.participant_id = k.participant_id AND a.metric = k.metric
        AND a.slot >= extract(epoch FROM k.day - 1)::bigint / 900
        AND a.slot < extract(epoch FROM k.day + 2)::bigint / 900
    {zone_join("z", "a.participant_id", _SLOT_TIME.format(slot="a.slot"))}
    WHERE ({_SLOT_TIME.format(slot="a.slot")} AT TIME ZONE coalesce(z.time_zone, 'UTC'))::date
        = k.day
    GROUP BY k.participant_id, k.metric, k.day
)
INSERT INTO adherence_days AS d (participant_id, metric, day, readings, invalid, worn_minutes)
SELECT participant_id, metric, day, readings, invalid, worn_minutes FROM summed
ON CONFLICT (participant_id, metric, day) DO UPDATE SET readings = excluded.readings,
    invalid = excluded.invalid, worn_minutes = excluded.worn_minutes, computed_at = now()
"""  # noqa: S608 - constant fragments (storage.zones), no input


async def refresh(conn: Conn) -> int:
    """Merge what batches added since the last refresh and sum the days it touched (and
    every day of participants whose zone changed), in one transaction of its own. Returns
    the number of slots merged."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADHERENCE_LOCK_KEY,))
        cur = await conn.execute(_MERGE)
        touched = await cur.fetchall()
        cur = await conn.execute(_TAKE_REBUILDS)
        rebuild = [str(r[0]) for r in await cur.fetchall()]
        if rebuild:
            await conn.execute(_FORGET_DAYS, (rebuild,))
            cur = await conn.execute(_SLOTS_OF, (rebuild,))
            touched += await cur.fetchall()
        if touched:
            await conn.execute(
                _SUM_DAYS,
                {
                    "p": [str(t[0]) for t in touched],
                    "m": [str(t[1]) for t in touched],
                    "s": [int(t[2]) for t in touched],
                },
            )
    return len(touched)


async def rebuild_participant(conn: Conn, participant_id: str) -> None:
    """Have the next refresh sum all of a participant's days again (their zone changed), in
    the caller's transaction."""
    await conn.execute(
        "INSERT INTO adherence_rebuilds (participant_id) VALUES (%s) ON CONFLICT DO NOTHING",
        (participant_id,),
    )


_PEOPLE = """
SELECT p.participant_id, p.study_id, p.arm, c.consented_at, c.withdrawn_at
FROM participants p
LEFT JOIN (
    SELECT participant_id,
           min(effective_at) FILTER (WHERE action = 'consent') AS consented_at,
           min(effective_at) FILTER (WHERE action = 'withdraw') AS withdrawn_at
    FROM consents WHERE participant_id = ANY(%(participants)s)
    GROUP BY participant_id
) c USING (participant_id)
WHERE p.participant_id = ANY(%(participants)s)
"""
# The view's open ends are infinite timestamps, which Python's datetime cannot hold: None.
_ZONES = """
SELECT participant_id, time_zone,
       CASE WHEN isfinite(valid_from) THEN valid_from END AS valid_from,
       CASE WHEN isfinite(valid_to) THEN valid_to END AS valid_to
FROM participant_time_zone_history WHERE participant_id = ANY(%(participants)s)
"""
_RULES = """
SELECT study_id, arm, participant_id, metric, effective_from, kind, rate_hz, wear_hours, per_day
FROM collection_schedules
WHERE study_id IN (SELECT study_id FROM participants WHERE participant_id = ANY(%(participants)s))
"""
_COUNTS = """
SELECT participant_id, array_agg(day) AS days, array_agg(metric) AS metrics,
       array_agg(readings) AS readings, array_agg(invalid) AS invalid,
       array_agg(worn_minutes) AS worn_minutes
FROM adherence_days
WHERE participant_id = ANY(%(participants)s) AND day BETWEEN %(first)s AND %(last)s
GROUP BY participant_id
"""


async def _rows(conn: Conn, query: str, params: dict[str, object], row: type[T]) -> list[T]:
    # Never prepared: after five runs a prepared statement may get PostgreSQL's generic plan,
    # which cannot see how many participants or days are asked for (a cohort's counts took
    # 250 ms instead of 40 with one). Planning each time costs under a millisecond.
    async with conn.cursor(row_factory=class_row(row)) as cur:
        await cur.execute(query, params, prepare=False)
        return await cur.fetchall()


async def _inputs(conn: Conn, participant_ids: Collection[str], first: date, last: date) -> Inputs:
    """What ``storage.adherence_math`` needs, in four indexed reads of one snapshot."""
    params: dict[str, object] = {
        "participants": list(participant_ids),
        "first": first,
        "last": last,
    }
    async with conn.transaction():
        people = await _rows(conn, _PEOPLE, params, Person)
        spans = await _rows(conn, _ZONES, params, ZoneSpan)
        rules = await _rows(conn, _RULES, params, Rule)
        counts = await _rows(conn, _COUNTS, params, Counts)
        cur = await conn.execute("SELECT now()")
        row = await cur.fetchone()
    assert row is not None
    zones: dict[str, list[ZoneSpan]] = {}
    for z in spans:
        zones.setdefault(z.participant_id, []).append(z)
    return Inputs(people, zones, rules, counts, first, last, row[0])


async def days(
    conn: Conn, participant_ids: Collection[str], first: date, last: date
) -> list[MetricDay]:
    """Each participant's metrics on each local day from ``first`` to ``last``: those the
    schedule expects and those with data (storage.adherence_math says how)."""
    return adherence_math.metric_days(await _inputs(conn, participant_ids, first, last))


async def cohort(
    conn: Conn, participant_ids: Collection[str], first: date, last: date
) -> list[ParticipantDay]:
    """Each participant's mean adherence per local day (the heat map's cells)."""
    return adherence_math.cohort(await _inputs(conn, participant_ids, first, last))


async def complete_days(
    conn: Conn, participant_ids: Collection[str], count: int
) -> dict[tuple[str, str], list[AdherenceDay]]:
    """Each participant's metrics on their last ``count`` (or so) local days that have
    ended, oldest first, with the days' bounds: what adherence alert rules judge."""
    cur = await conn.execute("SELECT (now() AT TIME ZONE 'UTC')::date")
    row = await cur.fetchone()
    assert row is not None
    today: date = row[0]
    first = max(FIRST_DAY, today - timedelta(days=count + 2))
    last = min(LAST_DAY, today + timedelta(days=1))
    inputs = await _inputs(conn, participant_ids, first, last)
    now_ms = to_ms(inputs.now)
    out: dict[tuple[str, str], list[AdherenceDay]] = {}
    for d in adherence_math.metric_days(inputs):
        zone = adherence_math.zone_on(inputs.zones.get(d.participant_id, ()), d.day)
        start, end = adherence_math.day_bounds(zone, d.day)
        if to_ms(end) <= now_ms:
            out.setdefault((d.participant_id, d.metric), []).append(
                AdherenceDay(to_ms(start), to_ms(end), d.adherence)
            )
    for days in out.values():
        days.sort(key=lambda a: a.start_ms)
    return out


@dataclass(frozen=True, slots=True)
class GapMinutes:
    sensor: str | None
    reason: str
    minutes: float


_GAP_MINUTES = f"""
WITH bounds AS (
    SELECT %(day)s::timestamp AT TIME ZONE zone AS day_start,
           (%(day)s::date + 1)::timestamp AT TIME ZONE zone AS day_end
    FROM (SELECT coalesce(tz.time_zone, 'UTC') AS zone FROM (SELECT 1) one
          {zone_join("tz", "%(participant)s", "(%(day)s::date + time '12:00') AT TIME ZONE 'UTC'")}
    ) z
)
SELECT g.sensor, g.reason,
       (sum(extract(epoch FROM least(g.to_time, b.day_end) - greatest(g.from_time, b.day_start)))
        / 60)::float8 AS minutes
FROM gaps g JOIN envelopes e ON (e.device_id, e.seq) = (g.device_id, g.seq)
CROSS JOIN bounds b
WHERE e.participant_id = %(participant)s AND g.from_time < b.day_end AND g.to_time > b.day_start
GROUP BY g.sensor, g.reason
ORDER BY minutes DESC, g.reason
"""  # noqa: S608 - constant fragments (storage.zones), no input


async def gap_minutes(conn: Conn, participant_id: str, day: date) -> list[GapMinutes]:
    """The minutes of a participant's local day that the hub reported gaps for, by wearable
    and reason (overlapping gaps of one reason are each counted)."""
    async with conn.cursor(row_factory=class_row(GapMinutes)) as cur:
        await cur.execute(_GAP_MINUTES, {"participant": participant_id, "day": day})
        return await cur.fetchall()


async def participants_of_site(conn: Conn, site_id: str) -> list[str]:
    """The ids of a site's participants, in order."""
    cur = await conn.execute(
        "SELECT participant_id FROM participants WHERE site_id = %s ORDER BY participant_id",
        (site_id,),
    )
    return [str(r[0]) for r in await cur.fetchall()]
