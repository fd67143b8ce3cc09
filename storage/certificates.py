"""The certificates issued to hubs, and what a hub's signed request is checked against.

Every certificate the study CA signs for a hub is a row of ``device_certificates`` (its
enrollment and each renewal); ``devices.certificate_pem`` keeps the newest. The CRL lists the
still-valid certificates of every revoked device, including those from before this table
(``devices.certificate_pem`` of devices enrolled earlier).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg import sql
from psycopg.rows import class_row

from storage.db import Conn

ISSUED_FOR = ("enrollment", "renewal")


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    serial: str  # lower-case hex, as the CRL and the audit trail name it
    device_id: str
    issued_for: str
    not_before: datetime
    not_after: datetime
    certificate_pem: str
    issued_at: datetime | None = None  # set by the database when recorded


@dataclass(frozen=True, slots=True)
class DeviceStanding:
    """A device as its signed requests are judged: its key, revocation and newest certificate."""

    device_id: str
    participant_id: str
    public_key: bytes
    revoked_at: datetime | None
    # The newest certificate issued to it (PEM), if any is on record.
    certificate_pem: str | None


async def record(conn: Conn, cert: IssuedCertificate) -> None:
    """Keep an issued certificate and make it the device's current one."""
    if cert.issued_for not in ISSUED_FOR:
        raise ValueError(f"issued_for must be one of {ISSUED_FOR}")
    await conn.execute(
        "INSERT INTO device_certificates"
        " (serial, device_id, issued_for, not_before, not_after, certificate_pem)"
        " VALUES (%(serial)s, %(device_id)s, %(issued_for)s, %(not_before)s, %(not_after)s,"
        " %(certificate_pem)s)",
        {
            "serial": cert.serial,
            "device_id": cert.device_id,
            "issued_for": cert.issued_for,
            "not_before": cert.not_before,
            "not_after": cert.not_after,
            "certificate_pem": cert.certificate_pem,
        },
    )
    await conn.execute(
        "UPDATE devices SET certificate_pem = %s WHERE device_id = %s",
        (cert.certificate_pem, cert.device_id),
    )


async def standing(conn: Conn, device_id: str, *, lock: bool = False) -> DeviceStanding | None:
    """The device's standing, or None if there is no such device. With ``lock`` its row is
    locked for the transaction, so a renewal and a revocation of one device are serialised."""
    query = sql.SQL(
        "SELECT device_id, participant_id, public_key, revoked_at, certificate_pem"
        " FROM devices WHERE device_id = %s{}"
    ).format(sql.SQL(" FOR UPDATE") if lock else sql.SQL(""))
    async with conn.cursor(row_factory=class_row(DeviceStanding)) as cur:
        await cur.execute(query, (device_id,))
        return await cur.fetchone()


async def of_device(conn: Conn, device_id: str) -> list[IssuedCertificate]:
    """Every certificate issued to the device, the newest first."""
    async with conn.cursor(row_factory=class_row(IssuedCertificate)) as cur:
        await cur.execute(
            "SELECT serial, device_id, issued_for, not_before, not_after, certificate_pem,"
            " issued_at FROM device_certificates WHERE device_id = %s"
            " ORDER BY issued_at DESC, serial",
            (device_id,),
        )
        return await cur.fetchall()


@dataclass(frozen=True, slots=True)
class _Pem:
    certificate_pem: str


async def revoked(conn: Conn, *, now: datetime) -> list[str]:
    """The certificates (PEM) the CRL must list: those of revoked devices still valid at
    ``now`` (an expired one is refused by its date alone), and the single certificate on
    record for revoked devices enrolled before certificates were kept here."""
    async with conn.cursor(row_factory=class_row(_Pem)) as cur:
        await cur.execute(
            "SELECT c.certificate_pem FROM device_certificates c JOIN devices d USING (device_id)"
            " WHERE d.revoked_at IS NOT NULL AND c.not_after > %(now)s"
            " UNION"
            " SELECT d.certificate_pem FROM devices d"
            " WHERE d.revoked_at IS NOT NULL AND d.certificate_pem IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM device_certificates c"
            "   WHERE c.device_id = d.device_id)"
            " ORDER BY 1",
            {"now": now},
        )
        return [row.certificate_pem for row in await cur.fetchall()]
