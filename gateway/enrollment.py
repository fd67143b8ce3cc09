"""Enrollment: a single-use code from the site, a CSR from the hub, a device and a certificate.

A site coordinator makes a code for a participant (single use, expires; only its SHA-256 is
stored). The hub makes its own P-256 key, sends a CSR with the code, and receives its device
id, a certificate for that id signed by the study CA, the CA certificate, the broker's
address, its topics and the gateway's receipt key. The device row (with the hub's public key,
which verifies every envelope), its first certificate and the audit record commit together
with the code's use. The hub renews the certificate itself before it expires
(``gateway/renewal.py``).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.errors import GatewayError
from gateway.pki import StudyCA
from gateway.renewal import issued
from ingest import keys
from ingest.pipeline import down_topic, up_topic
from storage import audit, certificates, registry
from storage.db import Conn

log = logging.getLogger(__name__)

# Crockford's base32 alphabet: no I, L, O or U, so a code read aloud or typed is unambiguous.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CODE_CHARS = 16  # 80 bits: not guessable within a code's lifetime at any request rate
DEFAULT_CODE_TTL = timedelta(hours=72)


class EnrollmentError(GatewayError):
    """A code that cannot enroll a hub; ``kind`` names why (stable, shown to the hub)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class IssuedCode:
    code: str
    participant_id: str
    study_id: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Enrollment:
    device_id: str
    participant_id: str
    study_id: str
    certificate_pem: str
    ca_pem: str
    receipt_key_pem: str


def ca_sha256(ca: StudyCA) -> str:
    """The study CA's fingerprint as enrollment codes carry it: SHA-256 (hex) of its DER."""
    return hashlib.sha256(ca.cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def enrollment_uri(gateway_url: str, code: str, ca: StudyCA) -> str:
    """What a hub's camera reads (the site's QR code) and ``site enroll-code`` prints: the
    gateway's public address, the code and the CA the hub must find at that address
    (``device_drivers.identity.parse_enrollment`` reads it)."""
    fields = {"gateway": gateway_url.rstrip("/"), "code": code, "ca": ca_sha256(ca)}
    return "trialstream:enroll?" + urlencode(fields)


def normalize_code(text: str) -> str:
    cleaned = "".join(ch for ch in text.upper() if ch not in "- \t")
    cleaned = cleaned.translate(str.maketrans("OIL", "011"))
    if len(cleaned) != _CODE_CHARS or any(ch not in _ALPHABET for ch in cleaned):
        raise EnrollmentError("malformed_code", "an enrollment code is 16 letters and digits")
    return cleaned


def format_code(code: str) -> str:
    return "-".join(code[i : i + 4] for i in range(0, len(code), 4))


def _digest(code: str) -> bytes:
    return hashlib.sha256(normalize_code(code).encode()).digest()


async def issue_code(
    conn: Conn,
    participant_id: str,
    *,
    created_by: str,
    ttl: timedelta = DEFAULT_CODE_TTL,
    now: datetime | None = None,
) -> IssuedCode:
    code = "".join(secrets.choice(_ALPHABET) for _ in range(_CODE_CHARS))
    expires = (now or datetime.now(UTC)) + ttl
    async with conn.transaction():
        study = await registry.participant_study(conn, participant_id)
        if study is None:
            raise EnrollmentError("unknown_participant", f"no participant {participant_id!r}")
        await registry.create_enrollment_code(
            conn, _digest(code), participant_id, created_by, expires
        )
        await audit.append(
            conn,
            actor=created_by,
            action="enrollment_code.create",
            entity="participant",
            entity_id=participant_id,
            detail={"expires_at": expires.isoformat()},
        )
    return IssuedCode(format_code(code), participant_id, study, expires)


def new_device_id() -> str:
    return "hub-" + base64.b32encode(secrets.token_bytes(5)).decode().lower()


async def enroll(
    conn: Conn,
    code: str,
    csr_pem: bytes,
    ca: StudyCA,
    receipt_key: ec.EllipticCurvePublicKey,
    *,
    now: datetime | None = None,
) -> Enrollment:
    """Redeem ``code`` for the hub whose CSR this is; everything commits or nothing does."""
    digest = _digest(code)
    now = now or datetime.now(UTC)
    async with conn.transaction():
        found = await registry.lock_enrollment_code(conn, digest)
        if found is None:
            raise EnrollmentError("unknown_code", "this enrollment code is not known")
        participant_id, study_id = found.participant_id, found.study_id
        if found.used_at is not None:
            raise EnrollmentError("code_used", "this enrollment code was already used")
        if found.expires_at <= now:
            raise EnrollmentError("code_expired", "this enrollment code has expired")
        device_id = new_device_id()
        cert = ca.sign_csr(csr_pem, device_id)
        public_key = cert.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        fingerprint = keys.fingerprint(public_key)
        await registry.add_device(
            conn, device_id, participant_id, keys.public_key_to_der(public_key), fingerprint
        )
        # Kept with the device's other certificates, and made its current one.
        first = issued(cert, device_id, "enrollment")
        await certificates.record(conn, first)
        await registry.mark_enrollment_code_used(conn, digest, device_id)
        await audit.append(
            conn,
            actor=f"device:{device_id}",
            action="device.enroll",
            entity="participant",
            entity_id=participant_id,
            detail={
                "device_id": device_id,
                "key_fingerprint": fingerprint,
                "serial": first.serial,
                "not_after": first.not_after.isoformat(),
            },
        )
    log.info("hub enrolled device=%s study=%s", device_id, study_id)
    return Enrollment(
        device_id,
        participant_id,
        study_id,
        first.certificate_pem,
        ca.cert.public_bytes(serialization.Encoding.PEM).decode(),
        keys.public_key_to_pem(receipt_key).decode(),
    )


async def revoke(conn: Conn, device_id: str, *, actor: str, reason: str) -> None:
    async with conn.transaction():
        if not await registry.revoke_device(conn, device_id, reason):
            raise EnrollmentError("unknown_device", f"no active device {device_id!r}")
        await audit.append(
            conn,
            actor=actor,
            action="device.revoke",
            entity="device",
            entity_id=device_id,
            reason=reason,
        )


def topics(device_id: str) -> dict[str, str]:
    return {"up": up_topic(device_id), "down": down_topic(device_id)}
