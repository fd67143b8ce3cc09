"""Adherence (docs/adherence.md): per participant, metric and participant-local day, what
arrived against what the protocol's schedule (``storage.schedules``) expects.

Kept current as data arrives, never by rescanning readings:

1. The writer folds each stored batch into 15-minute slots (``fold``): readings, those the
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

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import date
from typing import Final

from psycopg.rows import class_row

from ingest.flags import FlagClass, worst
from ingest.model import Reading
from storage.db import Conn
from storage.zones import zone_join

SLOT_MS: Final = 15 * 60_000
MINUTE_MS: Final = 60_000
# Serializes refreshes (several gateway workers run one each): a day summed from slots one
# refresh has not committed yet would be stale until it was touched again.
ADHERENCE_LOCK_KEY: Final = 0x6164_6865_7265

# (participant, metric, slot) -> [readings, invalid, minute bitmap]
SlotPartials = dict[tuple[str, str, int], list[int]]


def fold(partials: SlotPartials, participant_id: str, readings: Iterable[Reading]) -> None:
    """Fold one participant's stored readings into ``partials``."""
    for reading in readings:
        t_ms = reading.t_ms
        key = (participant_id, reading.metric, t_ms // SLOT_MS)
        acc = partials.get(key)
        if acc is None:
            acc = partials[key] = [0, 0, 0]
        acc[0] += 1
        if reading.flags and worst(reading.flags) is FlagClass.INVALID:
            acc[1] += 1
        else:
            acc[2] |= 1 << ((t_ms // MINUTE_MS) % 15)


async def add_deltas(conn: Conn, partials: SlotPartials) -> None:
    """Record what a batch adds, in the caller's (the batch's) transaction."""
    if not partials:
        return
    keys, accs = partials.keys(), partials.values()
    await conn.execute(
        "INSERT INTO adherence_deltas (participant_ids, metrics, slots, readings, invalid,"
        " minutes) VALUES (%b::text[], %b::text[], %b::int8[], %b::int4[], %b::int4[],"
        " %b::int4[])",  # binary: see storage.writer
        (
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [a[0] for a in accs],
            [a[1] for a in accs],
            [a[2] for a in accs],
        ),
    )


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


@dataclass(frozen=True, slots=True)
class MetricDay:
    """One participant's metric on one local day: what arrived and what was expected.

    ``adherence`` is the share of the expectation met (capped at 1): worn minutes against
    ``expected_minutes`` for a continuous stream, usable readings against
    ``expected_count`` for spot checks; None where nothing was expected that day.
    ``completeness`` (continuous only) is the usable readings against ``rate_hz`` over the
    expected wear time."""

    participant_id: str
    day: date
    metric: str
    kind: str | None
    readings: int
    invalid: int
    worn_minutes: int
    study_minutes: float
    expected_minutes: float | None
    expected_count: int | None
    adherence: float | None
    completeness: float | None


@dataclass(frozen=True, slots=True)
class ParticipantDay:
    """A participant's local day for the cohort view: the mean adherence of the metrics
    expected that day (None: nothing expected, e.g. before consent)."""

    participant_id: str
    day: date
    adherence: float | None
    metrics_expected: int
    metrics_met: int


# Per participant and local day in [from, to]: the day's bounds in the zone valid at its
# noon (UTC), the minutes of it inside the study period (first consent to the first full
# withdrawal, and not after now), and per metric the schedule row in effect (the most
# specific scope, then the latest effective_from) and what arrived.
_METRIC_DAYS = f"""
WITH people AS (
    SELECT p.participant_id, p.study_id, p.arm,
           coalesce(c.consented_at, 'infinity') AS consented_at,
           least(coalesce(c.withdrawn_at, 'infinity'), now()) AS study_end
    FROM participants p
    LEFT JOIN LATERAL (
        SELECT min(effective_at) FILTER (WHERE action = 'consent') AS consented_at,
               min(effective_at) FILTER (WHERE action = 'withdraw') AS withdrawn_at
        FROM consents WHERE participant_id = p.participant_id
    ) c ON true
    WHERE p.participant_id = ANY(%(participants)s)
),
days AS (
    SELECT pe.*, d::date AS day, coalesce(tz.time_zone, 'UTC') AS zone
    FROM people pe
    CROSS JOIN generate_series(%(from)s::date, %(to)s::date, interval '1 day') AS d
    {zone_join("tz", "pe.participant_id", "(d::date + time '12:00') AT TIME ZONE 'UTC'")}
),
bounds AS (
    SELECT days.*, day::timestamp AT TIME ZONE zone AS day_start,
           (day + 1)::timestamp AT TIME ZONE zone AS day_end
    FROM days
),
shares AS (
    SELECT b.participant_id, b.study_id, b.arm, b.day,
           extract(epoch FROM b.day_end - b.day_start) / 60 AS day_minutes,
           CASE WHEN least(b.day_end, b.study_end) > greatest(b.day_start, b.consented_at)
                THEN extract(epoch FROM least(b.day_end, b.study_end)
                                        - greatest(b.day_start, b.consented_at)) / 60
                ELSE 0 END AS study_minutes
    FROM bounds b
),
scheduled AS (
    SELECT DISTINCT ON (sh.participant_id, sh.day, s.metric)
           sh.participant_id, sh.day, s.metric, s.kind, s.rate_hz, s.wear_hours, s.per_day
    FROM shares sh
    JOIN collection_schedules s ON s.study_id = sh.study_id AND s.effective_from <= sh.day
        AND (s.participant_id = sh.participant_id
             OR (s.participant_id IS NULL AND (s.arm IS NULL OR s.arm = sh.arm)))
    ORDER BY sh.participant_id, sh.day, s.metric, (s.participant_id IS NOT NULL) DESC,
             (s.arm IS NOT NULL) DESC, s.effective_from DESC
),
keyed AS (
    SELECT participant_id, day, metric FROM scheduled
    UNION
    SELECT participant_id, day, metric FROM adherence_days
    WHERE participant_id = ANY(%(participants)s) AND day BETWEEN %(from)s AND %(to)s
),
joined AS (
    SELECT k.participant_id, k.day, k.metric,
           nullif(s.kind, 'none') AS kind, s.rate_hz, s.wear_hours, s.per_day,
           coalesce(a.readings, 0) AS readings, coalesce(a.invalid, 0) AS invalid,
           coalesce(a.worn_minutes, 0) AS worn_minutes, sh.study_minutes, sh.day_minutes
    FROM keyed k
    JOIN shares sh USING (participant_id, day)
    LEFT JOIN scheduled s USING (participant_id, day, metric)
    LEFT JOIN adherence_days a USING (participant_id, day, metric)
),
expected AS (
    SELECT j.*,
        CASE WHEN kind = 'continuous' AND study_minutes > 0 THEN
            least(wear_hours * 60 * study_minutes / day_minutes, study_minutes) END
            AS expected_minutes,
        CASE WHEN kind = 'spot' THEN
            floor(per_day * study_minutes / day_minutes)::int END AS expected_count
    FROM joined j
)
SELECT participant_id, day, metric, kind, readings, invalid, worn_minutes,
       study_minutes::float8 AS study_minutes, expected_minutes::float8 AS expected_minutes,
       nullif(expected_count, 0) AS expected_count,
       CASE WHEN expected_minutes > 0 THEN least(1, worn_minutes / expected_minutes)
            WHEN expected_count > 0 THEN least(1, (readings - invalid)::float8 / expected_count)
       END::float8 AS adherence,
       CASE WHEN expected_minutes > 0 THEN
            least(1, (readings - invalid) / (rate_hz * 60 * expected_minutes))
       END::float8 AS completeness
FROM expected
"""  # noqa: S608 - constant fragments (storage.zones), no input

_METRIC_DAYS_ORDERED = _METRIC_DAYS + " ORDER BY participant_id, day, metric"

_COHORT = f"""
WITH metric_days AS ({_METRIC_DAYS})
SELECT participant_id, day, avg(adherence)::float8 AS adherence,
       count(adherence)::int AS metrics_expected,
       count(*) FILTER (WHERE adherence >= 1)::int AS metrics_met
FROM metric_days
GROUP BY participant_id, day
ORDER BY participant_id, day
"""  # noqa: S608 - constant fragments (storage.zones), no input


async def days(
    conn: Conn, participant_ids: Collection[str], first: date, last: date
) -> list[MetricDay]:
    """Each participant's metrics on each local day from ``first`` to ``last``: those the
    schedule expects and those with data."""
    async with conn.cursor(row_factory=class_row(MetricDay)) as cur:
        await cur.execute(
            _METRIC_DAYS_ORDERED,
            {"participants": list(participant_ids), "from": first, "to": last},
        )
        return await cur.fetchall()


async def cohort(
    conn: Conn, participant_ids: Collection[str], first: date, last: date
) -> list[ParticipantDay]:
    """Each participant's mean adherence per local day (the heat map's cells)."""
    async with conn.cursor(row_factory=class_row(ParticipantDay)) as cur:
        await cur.execute(
            _COHORT, {"participants": list(participant_ids), "from": first, "to": last}
        )
        return await cur.fetchall()


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
