"""Withdrawing consent, in full or by scope, as an e-signed act, and the deletion of data
held that the study's withdrawal policy asks for."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from argon2 import PasswordHasher

from consent import errors
from consent.actors import Actor
from consent.common import (
    CONSENT_LOCK_KEY,
    _participant,
    _reauthenticate,
    _refused,
    _require_idle,
)
from consent.gate import WITHDRAW, WITHDRAW_SCOPE
from consent.snapshots import _current
from ingest.metrics import METRICS
from storage import audit, users
from storage.db import Conn

log = logging.getLogger(__name__)


class Initiator(StrEnum):
    PARTICIPANT = "participant"
    SITE = "site"


class ReceivedVia(StrEnum):
    """How a participant's request to withdraw reached the site staff who record it."""

    IN_PERSON = "in_person"
    PHONE = "phone"
    VIDEO_VISIT = "video_visit"
    LETTER = "letter"
    EMAIL = "email"


@dataclass(frozen=True, slots=True)
class WithdrawalSignature:
    """The e-signature on a withdrawal (21 CFR 11.50, 11.200): whoever records it re-enters
    their own password. Staff recording a participant's request say how it reached them."""

    username: str
    password: str
    received_via: ReceivedVia | None = None


# The meaning recorded with each kind of withdrawal signature.
MEANING_BY_PARTICIPANT = "withdrawal of consent, by the participant"
MEANING_REQUEST_RECORDED = "withdrawal requested by the participant, recorded by site staff"
MEANING_BY_SITE = "withdrawal decided by the site"


@dataclass(frozen=True, slots=True)
class Withdrawal:
    consent_id: int
    participant_id: str
    scopes: frozenset[str]
    full: bool
    data_policy: str
    readings_deleted: int
    effective_at: datetime


# --- withdrawal ----------------------------------------------------------------------------


async def withdraw(
    conn: Conn,
    actor: Actor,
    *,
    participant_id: str,
    initiated_by: Initiator,
    signature: WithdrawalSignature,
    scopes: Collection[str] | None = None,
    reason: str | None = None,
    hasher: PasswordHasher = users.DEFAULT_HASHER,
) -> Withdrawal:
    """End consent now: all of it, or only ``scopes`` (partial withdrawal), as an e-signed act.

    Immediate for new data. Data already held follows the study's policy: ``retain`` keeps
    it; ``delete`` deletes the withdrawn scopes' readings in the same transaction, with a
    ``withdrawal_deletions`` row (counts and time span, never values) and an audit record.
    The participant withdraws for themself, signing with their own password; site staff
    record a withdrawal for their sites, signing with their own password, with a reason, and
    for a participant's request, how it was received (``signature.received_via``).
    """
    _require_idle(conn)
    action = "consent.withdraw"
    try:
        p = await _participant(conn, participant_id)
        own = actor.is_participant(participant_id)
        if own:
            if initiated_by is not Initiator.PARTICIPANT:
                raise errors.NotPermitted("a participant's own withdrawal is initiated by them")
            meaning = MEANING_BY_PARTICIPANT
        elif not actor.covers_site(p.site_id):
            raise errors.NotPermitted(f"{actor.user} may not act for {participant_id}")
        elif initiated_by is Initiator.PARTICIPANT:
            meaning = MEANING_REQUEST_RECORDED
        else:
            meaning = MEANING_BY_SITE
        _check_withdrawal_record(own, initiated_by, signature, reason)
        await conn.commit()
        signer = await _own_signature(conn, actor, signature, hasher)
        await conn.commit()
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (CONSENT_LOCK_KEY,))
            current = await _current(conn, participant_id)
            if current is None:
                raise errors.NotConsented(f"{participant_id} has no consent in force")
            if scopes is None:
                withdrawn, kind = current.scopes, WITHDRAW
            else:
                withdrawn, kind = frozenset(scopes), WITHDRAW_SCOPE
                if not withdrawn:
                    raise errors.InvalidScopes("name at least one scope to withdraw")
                if missing := withdrawn - current.scopes:
                    raise errors.ScopeNotGranted(f"scopes {sorted(missing)} are not granted now")
            received = signature.received_via.value if signature.received_via else None
            cur = await conn.execute(
                "INSERT INTO consents (participant_id, document_id, action, scopes, signed_at,"
                " recorded_by, effective_at, initiated_by, reason, data_policy, signer_name,"
                " meaning, signer_user_id, received_via)"
                " SELECT %s, %s, %s, %s, t, %s, t, %s, %s, %s, %s, %s, %s, %s"
                " FROM clock_timestamp() t RETURNING consent_id, effective_at",
                (
                    participant_id,
                    current.document_id,
                    kind,
                    sorted(withdrawn),
                    actor.user,
                    initiated_by.value,
                    reason,
                    p.withdrawal_policy,
                    signer.display_name,
                    meaning,
                    signer.user_id,
                    received,
                ),
            )
            row = await cur.fetchone()
            assert row is not None
            consent_id, effective = int(row[0]), row[1]
            await audit.append(
                conn,
                actor=actor.user,
                action=action,
                entity="consent",
                entity_id=str(consent_id),
                detail={
                    "participant_id": participant_id,
                    "kind": kind,
                    "scopes": sorted(withdrawn),
                    "ends_consent_id": current.consent_id,
                    "initiated_by": initiated_by.value,
                    "data_policy": p.withdrawal_policy,
                    "effective_at": effective,
                    "signer": signer.username,
                    "meaning": meaning,
                    "received_via": received,
                },
                reason=reason,
            )
            deleted = 0
            if p.withdrawal_policy == "delete":
                deleted = await _delete_held(conn, actor, consent_id, participant_id, withdrawn)
    except errors.ConsentError as exc:
        await conn.rollback()
        await _refused(conn, actor, action, participant_id, exc)
        raise
    log.info(
        "consent withdrawn participant=%s consent_id=%d kind=%s policy=%s",
        participant_id,
        consent_id,
        kind,
        p.withdrawal_policy,
    )
    return Withdrawal(
        consent_id,
        participant_id,
        withdrawn,
        kind == WITHDRAW,
        p.withdrawal_policy,
        deleted,
        effective,
    )


