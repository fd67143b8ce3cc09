"""The consent the gate and the checks read: snapshots of participants' consent events and
re-consent deadlines, under the shared consent lock, and the check that none changed since."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncCursor

from consent import errors
from consent.common import CONSENT_LOCK_KEY, _now
from consent.documents import document_key
from consent.gate import ConsentEvent, ConsentSnapshot
from consent.gate import ReconsentRequirement as Requirement
from storage.db import Conn
from storage.timeconv import to_ms

# --- the snapshot the gate and the checks use ---------------------------------------------

_EVENTS = """
WITH ranked AS (
    SELECT document_id, study_id, title,
           dense_rank() OVER (PARTITION BY study_id, title ORDER BY effective_at) AS rank
    FROM consent_documents
)
SELECT c.consent_id, c.participant_id, c.action, c.scopes, c.effective_at,
       r.study_id, r.title, r.rank, c.data_policy = 'delete'
FROM consents c JOIN ranked r USING (document_id)
WHERE c.participant_id {whose}
"""
_REQUIREMENTS = """
WITH ranked AS (
    SELECT study_id, title, reconsent_by,
           dense_rank() OVER (PARTITION BY study_id, title ORDER BY effective_at) AS rank
    FROM consent_documents
)
SELECT DISTINCT study_id, title, rank, reconsent_by FROM ranked
WHERE reconsent_by IS NOT NULL AND study_id IN (
    SELECT study_id FROM participants WHERE participant_id {whose})
"""
# Whose consent a snapshot reads: participants by id, or the participants owning devices.
_OF_PARTICIPANTS = "= ANY(%s)"
_OF_DEVICES = "IN (SELECT participant_id FROM devices WHERE device_id = ANY(%s))"
# (events, requirements) statements by whose consent they read.
_SNAPSHOT_SQL = {
    whose: (_EVENTS.format(whose=whose), _REQUIREMENTS.format(whose=whose))
    for whose in (_OF_PARTICIPANTS, _OF_DEVICES)
}


def _events(rows: Iterable[tuple[Any, ...]]) -> Iterable[ConsentEvent]:
    for cid, pid, action, scopes, eff, study, title, rank, purge in rows:
        yield ConsentEvent(
            int(cid),
            str(pid),
            str(action),
            frozenset(scopes),
            to_ms(eff),
            document_key(str(study), str(title)),
            int(rank),
            purge=bool(purge),
        )


async def snapshot(conn: Conn, participants: Collection[str]) -> ConsentSnapshot:
    """The consent events and re-consent deadlines of these participants, as the gate needs.

    Takes the shared consent lock for the rest of the caller's transaction first, so a
    consent change being written is either complete in what is read or not yet effective.
    The three statements go in one round trip.
    """
    if not participants:
        return ConsentSnapshot()
    async with conn.pipeline():
        pending = await send_snapshot(conn, participants=participants)
    return await pending.result()


class PendingSnapshot:
    """A consent snapshot whose statements are sent; ``result()`` reads it (in pipeline
    mode, once the caller's pipeline has synced)."""

    def __init__(self, events: AsyncCursor[Any], requirements: AsyncCursor[Any]) -> None:
        self._events = events
        self._requirements = requirements

    async def result(self) -> ConsentSnapshot:
        events = list(_events(await self._events.fetchall()))
        reqs = [
            Requirement(document_key(str(s), str(t)), int(r), to_ms(d))
            for s, t, r, d in await self._requirements.fetchall()
        ]
        return ConsentSnapshot.from_events(events, reqs)


async def send_snapshot(
    conn: Conn,
    *,
    participants: Collection[str] | None = None,
    devices: Collection[str] | None = None,
) -> PendingSnapshot:
    """Send the statements of a consent snapshot (as :func:`snapshot`) of these participants,
    or of the participants owning these devices (one of the two), shared lock first.

    In pipeline mode nothing waits: the statements travel with whatever else the caller
    queues, and the gateway reads a batch's devices and their consent in one round trip."""
    if (participants is None) == (devices is None):
        raise TypeError("send_snapshot takes participants or devices")
    if participants is not None:
        (events_sql, requirements_sql), ids = _SNAPSHOT_SQL[_OF_PARTICIPANTS], list(participants)
    else:
        (events_sql, requirements_sql), ids = _SNAPSHOT_SQL[_OF_DEVICES], list(devices or ())
    await conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (CONSENT_LOCK_KEY,))
    events = await conn.execute(events_sql, (ids,))
    requirements = await conn.execute(requirements_sql, (ids,))
    return PendingSnapshot(events, requirements)


_CHANGED_SINCE = (
    "SELECT consent_id FROM consents WHERE participant_id = ANY(%s) AND consent_id > %s LIMIT 1"
)


async def confirm_unchanged(
    conn: Conn, participants: Collection[str], snapshot: ConsentSnapshot
) -> None:
    """First statement of a write transaction whose readings were judged on ``snapshot``.

    Takes the shared consent lock until COMMIT, so no consent change can commit between this
    check and the batch's commit; then raises :class:`errors.ConsentChanged` if one committed
    since the snapshot was read. A withdrawal therefore either precedes the batch (which is
    judged again, on consent that includes it) or waits for its commit (and its ``delete``
    policy then deletes the batch's readings too).
    """
    if not participants:
        return
    # Two statements, so the check's snapshot is taken once the lock is held; one round trip.
    async with conn.pipeline():
        await conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (CONSENT_LOCK_KEY,))
        cur = await conn.execute(_CHANGED_SINCE, (list(participants), snapshot.watermark))
    row = await cur.fetchone()
    if row is not None:
        raise errors.ConsentChanged(
            f"consent row {row[0]} was written after the batch's consent was read"
        )


# --- the consent in force now, for signing and withdrawing ------------------------------


@dataclass(frozen=True, slots=True)
class _Current:
    consent_id: int
    document_id: int
    scopes: frozenset[str]


async def _current(conn: Conn, participant_id: str) -> _Current | None:
    """The consent in force now for the participant (under the caller's consent lock)."""
    snap = await snapshot(conn, [participant_id])
    now = await _now(conn)
    state = snap.state_at(participant_id, to_ms(now))
    if state is None or state.consent_id is None:
        return None
    cur = await conn.execute(
        "SELECT document_id FROM consents WHERE consent_id = %s", (state.consent_id,)
    )
    row = await cur.fetchone()
    assert row is not None
    return _Current(state.consent_id, int(row[0]), state.scopes)
