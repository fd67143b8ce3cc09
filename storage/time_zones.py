"""Participants' time zones over time (``participant_time_zones``, docs/storage.md).

A zone is set from a time on (at enrollment, or when the participant moves or travels); the
view ``participant_time_zone_history`` gives each zone the span of times it is valid for, so
a reading's local time and local day are those of the zone valid at its own time, across
daylight-saving changes and moves. A zone must be one PostgreSQL knows (``pg_timezone_names``:
the IANA database), which is also what Python's zoneinfo reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from psycopg import errors as pg_errors
from psycopg.rows import class_row

from ingest.model import AcceptedEnvelope
from storage import adherence, audit
from storage.db import Conn
from storage.errors import StorageError
from storage.timeconv import from_ms_or_none, year_in_range

_KNOWN = "SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = %s)"
_INSERT_ZONE = """
INSERT INTO participant_time_zones (participant_id, valid_from, time_zone, recorded_by)
VALUES (%s, %s, %s, %s)
"""
_SET = (
    _INSERT_ZONE
    + """ON CONFLICT (participant_id, valid_from) DO UPDATE SET
    time_zone = excluded.time_zone, recorded_at = now(), recorded_by = excluded.recorded_by
"""
)
_SET_UNLESS_SET = _INSERT_ZONE + "ON CONFLICT (participant_id, valid_from) DO NOTHING"
# Names of UTC itself: a hub on UTC says nothing new of a participant who has no zone (UTC).
UTC_NAMES = frozenset(
    {"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Universal", "Universal", "Etc/Zulu", "Zulu"}
)
# The zone valid at a time (None: none set, which is UTC).
_VALID_AT = """
SELECT time_zone FROM participant_time_zone_history
WHERE participant_id = %s AND valid_from <= %s AND %s < valid_to
"""
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
    if not await _known(conn, time_zone):
        raise UnknownTimeZone(f"{time_zone!r} is not an IANA time zone name (e.g. Europe/Berlin)")
    try:
        await _record(conn, participant_id, time_zone, valid_from, actor)
    except pg_errors.ForeignKeyViolation:
        raise UnknownParticipant(f"no participant {participant_id!r}") from None


async def _record(
    conn: Conn,
    participant_id: str,
    time_zone: str,
    valid_from: datetime,
    actor: str,
    *,
    action: str = "participant.time_zone_set",
    replace: bool = True,
) -> None:
    """Record the zone from ``valid_from`` on and audit it. ``replace``: a zone already set
    from that very time is replaced (a person correcting it); otherwise it is kept."""
    async with conn.transaction():
        cur = await conn.execute(
            _SET if replace else _SET_UNLESS_SET,
            (participant_id, valid_from, time_zone, actor),
        )
        if cur.rowcount == 0:
            return
        await audit.append(
            conn,
            actor=actor,
            action=action,
            entity="participant",
            entity_id=participant_id,
            detail={"time_zone": time_zone, "valid_from": valid_from.isoformat()},
        )
        # Local days moved: the participant's adherence days are summed again.
        await adherence.rebuild_participant(conn, participant_id)


async def record_reported(conn: Conn, fresh: Sequence[AcceptedEnvelope]) -> None:
    """The time zones hubs reported in newly stored envelopes (protocol v3), in the writer's
    transaction. A report changes the participant's zone from its ``since`` time on when it
    differs from the zone valid then, and is audited as ``participant.time_zone_reported``;
    one that repeats the zone adds nothing. A zone the database does not know, or a time
    outside 1970-2099 or later than the envelope's sealing, is not recorded, and an audit
    record (``participant.time_zone_refused``) says why: the envelope's readings are stored
    all the same."""
    for env in fresh:
        zone = env.zone
        if zone is None:
            continue
        actor = f"hub:{env.dev}"
        since = from_ms_or_none(zone.since_ms)
        problem = None
        if since is None or not year_in_range(since):
            problem = "the time it is in force from is outside 1970-2099"
        elif zone.since_ms > env.sent_ms:
            problem = "the time it is in force from is later than the envelope was sealed"
        elif not await _known(conn, zone.time_zone):
            problem = "not an IANA time zone name this database knows"
        if problem is not None:
            await audit.append(
                conn,
                actor=actor,
                action="participant.time_zone_refused",
                entity="participant",
                entity_id=env.participant_id,
                detail={"time_zone": zone.time_zone, "since_ms": zone.since_ms, "seq": env.seq},
                reason=problem,
            )
            continue
        assert since is not None
        cur = await conn.execute(_VALID_AT, (env.participant_id, since, since))
        row = await cur.fetchone()
        current = None if row is None else str(row[0])
        if zone.time_zone == current or (current is None and zone.time_zone in UTC_NAMES):
            continue
        await _record(
            conn,
            env.participant_id,
            zone.time_zone,
            since,
            actor,
            action="participant.time_zone_reported",
            replace=False,
        )


async def _known(conn: Conn, time_zone: str) -> bool:
    cur = await conn.execute(_KNOWN, (time_zone,))
    row = await cur.fetchone()
    return row is not None and bool(row[0])


async def history(conn: Conn, participant_id: str) -> list[ZonePeriod]:
    async with conn.cursor(row_factory=class_row(ZonePeriod)) as cur:
        await cur.execute(_HISTORY, (participant_id,))
        return await cur.fetchall()
