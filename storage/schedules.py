"""The protocol's collection schedule (``collection_schedules``, docs/adherence.md): what each
participant is expected to collect, per metric, from a local day on.

A row is for the whole study, one arm, or one participant (an override), and the most
specific scope in effect wins: a participant's own row, else their arm's, else the study's;
within a scope the row with the latest ``effective_from`` not after the day. Adherence reads
the schedule when asked, so a schedule change (a protocol amendment from a date) needs no
recomputation. Every change is audited.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Final

from psycopg.rows import class_row

from ingest.metrics import METRICS
from storage import audit
from storage.db import Conn
from storage.errors import StorageError, UnknownStudy

MAX_RATE_HZ: Final = 1000.0
MAX_PER_DAY: Final = 96
ARM_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


class ScheduleKind(StrEnum):
    CONTINUOUS = "continuous"  # a stream at rate_hz, worn wear_hours a day
    SPOT = "spot"  # per_day measurements a day
    NONE = "none"  # nothing expected (an arm's or a participant's exemption)


class ScheduleError(StorageError):
    """A schedule entry that cannot be: its message says which field and why."""


@dataclass(frozen=True, slots=True)
class Expectation:
    """What one schedule row expects of a metric each day."""

    kind: ScheduleKind
    rate_hz: float | None = None
    wear_hours: float | None = None
    per_day: int | None = None

    def __post_init__(self) -> None:
        if self.kind is ScheduleKind.CONTINUOUS:
            _check_range("rate_hz", self.rate_hz, 0.0, MAX_RATE_HZ, low_open=True)
            _check_range("wear_hours", self.wear_hours, 0.0, 24.0, low_open=True)
            if self.per_day is not None:
                raise ScheduleError("a continuous stream has no per_day count")
        elif self.kind is ScheduleKind.SPOT:
            if self.per_day is None or not 1 <= self.per_day <= MAX_PER_DAY:
                raise ScheduleError(f"per_day must be 1 to {MAX_PER_DAY} spot checks a day")
            if self.rate_hz is not None or self.wear_hours is not None:
                raise ScheduleError("spot checks have no rate_hz or wear_hours")
        elif (self.rate_hz, self.wear_hours, self.per_day) != (None, None, None):
            raise ScheduleError("'none' expects nothing: no rate_hz, wear_hours or per_day")


def _check_range(
    name: str, value: float | None, low: float, high: float, *, low_open: bool
) -> None:
    if value is None:
        raise ScheduleError(f"{name} is required for a continuous stream")
    if not math.isfinite(value):
        raise ScheduleError(f"{name} must be a finite number, not {value}")
    if (value <= low if low_open else value < low) or value > high:
        raise ScheduleError(f"{name} must be above {low:g} and at most {high:g}, not {value:g}")


@dataclass(frozen=True, slots=True)
class ScheduleEntry:
    schedule_id: int
    study_id: str
    arm: str | None
    participant_id: str | None
    metric: str
    effective_from: date
    kind: str
    rate_hz: float | None
    wear_hours: float | None
    per_day: int | None
    recorded_at: datetime
    recorded_by: str

    @property
    def scope(self) -> str:
        if self.participant_id is not None:
            return f"participant {self.participant_id}"
        return f"arm {self.arm}" if self.arm is not None else "study"


_SET = """
INSERT INTO collection_schedules (study_id, arm, participant_id, metric, effective_from, kind,
    rate_hz, wear_hours, per_day, recorded_by)
VALUES (%(study)s, %(arm)s, %(participant)s, %(metric)s, %(from)s, %(kind)s, %(rate)s,
    %(wear)s, %(per_day)s, %(actor)s)
ON CONFLICT ON CONSTRAINT collection_schedules_unique DO UPDATE SET kind = excluded.kind,
    rate_hz = excluded.rate_hz, wear_hours = excluded.wear_hours, per_day = excluded.per_day,
    recorded_at = now(), recorded_by = excluded.recorded_by
