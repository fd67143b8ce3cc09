"""What the consent record modules share: the consent lock, the rule that each function
owns its transactions, the participant acted for, and the audit record of a refused attempt.

Names with a leading underscore are private to the ``consent`` package."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from argon2 import PasswordHasher
from psycopg.pq import TransactionStatus

from consent import errors
from consent.actors import Actor
from storage import audit, users
from storage.db import Conn

log = logging.getLogger(__name__)

# Fixed key of the consent lock: shared while the gateway reads consent, exclusive while a
# consent row is written ("trialstream consent").
CONSENT_LOCK_KEY = 0x7472_636F_6E73_6E74
# As the participants table's CHECK: anything else cannot name a participant.
_PARTICIPANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _require_idle(conn: Conn) -> None:
    if conn.info.transaction_status is not TransactionStatus.IDLE:
        raise errors.TransactionOpen(
            "consent functions own their transactions: call them with none open"
        )


async def _refused(
    conn: Conn,
    actor: Actor,
    action: str,
    participant_id: str,
    exc: errors.ConsentError,
    detail: Mapping[str, object] | None = None,
) -> None:
    """Record a refused attempt; the caller then raises ``exc``."""
    if not _PARTICIPANT_ID.fullmatch(participant_id):
        participant_id = "(not a participant id)"
    async with conn.transaction():
        await audit.append(
            conn,
            actor=actor.user,
            action=f"{action}.refused",
            entity="participant",
            entity_id=participant_id,
            detail={
                "participant_id": participant_id,
                "error": type(exc).__name__,
                **(detail or {}),
            },
            reason=str(exc),
        )
    log.info(
        "consent attempt refused action=%s participant=%s actor=%s error=%s",
        action,
        participant_id,
        actor.user,
        type(exc).__name__,
    )


# --- participants and permissions -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Participant:
    participant_id: str
    study_id: str
    site_id: str
    withdrawal_policy: str
    witness_required: bool


async def _participant(conn: Conn, participant_id: str) -> _Participant:
    if not _PARTICIPANT_ID.fullmatch(participant_id):
        raise errors.UnknownParticipant(f"no participant {participant_id!r}")
    cur = await conn.execute(
        "SELECT p.study_id, p.site_id, s.withdrawal_policy, s.consent_witness_required"
        " FROM participants p JOIN studies s USING (study_id) WHERE p.participant_id = %s",
        (participant_id,),
    )
    row = await cur.fetchone()
    if row is None:
        raise errors.UnknownParticipant(f"no participant {participant_id!r}")
    return _Participant(participant_id, str(row[0]), str(row[1]), str(row[2]), bool(row[3]))


async def _now(conn: Conn) -> datetime:
    cur = await conn.execute("SELECT clock_timestamp()")
    row = await cur.fetchone()
    assert row is not None
    now: datetime = row[0]
    return now


async def _reauthenticate(
    conn: Conn, username: str, password: str, hasher: PasswordHasher
) -> users.User:
    """The signer of an e-signed act, re-authenticated with the password entered for it
    (a failure counts toward the account's lockout); else ``ReauthenticationFailed``."""
    try:
        return await users.verify_password(conn, username, password, hasher=hasher)
    except users.UserError as exc:
        raise errors.ReauthenticationFailed(
            f"re-authentication failed: {type(exc).__name__}"
        ) from exc
