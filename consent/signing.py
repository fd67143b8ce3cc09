"""Signing consent: the participant's e-signature on a document version."""

from __future__ import annotations

import logging
from collections.abc import Collection

from argon2 import PasswordHasher

from consent import errors
from consent.actors import Actor
from consent.common import (
    CONSENT_LOCK_KEY,
    _now,
    _participant,
    _reauthenticate,
    _refused,
    _require_idle,
)
from consent.documents import _DOC_BY_ID, _doc
from consent.gate import CONSENT
from consent.history import ConsentRecord
from consent.snapshots import _current
from storage import audit, users
from storage.db import Conn

log = logging.getLogger(__name__)

MEANING_CONSENT = "consent"


# --- signing -------------------------------------------------------------------------------


async def sign(
    conn: Conn,
    actor: Actor,
    *,
    participant_id: str,
    document_id: int,
    scopes: Collection[str],
    printed_name: str,
    username: str,
    password: str,
    witness: str | None = None,
    hasher: PasswordHasher = users.DEFAULT_HASHER,
) -> ConsentRecord:
    """Record the participant's e-signature on a document version (21 CFR 11.50, 11.200).

    The signer re-authenticates with the participant's own account (``username``,
    ``password``); the record holds the printed name, the time, the meaning ("consent"),
    the signed document's hash, the scopes granted (optional ones may be declined) and the
    witness where the study requires one. The actor is the participant, or staff of the
    participant's site (signing in clinic). Refused attempts are audited.
    """
    _require_idle(conn)
    action = "consent.sign"
    try:
        p = await _participant(conn, participant_id)
        if not (actor.is_participant(participant_id) or actor.covers_site(p.site_id)):
            raise errors.NotPermitted(f"{actor.user} may not act for {participant_id}")
        cur = await conn.execute(_DOC_BY_ID, (document_id,))
        row = await cur.fetchone()
        if row is None or _doc(row).study_id != p.study_id:
            raise errors.UnknownVersion(f"no consent document {document_id} in study {p.study_id}")
        doc = _doc(row)
        now = await _now(conn)
        if doc.effective_at > now:
            raise errors.VersionNotEffective(
                f"version {doc.version} takes effect at {doc.effective_at.isoformat()}"
            )
        cur = await conn.execute(
            "SELECT version FROM consent_documents WHERE study_id = %s AND title = %s"
            " AND version <> %s AND effective_at > %s AND effective_at <= %s"
            " ORDER BY effective_at DESC LIMIT 1",
            (doc.study_id, doc.title, doc.version, doc.effective_at, now),
        )
        newer = await cur.fetchone()
        if newer is not None:
            raise errors.SupersededVersion(
                f"version {doc.version} is superseded by version {newer[0]}"
            )
        granted = frozenset(scopes)
        if not granted <= doc.scopes:
            raise errors.InvalidScopes(
                f"scopes {sorted(granted - doc.scopes)} are not in the document"
            )
        if not doc.required_scopes <= granted:
            raise errors.InvalidScopes(
                f"required scopes {sorted(doc.required_scopes - granted)} cannot be declined"
            )
        if not printed_name.strip():
            raise errors.InvalidScopes("the signer's printed name is required")
        if p.witness_required and not (witness and witness.strip()):
            raise errors.WitnessRequired(f"study {p.study_id} requires a witness")
        await conn.commit()
        signer = await _reauthenticate(conn, username, password, hasher)
        if signer.role is not users.Role.PARTICIPANT or signer.participant_id != participant_id:
            raise errors.ReauthenticationFailed(
                "the signature needs the participant's own credential"
            )
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (CONSENT_LOCK_KEY,))
            current = await _current(conn, participant_id)
            if (
                current is not None
                and current.document_id == document_id
                and (current.scopes == granted)
            ):
                raise errors.AlreadySigned(
                    f"{participant_id} already consented to version {doc.version} with these scopes"
                )
            cur = await conn.execute(
                "INSERT INTO consents (participant_id, document_id, action, scopes, signer_name,"
                " signed_at, meaning, document_sha256, witness, recorded_by, effective_at,"
                " signer_user_id) SELECT %s, %s, 'consent', %s, %s, t, %s, %s, %s, %s, t, %s"
                " FROM clock_timestamp() t RETURNING consent_id, effective_at",
                (
                    participant_id,
                    document_id,
                    sorted(granted),
                    printed_name.strip(),
                    MEANING_CONSENT,
                    doc.content_sha256,
                    witness,
                    actor.user,
                    signer.user_id,
                ),
            )
            inserted = await cur.fetchone()
            assert inserted is not None
            consent_id, effective = int(inserted[0]), inserted[1]
            await audit.append(
                conn,
                actor=actor.user,
                action=action,
                entity="consent",
                entity_id=str(consent_id),
                detail={
                    "participant_id": participant_id,
                    "document_id": document_id,
                    "version": doc.version,
                    "language": doc.language,
                    "document_sha256": doc.content_sha256.hex(),
                    "scopes": sorted(granted),
                    "declined": sorted(doc.scopes - granted),
                    "signer": username,
                    "printed_name": printed_name.strip(),
                    "meaning": MEANING_CONSENT,
                    "witness": witness,
                    "effective_at": effective,
                },
            )
    except errors.ConsentError as exc:
        await conn.rollback()
        await _refused(conn, actor, action, participant_id, exc, {"document_id": document_id})
        raise
    log.info(
        "consent signed participant=%s consent_id=%d version=%s",
        participant_id,
        consent_id,
        doc.version,
    )
    return ConsentRecord(
        consent_id,
        participant_id,
        document_id,
        doc.version,
        CONSENT,
        granted,
        printed_name.strip(),
        effective,
        MEANING_CONSENT,
        doc.content_sha256,
        witness,
        actor.user,
        None,
        None,
        None,
        effective,
        None,
    )
