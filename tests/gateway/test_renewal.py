"""A hub renews its certificate, and asks for its standing, with requests signed by its key:
through the real HTTP API and database, every refusal answered with a problem document and
put on the audit trail."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_drivers import credentials
from device_drivers.identity import HubIdentity, make_csr
from gateway import enrollment, renewal, revocation
from gateway.app import STUDY_CA
from gateway.pki import HUB_VALIDITY, StudyCA, certificate_identity, verify_issued_by
from ingest import hub_requests, keys
from storage import certificates, db
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.hubs import enrolled_hub
from tests.fixtures.trial import Trial


def signed_body(
    identity: HubIdentity,
    purpose: str,
    *,
    csr: str | None = None,
    signed_at_ms: int | None = None,
    key: Any = None,
) -> dict[str, Any]:
    signed_at = int(time.time() * 1000) if signed_at_ms is None else signed_at_ms
    body = b"" if csr is None else csr.encode()
    signature = hub_requests.sign(
        key or identity.key(), purpose, identity.device_id, signed_at, body
    )
    out: dict[str, Any] = {"signed_at_ms": signed_at, "signature": signature}
    if csr is not None:
        out["csr"] = csr
    return out


async def refusals(trial: Trial, device_id: str) -> list[str]:
    async with db.connection(trial.url) as conn:
        cur = await conn.execute(
            "SELECT detail->>'kind' FROM audit_log WHERE action = 'device.request_refused'"
            " AND entity_id = %s ORDER BY audit_id",
            (device_id,),
        )
        return [str(r[0]) for r in await cur.fetchall()]


def public_der(cert_pem: bytes) -> bytes:
    return (
        x509.load_pem_x509_certificate(cert_pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


async def test_a_hub_renews_its_certificate_for_its_own_key(
    trial: Trial, gateway: RunningGateway, tmp_path: Path
) -> None:
    identity = await enrolled_hub(trial, gateway, tmp_path / "hub")
    first = (identity.directory / "hub.pem").read_bytes()
    before = credentials.certificate_window(identity)
    assert before.not_after - before.not_before == HUB_VALIDITY + timedelta(minutes=5)

    window = await credentials.renew(identity)
    renewed = (identity.directory / "hub.pem").read_bytes()
    assert renewed != first
    assert window.serial != before.serial
    assert certificate_identity(renewed) == identity.device_id
    verify_issued_by(renewed, gateway.client.app[STUDY_CA].cert)  # type: ignore[attr-defined]
    assert public_der(renewed) == public_der(first)
    assert abs(window.not_after - (datetime.now(UTC) + HUB_VALIDITY)) < timedelta(minutes=1)

    async with db.connection(trial.url) as conn:
        issued = await certificates.of_device(conn, identity.device_id)
        cur = await conn.execute(
            "SELECT certificate_pem FROM devices WHERE device_id = %s", (identity.device_id,)
        )
        current = await cur.fetchone()
        cur = await conn.execute(
            "SELECT detail->>'serial' FROM audit_log WHERE action = 'device.certificate_renew'"
            " AND entity_id = %s",
            (identity.device_id,),
        )
        audited = await cur.fetchall()
    assert [(c.issued_for, c.serial) for c in issued] == [
        ("renewal", window.serial),
        ("enrollment", before.serial),
    ]
    assert current == (renewed.decode(),)
    assert audited == [(window.serial,)]

    # Asked again within minutes (a retry whose answer was lost): the same certificate.
    again = await credentials.renew(identity)
    assert again.serial == window.serial
    async with db.connection(trial.url) as conn:
        assert len(await certificates.of_device(conn, identity.device_id)) == 2


async def test_a_hub_whose_clock_is_off_signs_again_with_the_gateways_time(
    trial: Trial, gateway: RunningGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = await enrolled_hub(trial, gateway, tmp_path / "hub")

    real_time = time.time
    monkeypatch.setattr(credentials.time, "time", lambda: real_time() + 3600)
    answer = await credentials.ask_standing(identity)
    assert answer["status"] == "active"
    assert await refusals(trial, identity.device_id) == ["stale_request"]


async def test_a_revoked_hub_is_refused_renewal_and_told_so(
    trial: Trial, gateway: RunningGateway, tmp_path: Path
) -> None:
    identity = await enrolled_hub(trial, gateway, tmp_path / "hub")
    async with db.connection(trial.url) as conn:
        await enrollment.revoke(conn, identity.device_id, actor="coordinator-1", reason="lost")
    with pytest.raises(credentials.HubWithdrawn) as info:
        await credentials.renew(identity)
    assert info.value.status == "revoked"
    answer = await credentials.ask_standing(identity)
    assert answer["status"] == "revoked"
    assert answer["revoked_at"] is not None
    assert await refusals(trial, identity.device_id) == ["device_revoked"]
    async with db.connection(trial.url) as conn:
        cur = await conn.execute(
            "SELECT detail->>'status' FROM audit_log WHERE action = 'device.told_standing'"
            " AND entity_id = %s",
            (identity.device_id,),
        )
        assert await cur.fetchall() == [("revoked",)]
        assert len(await certificates.of_device(conn, identity.device_id)) == 1


async def expire(trial: Trial, gw: RunningGateway, identity: HubIdentity) -> None:
    """Make the device's newest certificate one that expired a minute ago."""
    ca: StudyCA = gw.client.app[STUDY_CA]  # type: ignore[attr-defined]
    cert = ca._issue(identity.key().public_key(), identity.device_id, timedelta(minutes=-1))
    record = renewal.issued(cert, identity.device_id, "renewal")
    async with db.connection(trial.url) as conn:
        await certificates.record(conn, record)
        await conn.commit()


