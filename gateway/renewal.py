"""A hub's certificate renewal and its standing, asked for with requests signed by its key.

Hub certificates last ``pki.HUB_VALIDITY`` (90 days); the hub renews from half their life on
(``device_drivers/credentials.py``). Each request is signed by the key the hub enrolled with
(``ingest/hub_requests.py``) and judged here, in order:

1. the signed time within ``MAX_SKEW_MS`` of the gateway's clock (``stale_request``: the
   answer carries the gateway's time, and the hub signs again with it);
2. a device of that id whose key verifies the signature (``not_authenticated``: unknown
   devices and bad signatures get the same answer);
3. for a renewal: the device is not revoked (``device_revoked``), its newest certificate has
   not expired (``certificate_expired``: a hub away longer than that re-enrolls), and the
   CSR is for the very key the device enrolled with (``invalid_csr``). Within
   ``RENEWED_RECENTLY`` of its last certificate a device gets that one again.

A renewal commits the new certificate (``device_certificates``) and its audit record together;
every refusal is on record too (``device.request_refused``), as is telling a hub that it was
revoked or has expired (``device.told_standing``), so the site can see that the hub knows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.errors import GatewayError
from gateway.pki import PkiError, StudyCA
from ingest import hub_requests, keys
from storage import audit, certificates
from storage.certificates import DeviceStanding, IssuedCertificate
from storage.db import Conn

log = logging.getLogger(__name__)

# A renewal this soon after the device's last certificate was issued answers with that
# certificate again (idempotent for a hub retrying a lost answer; no row per request for a
# hub asking too often).
RENEWED_RECENTLY = timedelta(minutes=10)
ACTIVE = "active"
REVOKED = "revoked"
EXPIRED = "expired"


class HubRequestError(GatewayError):
    """A signed hub request refused; ``kind`` names why (stable, shown to the hub)."""

    def __init__(self, kind: str, message: str, *, server_time_ms: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.server_time_ms = server_time_ms


@dataclass(frozen=True, slots=True)
class Standing:
    device_id: str
    status: str  # ACTIVE, REVOKED or EXPIRED
    revoked_at: datetime | None
    certificate_not_after: datetime | None


def issued(cert: x509.Certificate, device_id: str, issued_for: str) -> IssuedCertificate:
    """The record of a certificate just signed for ``device_id``."""
    return IssuedCertificate(
        serial=format(cert.serial_number, "x"),
        device_id=device_id,
        issued_for=issued_for,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
    )


def _not_after(pem: str | None) -> datetime | None:
    if pem is None:
        return None
    return x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc


def _status(found: DeviceStanding, now: datetime) -> Standing:
    not_after = _not_after(found.certificate_pem)
    if found.revoked_at is not None:
        status = REVOKED
    elif not_after is not None and not_after <= now:
        status = EXPIRED
    else:
        status = ACTIVE
    return Standing(found.device_id, status, found.revoked_at, not_after)


async def authenticate(
    conn: Conn,
    purpose: str,
    device_id: str,
    signed_at_ms: int,
    body: bytes,
    signature: str,
    *,
    now: datetime,
    lock: bool = False,
) -> DeviceStanding:
    """The device that signed this request, or ``HubRequestError``."""
    now_ms = int(now.timestamp() * 1000)
    if abs(now_ms - signed_at_ms) > hub_requests.MAX_SKEW_MS:
        raise HubRequestError(
            "stale_request",
            "the request's signed time is too far from the gateway's clock; sign it again"
            " with the gateway's time",
            server_time_ms=now_ms,
        )
    found = await certificates.standing(conn, device_id, lock=lock)
    if found is None or not hub_requests.verifies(
        keys.public_key_from_der(found.public_key),
        purpose,
        device_id,
        signed_at_ms,
        body,
        signature,
    ):
        raise HubRequestError(
            "not_authenticated", "the request is not signed by an enrolled device's key"
        )
    return found


async def standing(
    conn: Conn, device_id: str, signed_at_ms: int, signature: str, *, now: datetime | None = None
) -> Standing:
    """What the gateway holds of this hub: active, revoked or expired."""
    now = now or datetime.now(UTC)
    async with conn.transaction():
        found = await authenticate(
            conn, hub_requests.PURPOSE_STANDING, device_id, signed_at_ms, b"", signature, now=now
        )
        result = _status(found, now)
        if result.status != ACTIVE:
            await audit.append(
                conn,
                actor=f"device:{device_id}",
                action="device.told_standing",
                entity="device",
                entity_id=device_id,
                detail={"status": result.status},
            )
    return result


async def renew(
    conn: Conn,
    device_id: str,
    csr_pem: str,
    signed_at_ms: int,
    signature: str,
    ca: StudyCA,
    *,
    now: datetime | None = None,
) -> IssuedCertificate:
    """A new certificate for the hub's own key, if it is in good standing."""
    now = now or datetime.now(UTC)
    async with conn.transaction():
        found = await authenticate(
            conn,
            hub_requests.PURPOSE_RENEW,
            device_id,
            signed_at_ms,
            csr_pem.encode(),
            signature,
            now=now,
            lock=True,
        )
        current = _status(found, now)
        if current.status == REVOKED:
            raise HubRequestError("device_revoked", "this hub was revoked by its site")
        if current.status == EXPIRED:
            raise HubRequestError(
                "certificate_expired",
                "this hub's certificate has expired; it must be enrolled again with a new code",
            )
        issued_before = await certificates.of_device(conn, device_id)
        if (
            issued_before
            and issued_before[0].issued_at is not None
            and now - issued_before[0].issued_at < RENEWED_RECENTLY
        ):
            # A retry whose answer was lost, or a hub asking too often: the same certificate.
            return issued_before[0]
        try:
            cert = ca.sign_csr(csr_pem.encode(), device_id, key_der=found.public_key)
        except PkiError as exc:
            raise HubRequestError("invalid_csr", str(exc)) from exc
        record = issued(cert, device_id, "renewal")
        await certificates.record(conn, record)
        await audit.append(
            conn,
            actor=f"device:{device_id}",
            action="device.certificate_renew",
            entity="device",
            entity_id=device_id,
            detail={
                "serial": record.serial,
                "not_after": record.not_after.isoformat(),
                "previous_not_after": (
                    current.certificate_not_after.isoformat()
                    if current.certificate_not_after
                    else None
                ),
            },
        )
    log.info("hub certificate renewed device=%s not_after=%s", device_id, record.not_after)
    return record
