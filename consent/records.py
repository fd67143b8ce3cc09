"""Consent documents, signatures, withdrawals and history: the functions behind the CLI and
(later) the HTTP API. Each takes a connection and an :class:`Actor` and owns its transactions,
because a refused attempt is audited and that record must commit although the call fails:
call them on a connection with no transaction open.

Consent rows are only inserted (a trigger refuses UPDATE and DELETE). Every change takes the
exclusive consent lock and stamps its effective time with ``clock_timestamp()`` after taking
it; the gateway reads consent under the shared lock (:func:`snapshot`). So a batch whose
consent was read before a withdrawal committed was read before the withdrawal's effective
time, and holds no reading measured after it; and its write transaction checks, under the
same lock held to COMMIT, that no consent row was written since (:func:`confirm_unchanged`),
so a ``delete`` withdrawal never runs between a batch's judgement and its commit
(docs/consent.md).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Any

from argon2 import PasswordHasher
from psycopg import AsyncCursor
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from consent import errors
from consent.gate import CONSENT, WITHDRAW, WITHDRAW_SCOPE, ConsentEvent, ConsentSnapshot
from consent.gate import ReconsentRequirement as Requirement
from ingest.metrics import METRICS
from storage import audit, users
from storage.db import Conn
from storage.timeconv import to_ms

log = logging.getLogger(__name__)

# Fixed key of the consent lock: shared while the gateway reads consent, exclusive while a
# consent row is written ("trialstream consent").
CONSENT_LOCK_KEY = 0x7472_636F_6E73_6E74
SCOPES = frozenset(m.scope for m in METRICS.values())
MEANING_CONSENT = "consent"
# As the participants table's CHECK: anything else cannot name a participant.
_PARTICIPANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


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


STAFF_ROLES = frozenset({users.Role.SITE_COORDINATOR, users.Role.CLINICIAN, users.Role.MONITOR})


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is acting: a user, their role, and the sites they work for (admin: all sites)."""

    user: str
    role: users.Role
    sites: frozenset[str] = frozenset()
    participant_id: str | None = None

    @classmethod
    def of(cls, user: users.User) -> Actor:
        return cls(user.username, user.role, user.sites, user.participant_id)

    def covers_site(self, site_id: str) -> bool:
        return self.role is users.Role.ADMIN or (self.role in STAFF_ROLES and site_id in self.sites)

    def is_participant(self, participant_id: str) -> bool:
        return self.role is users.Role.PARTICIPANT and self.participant_id == participant_id


@dataclass(frozen=True, slots=True)
class DocumentVersion:
    document_id: int
    study_id: str
    title: str
    version: str
    language: str
    uri: str | None
    content_sha256: bytes
    scopes: frozenset[str]
    optional_scopes: frozenset[str]
    approved_on: date | None
    effective_at: datetime
    reconsent_by: datetime | None

    @property
    def required_scopes(self) -> frozenset[str]:
        return self.scopes - self.optional_scopes


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
class Withdrawal:
    consent_id: int
    participant_id: str
    scopes: frozenset[str]
    full: bool
    data_policy: str
    readings_deleted: int
    effective_at: datetime


@dataclass(frozen=True, slots=True)
class PendingReconsent:
    participant_id: str
    site_id: str
    current_version: str
    required_version: str
    reconsent_by: datetime
    overdue: bool


def _require_idle(conn: Conn) -> None:
    if conn.info.transaction_status is not TransactionStatus.IDLE:
        raise errors.TransactionOpen(
            "consent functions own their transactions: call them with none open"
        )


def document_key(study_id: str, title: str) -> str:
    return f"{study_id}\x1f{title}"


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


# --- documents --------------------------------------------------------------------------

_DOC_BY_ID = """
SELECT document_id, study_id, title, version, language, uri, content_sha256, scopes,
       optional_scopes, approved_on, effective_at, reconsent_by
FROM consent_documents WHERE document_id = %s
"""
_DOCS_BY_TITLE = """
SELECT document_id, study_id, title, version, language, uri, content_sha256, scopes,
       optional_scopes, approved_on, effective_at, reconsent_by
FROM consent_documents WHERE study_id = %s AND title = %s ORDER BY effective_at
"""
_INSERT_DOC = """
INSERT INTO consent_documents (study_id, title, version, language, uri, body, content_sha256,
                               scopes, optional_scopes, approved_on, effective_at,
                               reconsent_by, created_by)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
RETURNING document_id, study_id, title, version, language, uri, content_sha256, scopes,
          optional_scopes, approved_on, effective_at, reconsent_by
"""


def _doc(row: tuple[Any, ...]) -> DocumentVersion:
    (did, study, title, version, lang, uri, sha, scopes, optional, approved, eff, recon) = row
    return DocumentVersion(
        int(did),
        str(study),
        str(title),
        str(version),
        str(lang),
        None if uri is None else str(uri),
        bytes(sha),
        frozenset(scopes),
        frozenset(optional),
        approved,
        eff,
        recon,
    )


