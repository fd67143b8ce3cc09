"""Period locks (``period_locks``, docs/review.md): a study's period closed to new data, as a
database lock before an analysis is. A reading of a locked period that arrives later is not
stored: it is refused as ``period_locked``, or, where the study holds late data
(``studies.late_data_policy = 'hold'``), kept in ``held_readings`` until the lock is lifted,
when it is stored like any late reading. Either way a rejection row says why.

Checked in the batch's transaction (``claim``), for its new envelopes, before their readings
are copied. Locking and unlocking take an exclusive advisory lock that every batch takes
shared while it checks and stores: a batch that checked before a lock committed finishes
before it (its readings are in the locked data), one that checks after sees it. Locking,
unlocking and the study's policy are audited; the caller has authenticated the signer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Final

from psycopg.rows import class_row

from ingest.model import AcceptedEnvelope, Reading, Reason, Refusal
from storage import audit, deltas, records, review
from storage.db import Conn
from storage.errors import StorageError, UnknownStudy
from storage.migrate import StorageMode
from storage.partitions import ensure_partitions, partition_start_ms
from storage.study_settings import StudySetting, set_study_setting
from storage.timeconv import from_ms, to_ms

LOCK_KEY: Final = 0x6C6F_636B_6564
MAX_REASON: Final = 500
LOCKED_DETAIL: Final = "the study has locked this period"
HELD_DETAIL: Final = "the study has locked this period: held for an unlock"


class LateDataPolicy(StrEnum):
    REFUSE = "refuse"
    HOLD = "hold"


class LockError(StorageError):
    """A lock or unlock that cannot be: its message says why."""


@dataclass(frozen=True, slots=True)
class PeriodLock:
    lock_id: int
    study_id: str
    from_time: datetime
    to_time: datetime
    reason: str
    locked_by: str
    locked_at: datetime
    unlocked_by: str | None
    unlocked_at: datetime | None
    unlock_reason: str | None
    held: int


@dataclass(frozen=True, slots=True)
class _Active:
    lock_id: int
    participant_id: str
    from_time: datetime
    to_time: datetime
    policy: str


_ACTIVE = """
SELECT l.lock_id, p.participant_id, l.from_time, l.to_time, s.late_data_policy AS policy
FROM participants p
JOIN studies s ON s.study_id = p.study_id
JOIN period_locks l ON l.study_id = p.study_id AND l.unlocked_at IS NULL
WHERE p.participant_id = ANY(%s)
"""
_STUDY_EXISTS = "SELECT EXISTS (SELECT 1 FROM studies WHERE study_id = %s)"
_HOLD = """
INSERT INTO held_readings (lock_id, time, participant_id, metric, value, unit, device_id, seq,
    sensor, received_at, consent_id, flags, device_user)
SELECT * FROM unnest(%b::int8[], %b::timestamptz[], %b::text[], %b::text[], %b::float8[],
    %b::text[], %b::text[], %b::int8[], %b::text[], %b::timestamptz[], %b::int8[], %b::text[],
    %b::int2[])
