"""Hourly rollups (``readings_1h``): count, mean, minimum and maximum per participant,
metric and hour, for the live view's longer charts, over the readings the device did not put
in doubt (``ingest.flags.IN_DOUBT``; in SQL the function ``reading_in_doubt``).

On TimescaleDB it is a continuous aggregate with real-time aggregation (its policy refreshes
it). On plain PostgreSQL it is a table that :func:`refresh_rollups` brings up to date: each
stored batch records its count, sum, minimum and maximum per participant, metric and hour in
``rollup_deltas``, and each withdrawal the hours it deleted readings from in
``rollup_invalidations`` (each in its own transaction, so none is missed however late it
commits); the refresh merges the first into their hours and recomputes exactly the second.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import class_row

from storage.db import Conn
from storage.migrate import StorageMode

_HOURLY = """
SELECT metric, bucket, n, mean, min, max FROM readings_1h
WHERE participant_id = %(pid)s
  AND bucket >= to_timestamp(floor(extract(epoch FROM %(since)s::timestamptz) / 3600) * 3600)
  AND (%(metrics)s::text[] IS NULL OR metric = ANY(%(metrics)s))
ORDER BY metric, bucket
"""


@dataclass(frozen=True, slots=True)
class RollupRow:
    metric: str
    bucket: datetime
    n: int
    mean: float
    min: float
    max: float


async def hourly(
    conn: Conn,
    participant_id: str,
    since: datetime,
    *,
    metrics: Collection[str] | None = None,
) -> list[RollupRow]:
    """The participant's hours from the one holding ``since`` on (hours of UTC)."""
    async with conn.cursor(row_factory=class_row(RollupRow)) as cur:
        await cur.execute(
            _HOURLY,
            {
                "pid": participant_id,
                "since": since,
                "metrics": None if metrics is None else list(metrics),
            },
        )
        return await cur.fetchall()


# An arbitrary, fixed key for pg_advisory_xact_lock: one rollup refresher at a time.
ROLLUP_LOCK_KEY = 0x726F_6C6C_7570

# One statement, so one snapshot: a batch's deltas and its readings are both seen or both
# not, and an hour recomputed from its readings never also gets the deltas of readings it
# already counted. Hours a withdrawal touched are recomputed (and dropped when left empty);
# every other hour merges what arrived since the last refresh into its row.
_REFRESH = """
WITH taken_deltas AS (
    DELETE FROM rollup_deltas RETURNING participant_ids, metrics, hours, counts, sums, mins, maxs
), deltas AS (
    SELECT u.participant_id, u.metric, to_timestamp(u.hour * 3600) AS bucket,
           sum(u.n)::bigint AS n, sum(u.total) AS total, min(u.lo) AS lo, max(u.hi) AS hi
    FROM taken_deltas,
        unnest(taken_deltas.participant_ids, taken_deltas.metrics, taken_deltas.hours,
               taken_deltas.counts, taken_deltas.sums, taken_deltas.mins, taken_deltas.maxs)
            AS u(participant_id, metric, hour, n, total, lo, hi)
    GROUP BY 1, 2, 3
), taken_invalidations AS (
    DELETE FROM rollup_invalidations RETURNING participant_ids, metrics, hours
), touched AS (
    SELECT DISTINCT u.participant_id, u.metric, to_timestamp(u.hour * 3600) AS bucket
    FROM taken_invalidations,
        unnest(taken_invalidations.participant_ids, taken_invalidations.metrics,
               taken_invalidations.hours) AS u(participant_id, metric, hour)
), fresh AS (
    SELECT t.participant_id, t.metric, t.bucket, count(r.value) AS n, avg(r.value) AS mean,
           min(r.value) AS min, max(r.value) AS max
    FROM touched t LEFT JOIN readings r ON r.participant_id = t.participant_id
        AND r.metric = t.metric AND r.time >= t.bucket AND r.time < t.bucket + interval '1 hour'
        AND NOT reading_in_doubt(r.flags)
    GROUP BY t.participant_id, t.metric, t.bucket
), gone AS (
    DELETE FROM readings_1h h USING fresh f
    WHERE f.n = 0
      AND (h.participant_id, h.metric, h.bucket) = (f.participant_id, f.metric, f.bucket)
), recomputed AS (
    INSERT INTO readings_1h (participant_id, metric, bucket, n, mean, min, max)
    SELECT participant_id, metric, bucket, n, mean, min, max FROM fresh WHERE n > 0
    ON CONFLICT (participant_id, metric, bucket) DO UPDATE SET
        n = excluded.n, mean = excluded.mean, min = excluded.min, max = excluded.max
), merged AS (
    INSERT INTO readings_1h AS h (participant_id, metric, bucket, n, mean, min, max)
    SELECT d.participant_id, d.metric, d.bucket, d.n, d.total / d.n, d.lo, d.hi FROM deltas d
    WHERE NOT EXISTS (
        SELECT 1 FROM touched t
        WHERE (t.participant_id, t.metric, t.bucket) = (d.participant_id, d.metric, d.bucket))
    ON CONFLICT (participant_id, metric, bucket) DO UPDATE SET
        n = h.n + excluded.n,
        mean = (h.mean * h.n + excluded.mean * excluded.n) / (h.n + excluded.n),
        min = least(h.min, excluded.min),
        max = greatest(h.max, excluded.max)
    RETURNING 1
)
SELECT (SELECT count(*) FROM touched) + (SELECT count(*) FROM merged)
"""


HOUR_MS = 3_600_000


async def invalidate_rollups(
    conn: Conn, participant_ids: Sequence[str], metrics: Sequence[str], hours: Sequence[int]
) -> None:
    """Mark hours (since the epoch) of participants' metrics to be recomputed from their
    readings by the next refresh, in the caller's transaction."""
    if participant_ids:
        await conn.execute(
            "INSERT INTO rollup_invalidations (participant_ids, metrics, hours)"
            " VALUES (%b::text[], %b::text[], %b::int8[])",  # binary: see storage.writer
            (list(participant_ids), list(metrics), list(hours)),
        )


async def refresh_rollups(conn: Conn, mode: StorageMode) -> int:
    """Bring ``readings_1h`` up to date (plain mode; TimescaleDB refreshes its own): merge
    what batches added since the last refresh and recompute the hours withdrawals marked,
    in one transaction of its own. Returns the number of hours updated."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (ROLLUP_LOCK_KEY,))
        if mode is StorageMode.TIMESCALEDB:
            await conn.execute("DELETE FROM rollup_invalidations")
            await conn.execute("DELETE FROM rollup_deltas")
            return 0
        cur = await conn.execute(_REFRESH)
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])
