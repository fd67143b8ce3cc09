"""Rows that say who is in the study: studies, sites, participants, devices, consent.

Plain functions over a connection, so callers choose the transaction (enrollment writes the
device and its audit record together). Consent rows are only ever inserted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import class_row

from storage.db import Conn

# How far back hubs may deliver data, in days (studies.backfill_days and its bounds).
BACKFILL_DAYS_DEFAULT = 365
BACKFILL_DAYS_MAX = 3650


async def create_study(
    conn: Conn,
    study_id: str,
    name: str,
    *,
    withdrawal_policy: str = "retain",
    backfill_days: int = BACKFILL_DAYS_DEFAULT,
) -> None:
    await conn.execute(
        "INSERT INTO studies (study_id, name, withdrawal_policy, backfill_days)"
        " VALUES (%s, %s, %s, %s)",
        (study_id, name, withdrawal_policy, backfill_days),
    )


async def create_site(conn: Conn, site_id: str, study_id: str, name: str) -> None:
    await conn.execute(
        "INSERT INTO sites (site_id, study_id, name) VALUES (%s, %s, %s)", (site_id, study_id, name)
    )


async def create_participant(
    conn: Conn,
    participant_id: str,
    study_id: str,
    site_id: str,
    *,
    enrolled_at: datetime | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO participants (participant_id, study_id, site_id, enrolled_at)"
        " VALUES (%s, %s, %s, coalesce(%s, now()))",
        (participant_id, study_id, site_id, enrolled_at),
    )


async def add_device(
    conn: Conn,
    device_id: str,
    participant_id: str,
    public_key_der: bytes,
    fingerprint: str,
    *,
    certificate_pem: str | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO devices (device_id, participant_id, public_key, key_fingerprint,"
        " certificate_pem) VALUES (%s, %s, %s, %s, %s)",
        (device_id, participant_id, public_key_der, fingerprint, certificate_pem),
    )


async def revoke_device(conn: Conn, device_id: str, reason: str) -> bool:
    cur = await conn.execute(
        "UPDATE devices SET revoked_at = now(), revoked_reason = %s"
        " WHERE device_id = %s AND revoked_at IS NULL",
        (reason, device_id),
    )
    return cur.rowcount == 1


@dataclass(frozen=True, slots=True)
class _Device:
    device_id: str


async def active_device_ids(conn: Conn) -> list[str]:
    """Every device not revoked, by id: the hubs a broker should let in."""
    async with conn.cursor(row_factory=class_row(_Device)) as cur:
        await cur.execute(
            "SELECT device_id FROM devices WHERE revoked_at IS NULL ORDER BY device_id"
        )
        return [d.device_id for d in await cur.fetchall()]


@dataclass(frozen=True, slots=True)
class _Site:
    site_id: str


async def device_site(conn: Conn, device_id: str) -> str | None:
    """The site of the participant a device belongs to (None: no such device)."""
    async with conn.cursor(row_factory=class_row(_Site)) as cur:
        await cur.execute(
            "SELECT p.site_id FROM devices d JOIN participants p USING (participant_id)"
            " WHERE d.device_id = %s",
            (device_id,),
        )
        found = await cur.fetchone()
    return None if found is None else found.site_id


async def device_certificate(conn: Conn, device_id: str) -> str | None:
    """The newest certificate (PEM) issued to a device, if one is on record."""
    cur = await conn.execute(
        "SELECT certificate_pem FROM devices WHERE device_id = %s", (device_id,)
    )
    row = await cur.fetchone()
    return None if row is None or row[0] is None else str(row[0])


async def create_consent_document(
    conn: Conn,
    study_id: str,
    title: str,
    version: str,
    body: str,
    scopes: Collection[str],
    *,
    effective_at: datetime,
    language: str = "en",
    optional_scopes: Collection[str] = (),
    reconsent_by: datetime | None = None,
) -> int:
    cur = await conn.execute(
        "INSERT INTO consent_documents (study_id, title, version, language, body, content_sha256,"
        " scopes, optional_scopes, effective_at, reconsent_by)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING document_id",
        (
            study_id,
            title,
            version,
            language,
            body,
            hashlib.sha256(body.encode()).digest(),
            sorted(scopes),
            sorted(optional_scopes),
            effective_at,
            reconsent_by,
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def record_consent(
    conn: Conn,
    participant_id: str,
    document_id: int,
    action: str,
    scopes: Collection[str],
    *,
    effective_at: datetime,
    recorded_by: str,
    signer_name: str | None = None,
    meaning: str | None = None,
) -> int:
    cur = await conn.execute(
        "INSERT INTO consents (participant_id, document_id, action, scopes, signer_name, signed_at,"
        " meaning, document_sha256, recorded_by, effective_at)"
        " SELECT %s, %s, %s, %s, %s, %s, %s, d.content_sha256, %s, %s"
        " FROM consent_documents d WHERE d.document_id = %s RETURNING consent_id",
        (
            participant_id,
            document_id,
            action,
            sorted(scopes),
            signer_name,
            effective_at,
            meaning,
            recorded_by,
            effective_at,
            document_id,
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@dataclass(frozen=True, slots=True)
class ConsentedHub:
    """A participant to enroll with one hub and a consent under a study's document: what a
    site's enrollment and the participant's e-consent leave behind."""

    participant_id: str
    study_id: str
    site_id: str
    device_id: str
    public_key_der: bytes
    fingerprint: str
    document_id: int
    scopes: Collection[str]
    enrolled_at: datetime
    consent_at: datetime
    recorded_by: str


async def enroll_consented(conn: Conn, hub: ConsentedHub) -> int:
    """Enroll ``hub``'s participant, add the hub and record the consent (for benchmarks, the
    cluster harness and fixtures, which need consented hubs without the signing ceremony);
    the consent's id."""
    await create_participant(
        conn, hub.participant_id, hub.study_id, hub.site_id, enrolled_at=hub.enrolled_at
    )
    await add_device(conn, hub.device_id, hub.participant_id, hub.public_key_der, hub.fingerprint)
    return await record_consent(
        conn,
        hub.participant_id,
        hub.document_id,
        "consent",
        hub.scopes,
        effective_at=hub.consent_at,
        recorded_by=hub.recorded_by,
        signer_name=hub.participant_id,
        meaning="consent",
    )


