"""Enrollment through the real HTTP API: a single-use code and a CSR become a device, a
certificate from the study CA and a hub that can relay over TLS; every bad code or body is
refused with a problem document."""

from __future__ import annotations

import asyncio
import contextlib
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from device_drivers.identity import EnrollmentTicket, HubIdentityError, enroll, make_csr
from device_drivers.outbox import Outbox
from device_drivers.relay import Relay, RelayConfig
from gateway import enrollment
from gateway.pki import StudyCA, certificate_identity, verify_issued_by
from gateway.web.ratelimit import RATE_LIMITER, Limit
from ingest import keys
from ingest.model import Reading
from ingest.transport import configure_tls
from storage import audit, db, registry
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until


async def new_code(
    trial: Trial, participant: str = "P9", *, ttl: timedelta = timedelta(hours=1)
) -> str:
    async with db.connection(trial.url) as conn:
        if await registry.participant_study(conn, participant) is None:
            await registry.create_participant(conn, participant, trial.study_id, trial.site_id)
            await conn.commit()
        issued = await enrollment.issue_code(conn, participant, created_by="coordinator-1", ttl=ttl)
        await conn.commit()
    return issued.code


def url(gw: RunningGateway) -> str:
    return str(gw.client.make_url("/"))


def ticket(gw: RunningGateway, code: str, ca: StudyCA | None = None) -> EnrollmentTicket:
    """What the site's QR code gives the hub (the CA pinned when given)."""
    return EnrollmentTicket(url(gw), code, enrollment.ca_sha256(ca) if ca else None)


async def test_a_hub_enrolls_and_relays_over_tls(
    trial: Trial, secure_gateway: RunningGateway, study_ca: StudyCA, tmp_path: Path
) -> None:
    code = await new_code(trial)
    hub_dir = tmp_path / "hub"
    identity = await enroll(hub_dir, ticket(secure_gateway, code, study_ca))
    assert identity.participant_id == "P9"
    assert stat.S_IMODE(identity.key_path.stat().st_mode) == 0o600
    cert_pem = (hub_dir / "hub.pem").read_bytes()
    assert certificate_identity(cert_pem) == identity.device_id
    verify_issued_by(cert_pem, study_ca.cert)
    async with db.connection(trial.url) as conn:
        cur = await conn.execute(
            "SELECT participant_id, public_key FROM devices WHERE device_id = %s",
            (identity.device_id,),
        )
        row = await cur.fetchone()
        history = await audit.participant_history(conn, "P9")
    assert row is not None
    assert row[0] == "P9"
    assert bytes(row[1]) == keys.public_key_to_der(identity.key().public_key())
    assert [r.action for r in history][-2:] == ["enrollment_code.create", "device.enroll"]

    # The enrolled hub relays with what enrollment gave it, and nothing else.
    await registry_consent(trial, "P9")
    outbox = Outbox.open(tmp_path / "outbox.sqlite", identity.device_id)
    relay = Relay(
        RelayConfig(
            identity.device_id,
            identity.broker_host,
            identity.broker_port,
            seal_max_age_s=0.1,
            tick_s=0.05,
        ),
        outbox,
        identity.key(),
        identity.receipt_key(),
        configure_client=configure_tls(identity.tls),
    )
    task = asyncio.create_task(relay.run())
    try:
        now = int(time.time() * 1000)
        outbox.add_readings([Reading(now + i, "heart_rate", 61.0, "/min", "hr") for i in range(4)])
        await wait_until(lambda: relay.stats.receipts_accepted >= 1, "receipt for the enrolled hub")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        outbox.close()
    async with db.connection(trial.url) as conn:
        cur = await conn.execute("SELECT count(*) FROM readings WHERE participant_id = 'P9'")
        assert await cur.fetchone() == (4,)


async def registry_consent(trial: Trial, participant: str) -> None:
    async with db.connection(trial.url) as conn:
        await registry.record_consent(
            conn,
            participant,
            trial.document_id,
            "consent",
            {"heart_rate"},
            effective_at=datetime.now(UTC) - timedelta(minutes=5),
            recorded_by="test",
            signer_name="P9",
            meaning="consent",
        )
        await conn.commit()


async def test_a_code_works_once(trial: Trial, gateway: RunningGateway, tmp_path: Path) -> None:
    code = await new_code(trial)
    await enroll(tmp_path / "first", ticket(gateway, code))
    with pytest.raises(HubIdentityError, match="already used"):
        await enroll(tmp_path / "second", ticket(gateway, code))
    with pytest.raises(HubIdentityError, match="already enrolled"):
        await enroll(tmp_path / "first", ticket(gateway, code))


