"""Review sign-offs (``review_signoffs``, docs/review.md): an investigator or monitor signs
that they reviewed a participant's data over a period, with the meaning of the signature,
after re-authenticating (the caller's check). The readings of the period are counted at
signing. Data stored later for a signed period marks the sign-off outdated, and
``review_changes`` records what arrived, envelope by envelope: ``note_changes`` runs in the
transaction that stores it (the writer's, or an unlock's releasing held readings).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from psycopg.rows import class_row

from ingest.model import Reading
from storage import audit
from storage.db import Conn
from storage.errors import StorageError
from storage.timeconv import from_ms, to_ms

MAX_MEANING: Final = 200


class ReviewError(StorageError):
    """A sign-off that cannot be: its message says why."""


@dataclass(frozen=True, slots=True)
class Signer:
    username: str
    display_name: str
    role: str


@dataclass(frozen=True, slots=True)
class Change:
    device_id: str
    seq: int
    readings: int
    first_time: datetime
    last_time: datetime
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class SignOff:
    signoff_id: int
    participant_id: str
    from_time: datetime
    to_time: datetime
    meaning: str
    signer: str
    signer_name: str
    signer_role: str
    signed_at: datetime
    readings: int
    outdated_at: datetime | None


@dataclass(frozen=True, slots=True)
class _Open:
    signoff_id: int
    participant_id: str
    from_time: datetime
    to_time: datetime


_COUNT = "SELECT count(*) FROM readings WHERE participant_id = %s AND time >= %s AND time < %s"
_SIGN = """
INSERT INTO review_signoffs (participant_id, from_time, to_time, meaning, signer, signer_name,
    signer_role, readings)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
RETURNING signoff_id
"""
_OF = """
SELECT signoff_id, participant_id, from_time, to_time FROM review_signoffs
WHERE participant_id = ANY(%s)
"""
_CHANGES = """
INSERT INTO review_changes (signoff_id, device_id, seq, readings, first_time, last_time)
SELECT * FROM unnest(%b::int8[], %b::text[], %b::int8[], %b::int4[], %b::timestamptz[],
                     %b::timestamptz[])
"""
_OUTDATE = """
UPDATE review_signoffs SET outdated_at = now()
WHERE signoff_id = ANY(%s) AND outdated_at IS NULL
"""
_LIST = """
SELECT signoff_id, participant_id, from_time, to_time, meaning, signer, signer_name,
       signer_role, signed_at, readings, outdated_at
FROM review_signoffs WHERE participant_id = %s ORDER BY from_time, signoff_id
"""
_CHANGES_OF = """
SELECT signoff_id, device_id, seq, readings, first_time, last_time, recorded_at
FROM review_changes WHERE signoff_id = ANY(%s) ORDER BY recorded_at, device_id, seq
"""


async def sign_off(
    conn: Conn,
    participant_id: str,
    start: datetime,
    end: datetime,
    meaning: str,
    *,
    signer: Signer,
) -> int:
    """Sign that ``signer`` reviewed the participant's data of [start, end). Audited."""
    said = meaning.strip()
    if not 1 <= len(said) <= MAX_MEANING:
        raise ReviewError(f"give the signature's meaning in 1 to {MAX_MEANING} characters")
    if start >= end:
        raise ReviewError("the period ends before it starts")
    async with conn.transaction():
        cur = await conn.execute(_COUNT, (participant_id, start, end))
        counted = await cur.fetchone()
        assert counted is not None
        cur = await conn.execute(
            _SIGN,
            (
                participant_id,
                start,
                end,
                said,
                signer.username,
                signer.display_name,
                signer.role,
                int(counted[0]),
            ),
        )
        row = await cur.fetchone()
        assert row is not None
        signoff_id = int(row[0])
        await audit.append(
            conn,
            actor=signer.username,
            action="review.sign",
            entity="participant",
            entity_id=participant_id,
            detail={
                "signoff_id": signoff_id,
                "from": start.isoformat(),
                "to": end.isoformat(),
                "meaning": said,
                "readings": int(counted[0]),
            },
        )
    return signoff_id


Stored = tuple[str, str, int, Sequence[Reading]]  # participant, device, seq, readings


async def note_changes(conn: Conn, stored: Sequence[Stored]) -> int:
    """Record what ``stored`` adds to signed periods and mark those sign-offs outdated, in
    the caller's transaction. One indexed query when no participant of it has a sign-off."""
    participants = sorted({p for p, _, _, readings in stored if readings})
    if not participants:
        return 0
    async with conn.cursor(row_factory=class_row(_Open)) as cur:
        await cur.execute(_OF, (participants,))
        signed = await cur.fetchall()
    if not signed:
        return 0
    by_participant: dict[str, list[tuple[int, int, int]]] = {}
    for s in signed:
        by_participant.setdefault(s.participant_id, []).append(
            (s.signoff_id, to_ms(s.from_time), to_ms(s.to_time))
        )
    rows: list[tuple[int, str, int, int, int, int]] = []
    for participant, device, seq, readings in stored:
        for signoff_id, start, end in by_participant.get(participant, ()):
            times = [r.t_ms for r in readings if start <= r.t_ms < end]
            if times:
                rows.append((signoff_id, device, seq, len(times), min(times), max(times)))
    if rows:
        await conn.execute(
            _CHANGES,
            (
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [r[3] for r in rows],
                [from_ms(r[4]) for r in rows],
                [from_ms(r[5]) for r in rows],
            ),
        )
        await conn.execute(_OUTDATE, (sorted({r[0] for r in rows}),))
    return len(rows)


async def signoffs(conn: Conn, participant_id: str) -> list[SignOff]:
    """A participant's sign-offs, by period."""
    async with conn.cursor(row_factory=class_row(SignOff)) as cur:
        await cur.execute(_LIST, (participant_id,))
        return await cur.fetchall()


@dataclass(frozen=True, slots=True)
class _ChangeRow:
    signoff_id: int
    device_id: str
    seq: int
    readings: int
    first_time: datetime
    last_time: datetime
    recorded_at: datetime


async def changes(conn: Conn, signoff_ids: Collection[int]) -> dict[int, list[Change]]:
    """What arrived after each sign-off, in the order it was stored."""
    out: dict[int, list[Change]] = {s: [] for s in signoff_ids}
    async with conn.cursor(row_factory=class_row(_ChangeRow)) as cur:
        await cur.execute(_CHANGES_OF, (list(signoff_ids),))
        for c in await cur.fetchall():
            out[c.signoff_id].append(
                Change(c.device_id, c.seq, c.readings, c.first_time, c.last_time, c.recorded_at)
            )
    return out