async def create_enrollment_code(
    conn: Conn, code_sha256: bytes, participant_id: str, created_by: str, expires_at: datetime
) -> None:
    await conn.execute(
        "INSERT INTO enrollment_codes (code_sha256, participant_id, created_by, expires_at)"
        " VALUES (%s, %s, %s, %s)",
        (code_sha256, participant_id, created_by, expires_at),
    )


@dataclass(frozen=True, slots=True)
class EnrollmentCode:
    participant_id: str
    study_id: str
    expires_at: datetime
    used_at: datetime | None


async def lock_enrollment_code(conn: Conn, code_sha256: bytes) -> EnrollmentCode | None:
    """A code's participant, study and dates, its row locked for this transaction."""
    async with conn.cursor(row_factory=class_row(EnrollmentCode)) as cur:
        await cur.execute(
            "SELECT c.participant_id, p.study_id, c.expires_at, c.used_at"
            " FROM enrollment_codes c JOIN participants p USING (participant_id)"
            " WHERE c.code_sha256 = %s FOR UPDATE OF c",
            (code_sha256,),
        )
        return await cur.fetchone()


async def mark_enrollment_code_used(conn: Conn, code_sha256: bytes, device_id: str) -> None:
    await conn.execute(
        "UPDATE enrollment_codes SET used_at = now(), device_id = %s WHERE code_sha256 = %s",
        (device_id, code_sha256),
    )


async def participant_study(conn: Conn, participant_id: str) -> str | None:
    cur = await conn.execute(
        "SELECT study_id FROM participants WHERE participant_id = %s", (participant_id,)
    )
    row = await cur.fetchone()
    return None if row is None else str(row[0])