RETURNING schedule_id
"""

_PARTICIPANT_STUDY = "SELECT study_id FROM participants WHERE participant_id = %s"
_STUDY_EXISTS = "SELECT EXISTS (SELECT 1 FROM studies WHERE study_id = %s)"

_LIST = """
SELECT schedule_id, study_id, arm, participant_id, metric, effective_from, kind, rate_hz,
       wear_hours, per_day, recorded_at, recorded_by
FROM collection_schedules WHERE study_id = %s
ORDER BY metric, participant_id NULLS FIRST, arm NULLS FIRST, effective_from
"""


async def set_schedule(
    conn: Conn,
    study_id: str,
    metric: str,
    expectation: Expectation,
    *,
    effective_from: date,
    actor: str,
    arm: str | None = None,
    participant_id: str | None = None,
) -> int:
    """Expect ``expectation`` of ``metric`` from local day ``effective_from`` on, for the
    study, one ``arm`` or one participant (an override). Replaces the row of the same scope,
    metric and day. Audited; returns the schedule row's id."""
    if metric not in METRICS:
        raise ScheduleError(f"unknown metric {metric!r} (one of: {', '.join(sorted(METRICS))})")
    if arm is not None and participant_id is not None:
        raise ScheduleError("a schedule row is for an arm or for a participant, not both")
    if arm is not None and not ARM_PATTERN.match(arm):
        raise ScheduleError(f"{arm!r} is not an arm name (letters, digits, _ . -; 32 at most)")
    await _check_scope(conn, study_id, participant_id)
    params = {
        "study": study_id,
        "arm": arm,
        "participant": participant_id,
        "metric": metric,
        "from": effective_from,
        "kind": expectation.kind.value,
        "rate": expectation.rate_hz,
        "wear": expectation.wear_hours,
        "per_day": expectation.per_day,
        "actor": actor,
    }
    async with conn.transaction():
        cur = await conn.execute(_SET, params)
        row = await cur.fetchone()
        assert row is not None
        await audit.append(
            conn,
            actor=actor,
            action="schedule.set",
            entity="study",
            entity_id=study_id,
            detail={k: v for k, v in params.items() if k not in {"study", "actor"}}
            | {"from": effective_from.isoformat()},
        )
    return int(row[0])


async def _check_scope(conn: Conn, study_id: str, participant_id: str | None) -> None:
    cur = await conn.execute(_STUDY_EXISTS, (study_id,))
    row = await cur.fetchone()
    if row is None or not row[0]:
        raise UnknownStudy(f"no study {study_id!r}")
    if participant_id is None:
        return
    cur = await conn.execute(_PARTICIPANT_STUDY, (participant_id,))
    found = await cur.fetchone()
    if found is None:
        raise ScheduleError(f"no participant {participant_id!r}")
    if found[0] != study_id:
        raise ScheduleError(f"participant {participant_id!r} is not in study {study_id!r}")


async def schedule(conn: Conn, study_id: str) -> list[ScheduleEntry]:
    """Every schedule row of a study, by metric, study rows first, then arms, participants."""
    async with conn.cursor(row_factory=class_row(ScheduleEntry)) as cur:
        await cur.execute(_LIST, (study_id,))
        return await cur.fetchall()


async def set_arm(conn: Conn, participant_id: str, arm: str | None, *, actor: str) -> None:
    """Assign a participant to an arm (None: to none). Audited."""
    if arm is not None and not ARM_PATTERN.match(arm):
        raise ScheduleError(f"{arm!r} is not an arm name (letters, digits, _ . -; 32 at most)")
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE participants SET arm = %s WHERE participant_id = %s RETURNING study_id",
            (arm, participant_id),
        )
        if await cur.fetchone() is None:
            raise ScheduleError(f"no participant {participant_id!r}")
        await audit.append(
            conn,
            actor=actor,
            action="participant.arm_set",
            entity="participant",
            entity_id=participant_id,
            detail={"arm": arm},
        )
