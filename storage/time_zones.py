"""Participants' time zones over time (``participant_time_zones``, docs/storage.md).

A zone is set from a time on (at enrollment, or when the participant moves or travels); the
view ``participant_time_zone_history`` gives each zone the span of times it is valid for, so
a reading's local time and local day are those of the zone valid at its own time, across
daylight-saving changes and moves. A zone must be one PostgreSQL knows (``pg_timezone_names``:
the IANA database), which is also what Python's zoneinfo reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg import errors as pg_errors
from psycopg.rows import class_row

from storage import adherence, audit
from storage.db import Conn
from storage.errors import StorageError

_KNOWN = "SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = %s)"
_HISTORY = """
SELECT time_zone, set_from, recorded_at, recorded_by FROM participant_time_zone_history
WHERE participant_id = %s ORDER BY set_from
"""


class UnknownTimeZone(StorageError):
    """Not a time zone name of the IANA database (as PostgreSQL knows it)."""


class UnknownParticipant(StorageError):
    """No participant has that id."""


@dataclass(frozen=True, slots=True)
class ZonePeriod:
    time_zone: str
    set_from: datetime
    recorded_at: datetime
    recorded_by: str


async def set_time_zone(
    conn: Conn, participant_id: str, time_zone: str, valid_from: datetime, *, actor: str
) -> None:
    """The participant is in ``time_zone`` from ``valid_from`` on. Audited."""
    cur = await conn.execute(_KNOWN, (time_zone,))
    row = await cur.fetchone()
    if row is None or not row[0]:
        raise UnknownTimeZone(f"{time_zone!r} is not an IANA time zone name (e.g. Europe/Berlin)")
    try:
        await _record(conn, participant_id, time_zone, valid_from, actor)
    except pg_errors.ForeignKeyViolation:
        raise UnknownParticipant(f"no participant {participant_id!r}") from None


async def _record(
    conn: Conn, participant_id: str, time_zone: str, valid_from: datetime, actor: str
) -> None:
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO participant_time_zones (participant_id, valid_from, time_zone,"
            " recorded_by) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (participant_id, valid_from) DO UPDATE SET time_zone ="
            " excluded.time_zone, recorded_at = now(), recorded_by = excluded.recorded_by",
            (participant_id, valid_from, time_zone, actor),
        )
        await audit.append(
            conn,
            actor=actor,
            action="participant.time_zone_set",
            entity="participant",
            entity_id=participant_id,
            detail={"time_zone": time_zone, "valid_from": valid_from.isoformat()},
        )
        # Local days moved: the participant's adherence days are summed again.
        await adherence.rebuild_participant(conn, participant_id)


async def history(conn: Conn, participant_id: str) -> list[ZonePeriod]:
    async with conn.cursor(row_factory=class_row(ZonePeriod)) as cur:
        await cur.execute(_HISTORY, (participant_id,))
        return await cur.fetchall()