@pytest.mark.parametrize(
    ("case", "status", "kind"),
    [
        ("unknown", 404, "unknown-code"),
        ("expired", 410, "code-expired"),
        ("malformed_code", 400, "malformed-code"),
        ("garbage_csr", 400, "invalid-csr"),
        ("rsa_csr", 400, "invalid-csr"),
        ("missing_field", 400, "invalid-field"),
        ("wrong_type", 400, "invalid-field"),
        ("not_json", 400, "malformed-json"),
        ("not_an_object", 400, "malformed-json"),
        ("wrong_media_type", 415, "unsupported-media-type"),
        ("oversized", 413, "too-large"),
    ],
)
async def test_bad_enrollments_get_problem_details(
    trial: Trial, gateway: RunningGateway, case: str, status: int, kind: str
) -> None:
    code = await new_code(
        trial, ttl=timedelta(seconds=-1) if case == "expired" else timedelta(hours=1)
    )
    csr = make_csr(keys.generate_private_key()).decode()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(rsa_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    bodies: dict[str, dict[str, object]] = {
        "unknown": {"json": {"code": "0000-0000-0000-0000", "csr": csr}},
        "expired": {"json": {"code": code, "csr": csr}},
        "malformed_code": {"json": {"code": "<script>", "csr": csr}},
        "garbage_csr": {"json": {"code": code, "csr": "-----BEGIN nonsense"}},
        "rsa_csr": {"json": {"code": code, "csr": rsa_csr}},
        "missing_field": {"json": {"code": code}},
        "wrong_type": {"json": {"code": 12345, "csr": csr}},
        "not_json": {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
        "not_an_object": {"json": ["code", "csr"]},
        "wrong_media_type": {"data": b"code=x", "headers": {"Content-Type": "text/plain"}},
        "oversized": {"data": b"x" * (200 * 1024), "headers": {"Content-Type": "application/json"}},
    }
    resp = await gateway.client.post("/api/v1/enrollments", **bodies[case])  # type: ignore[arg-type]
    body = await resp.json(content_type=None)
    assert resp.status == status
    assert resp.content_type == "application/problem+json"
    assert body["status"] == status
    assert body["type"].endswith("/" + kind)
    async with db.connection(trial.url) as conn:
        cur = await conn.execute("SELECT count(*) FROM devices WHERE participant_id = 'P9'")
        assert await cur.fetchone() == (0,)
        # Every refused attempt is on record, a body that could not be read included.
        cur = await conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'enrollment.refused'"
        )
        assert await cur.fetchone() == (1,)


async def test_revocation_is_audited_and_refused_twice(trial: Trial) -> None:
    async with db.connection(trial.url) as conn:
        await enrollment.revoke(conn, "hub-1", actor="coordinator-1", reason="hub lost")
        with pytest.raises(enrollment.EnrollmentError) as info:
            await enrollment.revoke(conn, "hub-1", actor="coordinator-1", reason="again")
        assert info.value.kind == "unknown_device"
        cur = await conn.execute("SELECT action, reason FROM audit_log WHERE entity = 'device'")
        rows = await cur.fetchall()
    assert rows == [("device.revoke", "hub lost")]


async def test_a_gateway_that_answers_with_another_ca_is_not_trusted(
    trial: Trial, secure_gateway: RunningGateway, tmp_path: Path
) -> None:
    """The code pins the study CA: a gateway (or someone in its place) answering with any
    other CA gets nothing kept, so the hub never trusts a broker that CA vouches for."""
    code = await new_code(trial)
    other = StudyCA.load_or_create(tmp_path / "other-ca")
    hub_dir = tmp_path / "hub"
    with pytest.raises(HubIdentityError, match="CA other than the one the enrollment code names"):
        await enroll(hub_dir, ticket(secure_gateway, code, other))
    assert not (hub_dir / "hub.json").exists()
    assert not (hub_dir / "ca.pem").exists()


async def test_a_hub_told_to_wait_enrolls_after_the_wait(
    trial: Trial, gateway: RunningGateway, tmp_path: Path
) -> None:
    """Enrollments from one address are rate limited: a hub answered 429 waits as
    Retry-After says and asks again, rather than failing its participant's setup."""
    limiter = gateway.client.app[RATE_LIMITER]  # type: ignore[index]
    limiter.enrollment_per_address.limit = Limit(burst=1, per_minute=60)
    first, second = await new_code(trial, "P8"), await new_code(trial, "P9")
    await enroll(tmp_path / "first", ticket(gateway, first))
    started = time.monotonic()
    identity = await enroll(tmp_path / "second", ticket(gateway, second))
    assert identity.participant_id == "P9"
    assert time.monotonic() - started >= 0.5  # it did wait for the bucket to refill