async def test_a_hub_whose_certificate_expired_must_enroll_again(
    trial: Trial, gateway: RunningGateway, tmp_path: Path
) -> None:
    identity = await enrolled_hub(trial, gateway, tmp_path / "hub")
    await expire(trial, gateway, identity)
    with pytest.raises(credentials.HubWithdrawn) as info:
        await credentials.renew(identity)
    assert info.value.status == "expired"
    assert (await credentials.ask_standing(identity))["status"] == "expired"


LONG_INT_BODY = b'{"signed_at_ms": ' + b"9" * 5000 + b', "signature": "x"}'


@pytest.mark.parametrize(
    ("case", "status", "kind", "recorded"),
    [
        ("other_key", 401, "not-authenticated", "not_authenticated"),
        ("other_purpose", 401, "not-authenticated", "not_authenticated"),
        ("other_device", 401, "not-authenticated", "not_authenticated"),
        ("tampered_csr", 401, "not-authenticated", "not_authenticated"),
        ("stale", 400, "stale-request", "stale_request"),
        ("csr_of_other_key", 400, "invalid-csr", "invalid_csr"),
        ("garbage_csr", 400, "invalid-csr", "invalid_csr"),
        ("signature_not_base64", 401, "not-authenticated", "not_authenticated"),
        ("signature_too_long", 400, "invalid-field", "malformed_request"),
        ("signed_at_text", 400, "invalid-field", "malformed_request"),
        ("signed_at_bool", 400, "invalid-field", "malformed_request"),
        ("signed_at_negative", 400, "invalid-field", "malformed_request"),
        ("signed_at_5000_digits", 400, "malformed-json", "malformed_request"),
        ("missing_signature", 400, "invalid-field", "malformed_request"),
        ("not_json", 400, "malformed-json", "malformed_request"),
    ],
)
async def test_bad_renewals_are_refused_and_recorded(
    trial: Trial,
    gateway: RunningGateway,
    tmp_path: Path,
    case: str,
    status: int,
    kind: str,
    recorded: str,
) -> None:
    identity = await enrolled_hub(trial, gateway, tmp_path / "hub")
    csr = make_csr(identity.key()).decode()
    other = keys.generate_private_key()
    purpose = hub_requests.PURPOSE_RENEW
    now_ms = int(time.time() * 1000)
    json_bodies: dict[str, dict[str, Any]] = {
        "other_key": signed_body(identity, purpose, csr=csr, key=other),
        # The standing purpose's signature over this very body and time.
        "other_purpose": {
            "signed_at_ms": now_ms,
            "signature": hub_requests.sign(
                identity.key(),
                hub_requests.PURPOSE_STANDING,
                identity.device_id,
                now_ms,
                csr.encode(),
            ),
            "csr": csr,
        },
        "tampered_csr": {
            **signed_body(identity, purpose, csr=csr),
            "csr": make_csr(identity.key()).decode(),
        },
        "stale": signed_body(identity, purpose, csr=csr, signed_at_ms=now_ms - 3_600_000),
        "csr_of_other_key": signed_body(identity, purpose, csr=make_csr(other).decode()),
        "garbage_csr": signed_body(identity, purpose, csr="-----BEGIN nonsense"),
        "signature_not_base64": {**signed_body(identity, purpose, csr=csr), "signature": "%%"},
        "signature_too_long": {**signed_body(identity, purpose, csr=csr), "signature": "A" * 129},
        "signed_at_text": {**signed_body(identity, purpose, csr=csr), "signed_at_ms": "now"},
        "signed_at_bool": {**signed_body(identity, purpose, csr=csr), "signed_at_ms": True},
        "signed_at_negative": {**signed_body(identity, purpose, csr=csr), "signed_at_ms": -1},
        "missing_signature": {"signed_at_ms": now_ms, "csr": csr},
    }
    path = f"/api/v1/devices/{identity.device_id}/certificates"
    if case == "other_device":
        # A valid request of this hub, sent in another enrolled hub's name.
        second = await enrolled_hub(trial, gateway, tmp_path / "second")
        path = f"/api/v1/devices/{second.device_id}/certificates"
        resp = await gateway.client.post(path, json=signed_body(identity, purpose, csr=csr))
        recorded_for = second.device_id
    elif case in json_bodies:
        resp = await gateway.client.post(path, json=json_bodies[case])
        recorded_for = identity.device_id
    else:
        raw = LONG_INT_BODY if case == "signed_at_5000_digits" else b"{not json"
        resp = await gateway.client.post(
            path, data=raw, headers={"Content-Type": "application/json"}
        )
        recorded_for = identity.device_id
    body = await resp.json(content_type=None)
    assert (resp.status, body["type"].rsplit("/", 1)[-1]) == (status, kind), body
    assert resp.content_type == "application/problem+json"
    if case == "stale":
        assert abs(body["server_time_ms"] - now_ms) < 60_000
    assert await refusals(trial, recorded_for) == [recorded]
    async with db.connection(trial.url) as conn:
        assert len(await certificates.of_device(conn, identity.device_id)) == 1


