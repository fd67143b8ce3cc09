"""What consent records show: a participant's consent history, and the participants whose
re-consent is due."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from consent import errors
from consent.actors import Actor
from consent.common import _now, _participant, _require_idle
from consent.documents import document_key
from consent.gate import CONSENT, WITHDRAW
from consent.snapshots import snapshot
from storage import users
from storage.db import Conn
from storage.timeconv import to_ms


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    """One consent row, with the span it governed (``valid_to`` None: still in force)."""

    consent_id: int
    participant_id: str
    document_id: int
    version: str
    action: str
    scopes: frozenset[str]
    signer_name: str | None
    signed_at: datetime
    meaning: str | None
    document_sha256: bytes | None
    witness: str | None
    recorded_by: str
    initiated_by: str | None
    data_policy: str | None
    reason: str | None
    valid_from: datetime
    valid_to: datetime | None


@dataclass(frozen=True, slots=True)
class PendingReconsent:
    participant_id: str
    site_id: str
    current_version: str
    required_version: str
    reconsent_by: datetime
    overdue: bool


# --- views ---------------------------------------------------------------------------------


async def history(conn: Conn, actor: Actor, participant_id: str) -> list[ConsentRecord]:
    """Every consent row of the participant in order, with the span each governed."""
    _require_idle(conn)
    async with conn.transaction():
        return await _history(conn, actor, participant_id)


async def _history(conn: Conn, actor: Actor, participant_id: str) -> list[ConsentRecord]:
    p = await _participant(conn, participant_id)
    if not (actor.is_participant(participant_id) or actor.covers_site(p.site_id)):
        raise errors.NotPermitted(f"{actor.user} may not see {participant_id}")
    cur = await conn.execute(
        "SELECT c.consent_id, c.document_id, d.version, c.action, c.scopes, c.signer_name,"
        " c.signed_at, c.meaning, c.document_sha256, c.witness, c.recorded_by, c.initiated_by,"
        " c.data_policy, c.reason, c.effective_at"
        " FROM consents c JOIN consent_documents d USING (document_id)"
        " WHERE c.participant_id = %s ORDER BY c.effective_at, c.consent_id",
        (participant_id,),
    )
    rows = await cur.fetchall()
    out = []
    for i, (cid, did, version, act, scopes, signer, signed, meaning, sha, *rest) in enumerate(rows):
        witness, recorded_by, initiated, policy, reason, eff = rest
        # A consent or a scope change governs until the next consent or full withdrawal.
        ends = (r[14] for r in rows[i + 1 :] if r[3] in (CONSENT, WITHDRAW))
        out.append(
            ConsentRecord(
                int(cid),
                participant_id,
                int(did),
                str(version),
                str(act),
                frozenset(scopes),
                signer,
                signed,
                meaning,
                None if sha is None else bytes(sha),
                witness,
                str(recorded_by),
                initiated,
                policy,
                reason,
                eff,
                None if act == WITHDRAW else next(ends, None),
            )
        )
    return out


async def pending_reconsents(
    conn: Conn, actor: Actor, *, study_id: str | None = None
) -> list[PendingReconsent]:
    """Participants of the actor's sites whose consent in force is on a version older than
    one that requires re-consent, with the deadline (``overdue`` once it has passed)."""
    _require_idle(conn)
    async with conn.transaction():
        return await _pending(conn, actor, study_id)


async def _pending(conn: Conn, actor: Actor, study_id: str | None) -> list[PendingReconsent]:
    if actor.role is users.Role.PARTICIPANT:
        raise errors.NotPermitted("participants do not see other participants")
    cur = await conn.execute(
        "SELECT participant_id, site_id FROM participants"
        " WHERE (%s::text IS NULL OR study_id = %s) ORDER BY participant_id",
        (study_id, study_id),
    )
    sites = {str(pid): str(site) for pid, site in await cur.fetchall()}
    visible = [pid for pid, site in sites.items() if actor.covers_site(site)]
    if not visible:
        return []
    snap = await snapshot(conn, visible)
    now = await _now(conn)
    cur = await conn.execute(
        "WITH ranked AS (SELECT study_id, title, version, reconsent_by,"
        " dense_rank() OVER (PARTITION BY study_id, title ORDER BY effective_at) AS rank"
        " FROM consent_documents) SELECT DISTINCT study_id, title, version, rank, reconsent_by"
        " FROM ranked"
    )
    versions: dict[tuple[str, int], tuple[str, datetime | None]] = {}
    required: dict[str, list[tuple[int, datetime]]] = {}
    for s, t, v, r, by in await cur.fetchall():
        key = document_key(str(s), str(t))
        versions[(key, int(r))] = (str(v), by)
        if by is not None:
            required.setdefault(key, []).append((int(r), by))
    now_ms = to_ms(now)
    out = []
    for pid in visible:
        state = snap.state_at(pid, now_ms)
        if state is None:
            continue
        due = [(r, by) for r, by in required.get(state.document, []) if r > state.rank]
        if not due:
            continue
        rank, by = min(due, key=lambda d: d[1])
        out.append(
            PendingReconsent(
                pid,
                sites[pid],
                versions[(state.document, state.rank)][0],
                versions[(state.document, rank)][0],
                by,
                by <= now,
            )
        )
    return out