"""


def _reason(text: str) -> str:
    said = text.strip()
    if not 1 <= len(said) <= MAX_REASON:
        raise LockError(f"give a reason of 1 to {MAX_REASON} characters")
    return said


async def claim(
    conn: Conn, fresh: Sequence[AcceptedEnvelope], received_ms: int
) -> tuple[list[AcceptedEnvelope], dict[tuple[str, int], AcceptedEnvelope]]:
    """``fresh`` without the readings of locked periods (refused, or held where the study
    holds late data), and the envelopes that changed, by (device, seq); their envelope rows
    are recounted. Costs one shared advisory lock and one indexed query per batch."""
    participants = sorted({e.participant_id for e in fresh if e.readings})
    if not participants:
        return list(fresh), {}
    await conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (LOCK_KEY,))
    async with conn.cursor(row_factory=class_row(_Active)) as cur:
        await cur.execute(_ACTIVE, (participants,))
        active = await cur.fetchall()
    if not active:
        return list(fresh), {}
    spans: dict[str, list[tuple[int, int, int, bool]]] = {}
    for a in active:
        spans.setdefault(a.participant_id, []).append(
            (to_ms(a.from_time), to_ms(a.to_time), a.lock_id, a.policy == LateDataPolicy.HOLD)
        )
    changed: dict[tuple[str, int], AcceptedEnvelope] = {}
    held: list[tuple[int, AcceptedEnvelope, int]] = []  # (lock, envelope, reading index)
    out: list[AcceptedEnvelope] = []
    for e in fresh:
        mine = spans.get(e.participant_id)
        if not mine:
            out.append(e)
            continue
        kept: list[int] = []
        locked: list[tuple[Reading, bool]] = []
        for i, r in enumerate(e.readings):
            span = next((s for s in mine if s[0] <= r.t_ms < s[1]), None)
            if span is None:
                kept.append(i)
                continue
            locked.append((r, span[3]))
            if span[3]:
                held.append((span[2], e, i))
        if not locked:
            out.append(e)
            continue
        updated = replace(
            e,
            readings=tuple(e.readings[i] for i in kept),
            consent_ids=tuple(e.consent_ids[i] for i in kept),
            refusals=(*e.refusals, *_refusals(locked)),
        )
        changed[(e.dev, e.seq)] = updated
        out.append(updated)
    await records.recount(conn, list(changed.values()))
    await _hold(conn, held, received_ms)
    return out, changed


def _refusals(locked: Sequence[tuple[Reading, bool]]) -> list[Refusal]:
    by_key: dict[tuple[str, bool], list[int]] = {}
    for r, hold in locked:
        by_key.setdefault((r.metric, hold), []).append(r.t_ms)
    return [
        Refusal(
            Reason.PERIOD_LOCKED,
            len(t),
            min(t),
            max(t),
            metric,
            HELD_DETAIL if hold else LOCKED_DETAIL,
        )
        for (metric, hold), t in by_key.items()
    ]


async def _hold(
    conn: Conn, held: Sequence[tuple[int, AcceptedEnvelope, int]], received_ms: int
) -> None:
    if not held:
        return
    readings = [e.readings[i] for _, e, i in held]
    received = from_ms(received_ms)
    await conn.execute(
        _HOLD,
        (
            [lock for lock, _, _ in held],
            [from_ms(r.t_ms) for r in readings],
            [e.participant_id for _, e, _ in held],
            [r.metric for r in readings],
            [r.value for r in readings],
            [r.unit for r in readings],
            [e.dev for _, e, _ in held],
            [e.seq for _, e, _ in held],
            [r.sensor for r in readings],
            [received] * len(held),
            [e.consent_ids[i] for _, e, i in held],
            # A two-dimensional array cannot hold rows of different lengths: each
            # reading's flags as one text, split back on release.
            [",".join(r.flags) if r.flags else None for r in readings],
            [r.user for r in readings],
        ),
    )


async def lock_period(
    conn: Conn, study_id: str, start: datetime, end: datetime, reason: str, *, actor: str
) -> int:
    """Lock a study's period [start, end) to new data; returns the lock's id. Audited."""
    said = _reason(reason)
    if start >= end:
        raise LockError("the period ends before it starts")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        cur = await conn.execute(
            "SELECT EXISTS (SELECT 1 FROM studies WHERE study_id = %s)", (study_id,)
        )
        row = await cur.fetchone()
        if row is None or not row[0]:
            raise UnknownStudy(f"no study {study_id!r}")
        cur = await conn.execute(
            "INSERT INTO period_locks (study_id, from_time, to_time, reason, locked_by)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING lock_id",
            (study_id, start, end, said, actor),
        )
        created = await cur.fetchone()
        assert created is not None
        lock_id = int(created[0])
        await audit.append(
            conn,
            actor=actor,
            action="period.lock",
            entity="study",
            entity_id=study_id,
            detail={"lock_id": lock_id, "from": start.isoformat(), "to": end.isoformat()},
            reason=said,
        )
    return lock_id


_RELEASE = """
WITH released AS (
    UPDATE held_readings SET released_at = now()
    WHERE lock_id = %s AND released_at IS NULL
    RETURNING time, participant_id, metric, value, unit, device_id, seq, sensor, received_at,
              consent_id, flags, device_user
)
INSERT INTO readings (time, participant_id, metric, value, unit, device_id, seq, sensor,
    received_at, consent_id, flags, device_user)
SELECT time, participant_id, metric, value, unit, device_id, seq, sensor, received_at,
       consent_id, string_to_array(flags, ','), device_user
