"""Read queries behind the charts and live views: a participant's readings over a window,
what the gateway received since a poll, and the gaps the hubs reported.

Nothing here decides who may see what (``gateway.web.access`` does); every function takes the
ids it is allowed to read. Values leave only as rows for the caller to return; nothing here
logs them. Each reading comes with what its device said about it: its flags (``ingest.flags``
is their registry; an empty list when the device said nothing) and the device's user index.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import class_row

from storage.db import Conn

# At most this many readings come back for one window (about 1 Hz for 1 hour of 3 metrics).
MAX_WINDOW_READINGS = 20_000
# A reading's received_at is stamped when the gateway takes its batch, before the batch
# commits, so a poll's cursor is set this far before the poll: a batch committed within
# that long after it was received is still in the next poll (the page drops duplicates).
# A page also reloads its whole window now and then, which catches anything slower.
RECEIVED_OVERLAP_MS = 5_000


@dataclass(frozen=True, slots=True)
class ReadingRow:
    """One stored reading. ``flags``: the device's statements about it, sorted (empty when
    it said nothing); ``device_user``: its user index on a shared wearable, or None."""

    time: datetime
    metric: str
    value: float
    unit: str
    device_id: str
    sensor: str
    flags: list[str]
    device_user: int | None


@dataclass(frozen=True, slots=True)
class ReceivedReadingRow(ReadingRow):
    """A reading with whose it is and when the gateway received it (a live feed's read)."""

    participant_id: str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class GapRow:
    device_id: str
    from_time: datetime
    to_time: datetime
    reason: str


_WINDOW = """
SELECT time, metric, value, unit, device_id, sensor, coalesce(flags, '{}') AS flags, device_user
FROM (
    SELECT time, metric, value, unit, device_id, sensor, flags, device_user FROM readings
    WHERE participant_id = %(pid)s AND time >= %(since)s
      AND (%(metrics)s::text[] IS NULL OR metric = ANY(%(metrics)s))
      AND (%(after)s::timestamptz IS NULL OR received_at > %(after)s)
    ORDER BY time DESC LIMIT %(limit)s
) w
ORDER BY time, metric
"""

_RECEIVED = """
SELECT time, metric, value, unit, device_id, sensor, coalesce(flags, '{}') AS flags, device_user,
       participant_id, received_at
FROM readings
WHERE participant_id = ANY(%(pids)s) AND metric = ANY(%(metrics)s)
  AND time >= %(since)s AND received_at > %(after)s
ORDER BY time, participant_id
LIMIT %(limit)s
"""


async def readings_window(
    conn: Conn,
    participant_id: str,
    since: datetime,
    *,
    metrics: Collection[str] | None = None,
    received_after: datetime | None = None,
    limit: int = MAX_WINDOW_READINGS,
) -> list[ReadingRow]:
    """Stored readings of the participant measured at or after ``since``, oldest first (the
    newest ``limit`` when there are more); with ``received_after``, only those the gateway
    received after it (a live view's poll after its first)."""
    async with conn.cursor(row_factory=class_row(ReadingRow)) as cur:
        await cur.execute(
            _WINDOW,
            {
                "pid": participant_id,
                "since": since,
                "metrics": None if metrics is None else list(metrics),
                "after": received_after,
                "limit": limit,
            },
        )
        return await cur.fetchall()


async def readings_received(
    conn: Conn,
    participant_ids: Collection[str],
    metrics: Collection[str],
    since: datetime,
    received_after: datetime,
    *,
    limit: int = MAX_WINDOW_READINGS,
) -> list[ReceivedReadingRow]:
    """The readings of ``participant_ids`` measured at or after ``since`` that the gateway
    received after ``received_after``, oldest first, at most ``limit``: one query for every
    live view a gateway process serves. Naming every metric lets the (participant, metric,
    time) index bound the time range as well."""
    async with conn.cursor(row_factory=class_row(ReceivedReadingRow)) as cur:
        await cur.execute(
            _RECEIVED,
            {
                "pids": list(participant_ids),
                "metrics": list(metrics),
                "since": since,
                "after": received_after,
                "limit": limit,
            },
        )
        return await cur.fetchall()


async def gaps_window(conn: Conn, participant_id: str, since: datetime) -> list[GapRow]:
    """Spans without data that the participant's hubs reported, overlapping ``since``..now."""
    async with conn.cursor(row_factory=class_row(GapRow)) as cur:
        await cur.execute(
            "SELECT g.device_id, g.from_time, g.to_time, g.reason FROM gaps g"
            " JOIN devices d USING (device_id)"
            " WHERE d.participant_id = %s AND g.to_time >= %s ORDER BY g.from_time",
            (participant_id, since),
        )
        return await cur.fetchall()