async def create_version(
    conn: Conn,
    actor: Actor,
    *,
    study_id: str,
    title: str,
    version: str,
    scopes: Collection[str],
    effective_at: datetime,
    optional_scopes: Collection[str] = (),
    language: str = "en",
    text: str | None = None,
    pdf: bytes | None = None,
    uri: str | None = None,
    approved_on: date | None = None,
    reconsent_by: datetime | None = None,
) -> DocumentVersion:
    """Add a version (or a language of a version) of a study's consent document.

    Content is the text itself, or a PDF kept elsewhere (``uri``) whose bytes are hashed here.
    A new version takes effect after every earlier one; another language of an existing
    version must cover the same scopes from the same dates. ``reconsent_by`` makes everyone
    on an earlier version re-consent by that time.
    """
    _require_idle(conn)
    if actor.role is not users.Role.ADMIN:
        raise errors.NotPermitted("only an admin creates consent documents")
    if (text is None) == (pdf is None):
        raise errors.InvalidDocument("give the document's text or its PDF, not both")
    if pdf is not None and not uri:
        raise errors.InvalidDocument("a PDF document needs the uri where it is kept")
    content = text.encode() if text is not None else pdf
    assert content is not None
    if not content.strip():
        raise errors.InvalidDocument("the document is empty")
    scope_set, optional = frozenset(scopes), frozenset(optional_scopes)
    if not scope_set:
        raise errors.InvalidDocument("a consent document covers at least one scope")
    if unknown := (scope_set | optional) - SCOPES:
        raise errors.InvalidScopes(f"unknown scopes {sorted(unknown)}; known: {sorted(SCOPES)}")
    if not optional <= scope_set:
        raise errors.InvalidScopes("optional scopes must be among the document's scopes")
    if reconsent_by is not None and reconsent_by < effective_at:
        raise errors.InvalidDocument("reconsent_by must not be before effective_at")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (CONSENT_LOCK_KEY,))
        cur = await conn.execute(_DOCS_BY_TITLE, (study_id, title))
        existing = [_doc(r) for r in await cur.fetchall()]
        same = [d for d in existing if d.version == version]
        if same:
            first = same[0]
            if (first.scopes, first.optional_scopes, first.effective_at, first.reconsent_by) != (
                scope_set,
                optional,
                effective_at,
                reconsent_by,
            ):
                raise errors.InvalidDocument(
                    f"version {version} exists: another language must have its scopes and dates"
                )
        elif existing and effective_at <= existing[-1].effective_at:
            raise errors.InvalidDocument(
                f"version {version} must take effect after version {existing[-1].version}"
            )
        try:
            cur = await conn.execute(
                _INSERT_DOC,
                (
                    study_id,
                    title,
                    version,
                    language,
                    uri,
                    text,
                    hashlib.sha256(content).digest(),
                    sorted(scope_set),
                    sorted(optional),
                    approved_on,
                    effective_at,
                    reconsent_by,
                    actor.user,
                ),
            )
        except pg_errors.UniqueViolation as exc:
            raise errors.InvalidDocument(
                f"{title} version {version} ({language}) exists in study {study_id}"
            ) from exc
        except pg_errors.ForeignKeyViolation as exc:
            raise errors.InvalidDocument(f"no study {study_id!r}") from exc
        row = await cur.fetchone()
        assert row is not None
        doc = _doc(row)
        await audit.append(
            conn,
            actor=actor.user,
            action="consent.document.create",
            entity="consent_document",
            entity_id=str(doc.document_id),
            detail={
                "study_id": study_id,
                "title": title,
                "version": version,
                "language": language,
                "content_sha256": doc.content_sha256.hex(),
                "scopes": sorted(scope_set),
                "optional_scopes": sorted(optional),
                "effective_at": effective_at,
                "reconsent_by": reconsent_by,
            },
        )
    return doc


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
        try:
            signer = await users.verify_password(conn, username, password, hasher=hasher)
        except users.UserError as exc:
            raise errors.ReauthenticationFailed(
                f"re-authentication failed: {type(exc).__name__}"
            ) from exc
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
        signer = await _reauthenticate(conn, actor, signature, hasher)
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


async def _reauthenticate(
    conn: Conn, actor: Actor, signature: WithdrawalSignature, hasher: PasswordHasher
) -> users.User:
    """The signer, re-authenticated with their own credential: the acting user's own."""
    try:
        signer = await users.verify_password(
            conn, signature.username, signature.password, hasher=hasher
        )
    except users.UserError as exc:
        raise errors.ReauthenticationFailed(
            f"re-authentication failed: {type(exc).__name__}"
        ) from exc
    if signer.username != actor.user:
        raise errors.ReauthenticationFailed("the signature needs the acting user's own credential")
    return signer


async def _delete_held(
    conn: Conn, actor: Actor, consent_id: int, participant_id: str, scopes: frozenset[str]
) -> int:
    metrics = sorted(m.name for m in METRICS.values() if m.scope in scopes)
    # The hourly rollups of what is deleted are recomputed (to nothing) by the next refresh.
    cur = await conn.execute(
        "WITH gone AS (DELETE FROM readings WHERE participant_id = %(pid)s"
        " AND metric = ANY(%(metrics)s) RETURNING time, metric),"
        " hours AS (SELECT DISTINCT metric, floor(extract(epoch FROM time) / 3600)::bigint AS h"
        " FROM gone),"
        " noted AS (INSERT INTO rollup_invalidations (participant_ids, metrics, hours)"
        " SELECT array_agg(%(pid)s::text), array_agg(metric), array_agg(h) FROM hours"
        " HAVING count(*) > 0)"
        " SELECT count(*), min(time), max(time) FROM gone",
        {"pid": participant_id, "metrics": metrics},
    )
    row = await cur.fetchone()
    assert row is not None
    count, first, last = int(row[0]), row[1], row[2]
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
            "first_time": first,
            "last_time": last,
        },
        reason="withdrawal under the study's delete policy",
    )
    return count


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