def _check_withdrawal_record(
    own: bool, initiated_by: Initiator, signature: WithdrawalSignature, reason: str | None
) -> None:
    """Staff say why they record a withdrawal and, for a participant's request, how it came;
    a participant's own withdrawal came through their own account."""
    if own:
        if signature.received_via is not None:
            raise errors.IncompleteWithdrawal("a participant's own withdrawal is not 'received'")
        return
    if not (reason and reason.strip()):
        raise errors.IncompleteWithdrawal("staff recording a withdrawal give the reason")
    if initiated_by is Initiator.PARTICIPANT and signature.received_via is None:
        raise errors.IncompleteWithdrawal(
            "say how the participant's request was received (in person, phone, ...)"
        )
    if initiated_by is Initiator.SITE and signature.received_via is not None:
        raise errors.IncompleteWithdrawal("a withdrawal the site decided was not 'received'")


async def _own_signature(
    conn: Conn, actor: Actor, signature: WithdrawalSignature, hasher: PasswordHasher
) -> users.User:
    """The signer, re-authenticated with their own credential: the acting user's own."""
    signer = await _reauthenticate(conn, signature.username, signature.password, hasher)
    if signer.username != actor.user:
        raise errors.ReauthenticationFailed("the signature needs the acting user's own credential")
    return signer


async def _delete_held(
    conn: Conn, actor: Actor, consent_id: int, participant_id: str, scopes: frozenset[str]
) -> int:
    metrics = sorted(m.name for m in METRICS.values() if m.scope in scopes)
    # The hourly rollups of what is deleted are recomputed (to nothing) by the next refresh.
    # The signed originals of the envelopes that carried deleted readings go too: they hold
    # those readings' values (the envelope rows, digests and counts without values, stay).
    cur = await conn.execute(
        "WITH gone AS (DELETE FROM readings WHERE participant_id = %(pid)s"
        " AND metric = ANY(%(metrics)s) RETURNING time, metric, device_id, seq),"
        " hours AS (SELECT DISTINCT metric, floor(extract(epoch FROM time) / 3600)::bigint AS h"
        " FROM gone),"
        " noted AS (INSERT INTO rollup_invalidations (participant_ids, metrics, hours)"
        " SELECT array_agg(%(pid)s::text), array_agg(metric), array_agg(h) FROM hours"
        " HAVING count(*) > 0),"
        # Readings held for a locked period's unlock are the participant's data too (those
        # released since are in readings: counted there, their held copies deleted here).
        " held AS (DELETE FROM held_readings WHERE participant_id = %(pid)s"
        " AND metric = ANY(%(metrics)s) RETURNING time, metric, device_id, seq, released_at),"
        " everything AS (SELECT * FROM gone UNION ALL"
        " SELECT time, metric, device_id, seq FROM held WHERE released_at IS NULL),"
        " originals AS (DELETE FROM envelope_originals o"
        " USING (SELECT device_id, seq FROM gone UNION SELECT device_id, seq FROM held) g"
        " WHERE o.device_id = g.device_id AND o.seq = g.seq RETURNING 1)"
        " SELECT count(*), min(time), max(time), (SELECT count(*) FROM originals)"
        " FROM everything",
        {"pid": participant_id, "metrics": metrics},
    )
    row = await cur.fetchone()
    assert row is not None
    count, first, last, originals = int(row[0]), row[1], row[2], int(row[3])
    await conn.execute(
        "INSERT INTO withdrawal_deletions (consent_id, participant_id, metrics, readings_deleted,"
        " first_time, last_time, deleted_by) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (consent_id, participant_id, metrics, count, first, last, actor.user),
    )
    await audit.append(
        conn,
        actor=actor.user,
        action="consent.data_deleted",
        entity="consent",
        entity_id=str(consent_id),
        detail={
            "participant_id": participant_id,
            "metrics": metrics,
            "readings_deleted": count,
            "originals_deleted": originals,
            "first_time": first,
            "last_time": last,
        },
        reason="withdrawal under the study's delete policy",
    )
    return count