FROM released
RETURNING participant_id, device_id, seq, time, metric, value, unit, sensor, flags, device_user
"""
_HELD_TIMES = "SELECT DISTINCT time FROM held_readings WHERE lock_id = %s AND released_at IS NULL"


@dataclass(frozen=True, slots=True)
class Released:
    """A held reading now stored, with the envelope that carried it."""

    participant_id: str
    device_id: str
    seq: int
    reading: Reading


async def unlock(
    conn: Conn, lock_id: int, reason: str, *, actor: str, mode: StorageMode
) -> list[Released]:
    """Lift a lock: later data for its period is stored again, and the readings held for it
    are stored now (as late readings: what derives from readings is told, as the writer
    tells it). Audited; returns what was released."""
    said = _reason(reason)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        cur = await conn.execute(
            "UPDATE period_locks SET unlocked_at = now(), unlocked_by = %s, unlock_reason = %s"
            " WHERE lock_id = %s AND unlocked_at IS NULL RETURNING study_id",
            (actor, said, lock_id),
        )
        row = await cur.fetchone()
        if row is None:
            raise LockError(f"no lock {lock_id} in force")
        if mode is StorageMode.PLAIN:
            cur = await conn.execute(_HELD_TIMES, (lock_id,))
            starts = {partition_start_ms(to_ms(r[0])) for r in await cur.fetchall()}
            await ensure_partitions(conn, starts)
        cur = await conn.execute(_RELEASE, (lock_id,))
        released = [
            Released(
                str(r[0]),
                str(r[1]),
                int(r[2]),
                Reading(to_ms(r[3]), r[4], r[5], r[6], r[7], tuple(r[8]) if r[8] else (), r[9]),
            )
            for r in await cur.fetchall()
        ]
        await _derive(conn, released, mode)
        await audit.append(
            conn,
            actor=actor,
            action="period.unlock",
            entity="study",
            entity_id=str(row[0]),
            detail={"lock_id": lock_id, "released": len(released)},
            reason=said,
        )
    return released


async def _derive(conn: Conn, released: Sequence[Released], mode: StorageMode) -> None:
    """What the writer derives from stored readings, for the released ones: rollups (plain
    mode), adherence, and sign-offs their period outdates. Alert rules do not see them: a
    period is locked after review, and its alerts were handled then."""
    by_envelope: dict[tuple[str, str, int], list[Reading]] = {}
    for r in released:
        by_envelope.setdefault((r.participant_id, r.device_id, r.seq), []).append(r.reading)
    await deltas.add(conn, mode, [(p, rs) for (p, _, _), rs in by_envelope.items()])
    await review.note_changes(conn, [(p, d, s, rs) for (p, d, s), rs in by_envelope.items()])


_LOCK_ROWS = """
SELECT l.lock_id, l.study_id, l.from_time, l.to_time, l.reason, l.locked_by, l.locked_at,
       l.unlocked_by, l.unlocked_at, l.unlock_reason,
       (SELECT count(*) FROM held_readings h
        WHERE h.lock_id = l.lock_id AND h.released_at IS NULL) AS held
FROM period_locks l
"""
_LOCKS = _LOCK_ROWS + "WHERE l.study_id = %s ORDER BY l.lock_id"
_LOCK_OF = _LOCK_ROWS + "WHERE l.lock_id = %s"


async def locks(conn: Conn, study_id: str) -> list[PeriodLock]:
    """A study's locks, lifted ones included, with the readings each holds."""
    async with conn.cursor(row_factory=class_row(PeriodLock)) as cur:
        await cur.execute(_LOCKS, (study_id,))
        return await cur.fetchall()


async def set_late_data_policy(
    conn: Conn, study_id: str, policy: LateDataPolicy, *, actor: str
) -> None:
    """Refuse, or hold for an unlock, what arrives for a locked period. Audited."""
    await set_study_setting(
        conn, study_id, StudySetting.LATE_DATA_POLICY, policy.value, actor=actor
    )


_POLICY = "SELECT late_data_policy FROM studies WHERE study_id = %s"


async def study_policy(conn: Conn, study_id: str) -> LateDataPolicy | None:
    """The study's late data policy; None when there is no such study."""
    cur = await conn.execute(_POLICY, (study_id,))
    row = await cur.fetchone()
    return None if row is None else LateDataPolicy(str(row[0]))


async def lock_of(conn: Conn, lock_id: int) -> PeriodLock | None:
    """One lock, lifted or not, with the readings it holds; None when there is none."""
    async with conn.cursor(row_factory=class_row(PeriodLock)) as cur:
        await cur.execute(_LOCK_OF, (lock_id,))
        return await cur.fetchone()
