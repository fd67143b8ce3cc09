"""Revoking a hub everywhere it is trusted: the database, the CRL and the running broker.

1. The device row is marked revoked (with its audit record): from the next batch on, the
   gateway refuses the hub's envelopes as ``device_revoked``.
2. The study CA re-issues its CRL, whole, from every still-valid certificate of every
   revoked device (a hub renews its certificate, so it may hold several), plus the serial of
   a throwaway probe certificate.
3. The broker is told to reload (``TRIALSTREAM_BROKER_RELOAD`` or SIGHUP via
   ``TRIALSTREAM_BROKER_PID_FILE``); Mosquitto re-reads the CRL for new TLS handshakes.
4. The probe's handshake is tried until the broker refuses it: the broker then holds the
   new CRL, so the revoked hub cannot connect again.
5. The hub's open connection, which Mosquitto 2.0 does not re-check against a reloaded
   CRL, is ended by taking over its MQTT session (its client id is its device id).

Steps 3 to 5 need a reachable broker; what could not be done is reported, never hidden.

On RabbitMQ (``TRIALSTREAM_RABBITMQ_ADMIN_URL``) steps 3 to 5 are one: the hub's broker
identity, through which its certificate logs in, is removed, which closes its connections
(``gateway.rabbit_admin``).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from gateway import enrollment
from gateway.broker import end_session, handshake_refused, reload_broker
from gateway.errors import BrokerError
from gateway.pki import GATEWAY_IDENTITY, StudyCA, certificate_serial
from gateway.settings import Settings
from ingest.transport import TlsFiles
from storage import certificates, db, registry
from storage.db import Conn

log = logging.getLogger(__name__)

# How long the broker may take to refuse the probe after the reload (it takes milliseconds).
RELOAD_TIMEOUT_S = 10.0
_POLL_S = 0.1


@dataclass
class BrokerOutcome:
    """What the running broker was made to do; ``problems`` says what was not done."""

    reload: str | None = None
    certificate_listed: bool = True
    crl_loaded_after_s: float | None = None
    session_ended: bool = False
    # RabbitMQ (TRIALSTREAM_RABBITMQ_ADMIN_URL): the hub's user deleted, and how many of its
    # connections were still open and closed.
    identity_removed: bool = False
    connections_closed: int = 0
    problems: list[str] = field(default_factory=list)


async def publish_crl(
    conn: Conn, ca: StudyCA, *, extra_serials: Iterable[int] = ()
) -> x509.CertificateRevocationList:
    """Re-issue the CA's CRL from the database: every revoked device's certificates.

    Serialised by the CA's lock, and the devices read under it, so of two revocations at
    once the later CRL lists both. Called on every revocation and by ``trialstream broker
    publish-crl``.
    """
    with ca.crl_lock():
        pems = await certificates.revoked(conn, now=datetime.now(UTC))
        return ca.publish_crl([*(certificate_serial(p) for p in pems), *extra_serials])


def tell_broker(
    settings: Settings, ca: StudyCA, probe: TlsFiles | None, device_id: str | None
) -> BrokerOutcome:
    """Reload the broker, wait until it refuses ``probe``, end ``device_id``'s session."""
    out = BrokerOutcome()
    try:
        out.reload = reload_broker(
            pid_file=settings.broker_pid_file, command=settings.broker_reload
        )
    except BrokerError as exc:
        out.problems.append(str(exc))
        return out
    if not settings.mqtt_tls:
        out.problems.append(
            "TRIALSTREAM_MQTT_TLS is off: the broker's refusal of revoked certificates "
            "could not be checked, nor the hub's open connection ended"
        )
        return out
    host, port = settings.mqtt_host, settings.mqtt_port
    if probe is not None:
        started = time.monotonic()
        deadline = started + RELOAD_TIMEOUT_S
        try:
            while not handshake_refused(host, port, probe):
                if time.monotonic() > deadline:
                    out.problems.append(
                        f"the broker at {host}:{port} still accepts certificates listed in "
                        f"{ca.crl_path} after {RELOAD_TIMEOUT_S:.0f} s: check that its "
                        "crlfile is that file and that the reload reached it"
                    )
                    break
                time.sleep(_POLL_S)
            else:
                out.crl_loaded_after_s = time.monotonic() - started
        except OSError as exc:
            out.problems.append(f"cannot reach the broker at {host}:{port}: {exc}")
            return out
    if device_id is not None:
        gateway_tls = ca.issue_files(settings.data_dir / "certs", GATEWAY_IDENTITY)
        try:
            end_session(host, port, gateway_tls, device_id)
            out.session_ended = True
        except BrokerError as exc:
            out.problems.append(f"the hub's open connection was not ended: {exc}")
    return out


async def refresh(settings: Settings, *, device_id: str | None = None) -> BrokerOutcome:
    """Publish the CRL from the database and make the broker use it (``device_id``: also
    end that hub's open connection)."""
    ca = StudyCA.load_or_create(settings.ca_path)
    if settings.rabbitmq_admin_url:
        return await _refresh_rabbitmq(settings, settings.rabbitmq_admin_url, ca, device_id)
    with tempfile.TemporaryDirectory(prefix="trialstream-probe-") as tmp:
        probe, probe_serial = ca.issue_probe(Path(tmp))
        async with db.connection(settings.require_database_url()) as conn:
            await publish_crl(conn, ca, extra_serials=[probe_serial])
        return await asyncio.to_thread(tell_broker, settings, ca, probe, device_id)


async def _refresh_rabbitmq(
    settings: Settings, admin_url: str, ca: StudyCA, device_id: str | None
) -> BrokerOutcome:
    """On RabbitMQ the hub's broker identity is what lets it in: the CRL is published for the
    record (RabbitMQ does not read it), and the revoked hub's user is removed, which also
    closes its connections."""
    from gateway.rabbit_admin import RabbitAdmin

    async with db.connection(settings.require_database_url()) as conn:
        await publish_crl(conn, ca)
    out = BrokerOutcome(reload="rabbitmq")
    if device_id is None:
        return out
    try:
        out.connections_closed = await RabbitAdmin(admin_url).remove_hub(device_id)
    except BrokerError as exc:
        out.problems.append(f"the hub's broker identity was not removed: {exc}")
        return out
    out.identity_removed = out.session_ended = True
    return out


async def revoke_hub(
    settings: Settings, device_id: str, *, actor: str, reason: str
) -> BrokerOutcome:
    """Revoke ``device_id`` in the database (``EnrollmentError`` if it is not an active
    device), then in the CRL and the running broker."""
    async with db.connection(settings.require_database_url()) as conn:
        await enrollment.revoke(conn, device_id, actor=actor, reason=reason)
        certificate = await registry.device_certificate(conn, device_id)
    outcome = await refresh(settings, device_id=device_id)
    if certificate is None:
        outcome.certificate_listed = False
        outcome.problems.insert(
            0,
            f"no certificate is on record for {device_id} (not enrolled through the gateway): "
            "the CRL cannot name it",
        )
    for problem in outcome.problems:
        log.warning("revocation of %s incomplete at the broker: %s", device_id, problem)
    return outcome
