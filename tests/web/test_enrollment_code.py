"""The enrollment code a coordinator makes for a participant's hub: its QR text names the
gateway by its configured public address, whatever the request's Host said, and pins the
study CA; the hub reads it back as written."""

from __future__ import annotations

from device_drivers.identity import parse_enrollment
from gateway import enrollment
from gateway.app import SETTINGS, STUDY_CA
from tests.web.conftest import Web


async def test_the_qr_code_names_the_public_address_and_the_study_ca(web: Web) -> None:
    app = web.gateway.client.app
    resp = await web.call(
        "coordinator",
        "POST",
        "/api/v1/participants/P1/enrollment-codes",
        json={"ttl_hours": 2},
        # What a TLS proxy in front, or a forged request, makes the origin say.
        headers={"Host": "attacker.example"},
    )
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    ticket = parse_enrollment(body["qr_payload"])
    assert ticket.gateway_url == app[SETTINGS].gateway_url  # type: ignore[index]
    assert "attacker" not in body["qr_payload"]
    assert ticket.ca_sha256 == enrollment.ca_sha256(app[STUDY_CA])  # type: ignore[index]
    assert ticket.code == body["code"]
    assert body["qr_svg"].startswith("<svg")