@pytest.mark.parametrize("device_id", ["..%2F..%2Fetc", "a" * 65, "hub%00x"])
async def test_a_device_id_that_cannot_be_one_is_not_found(
    gateway: RunningGateway, device_id: str
) -> None:
    resp = await gateway.client.post(
        f"/api/v1/devices/{device_id}/standing",
        json={"signed_at_ms": 1, "signature": base64.b64encode(b"x").decode()},
    )
    assert resp.status == 404
    assert resp.content_type == "application/problem+json"


async def test_the_crl_lists_every_valid_certificate_of_a_revoked_hub(
    trial: Trial, gateway: RunningGateway, tmp_path: Path
) -> None:
    identity = await enrolled_hub(trial, gateway, tmp_path / "hub")
    first = credentials.certificate_window(identity)
    second = await credentials.renew(identity)
    await expire(trial, gateway, identity)  # an expired one need not be listed
    keeper = await enrolled_hub(trial, gateway, tmp_path / "kept")
    ca: StudyCA = gateway.client.app[STUDY_CA]  # type: ignore[attr-defined]
    async with db.connection(trial.url) as conn:
        await enrollment.revoke(conn, identity.device_id, actor="coordinator-1", reason="lost")
        crl = await revocation.publish_crl(conn, ca)
    listed = {format(r.serial_number, "x") for r in crl}
    assert listed == {first.serial, second.serial}
    assert credentials.certificate_window(keeper).serial not in listed
