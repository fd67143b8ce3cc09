"""Protocol v3 (docs/protocol.md section 4): the hub's time zone, in force since a time, may
travel in any envelope; v1 and v2 cannot carry it; every bad zone is malformed."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pycose.algorithms import Es256
from pycose.headers import KID, Algorithm
from pycose.messages.sign1message import Sign1Message

from ingest.envelope import open_envelope, seal, verify
from ingest.model import PROTOCOL_VERSION, PROTOCOL_VERSIONS, Payload, Reading, Reason, ZoneReport
from ingest.wire import INT64_MAX, INT64_MIN, EnvelopeError
from tests.ingest.test_envelope import DEV, cose_key, payload_obj, raw_sign1

T = 1_700_000_000_000
READING = Reading(T, "heart_rate", 61.0, "/min", "strap")
BERLIN = ZoneReport("Europe/Berlin", T - 3_600_000)


def refusal(obj: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        open_envelope(raw_sign1(obj, key))
    return info.value


def test_a_hub_seals_v3_and_the_gateway_reads_every_version() -> None:
    assert PROTOCOL_VERSION == 3
    assert PROTOCOL_VERSIONS == (1, 2, 3)
    assert Payload(DEV, 1, T, ()).v == 3


@pytest.mark.parametrize(
    "zone",
    [
        BERLIN,
        ZoneReport("America/Argentina/Buenos_Aires", T),
        ZoneReport("America/Port-au-Prince", 0),
        ZoneReport("Etc/GMT+5", INT64_MIN),
        ZoneReport("UTC", INT64_MAX),
        ZoneReport("A" * 64, T),
    ],
    ids=str,
)
def test_a_zone_round_trips_and_pycose_verifies_it(
    key: ec.EllipticCurvePrivateKey, zone: ZoneReport
) -> None:
    payload = Payload(DEV, 7, T, (READING,), zone=zone)
    sealed = seal(payload, key)
    opened = open_envelope(sealed)
    verify(opened, key.public_key())
    assert opened.payload == payload
    assert cbor2.loads(opened.payload_bytes)["tz"] == [zone.since_ms, zone.time_zone]
    message = Sign1Message.decode(sealed)
    message.key = cose_key(key, private=False)
    assert message.phdr == {Algorithm: Es256}
    assert message.uhdr == {KID: DEV.encode()}
    assert message.verify_signature()


def test_an_envelope_of_only_a_zone_is_valid(key: ec.EllipticCurvePrivateKey) -> None:
    payload = Payload(DEV, 7, T, (), zone=BERLIN)
    assert open_envelope(seal(payload, key)).payload == payload


@pytest.mark.parametrize("v", [1, 2])
def test_earlier_versions_cannot_carry_a_zone(key: ec.EllipticCurvePrivateKey, v: int) -> None:
    with pytest.raises(EnvelopeError) as sealing:
        seal(Payload(DEV, 7, T, (READING,), v=v, zone=BERLIN), key)
    assert sealing.value.reason is Reason.MALFORMED
    got = refusal(payload_obj(v=v, tz=[T, "Europe/Berlin"]), key)
    assert got.reason is Reason.MALFORMED
    assert "tz" in got.detail


@pytest.mark.parametrize(
    "tz",
    [
        pytest.param(None, id="nil"),
        pytest.param("Europe/Berlin", id="bare-name"),
        pytest.param([], id="empty"),
        pytest.param([T], id="one-item"),
        pytest.param([T, "Europe/Berlin", 1], id="three-items"),
        pytest.param(["Europe/Berlin", T], id="swapped"),
        pytest.param([float(T), "Europe/Berlin"], id="float-since"),
        pytest.param([True, "Europe/Berlin"], id="bool-since"),
        pytest.param([INT64_MAX + 1, "Europe/Berlin"], id="since-beyond-int64"),
        pytest.param([T, ""], id="empty-name"),
        pytest.param([T, "A" * 65], id="long-name"),
        pytest.param([T, b"Europe/Berlin"], id="bytes-name"),
        pytest.param([T, "Europe/Berlin\n"], id="newline"),
        pytest.param([T, "Europe/Berlin; DROP TABLE"], id="space-and-semicolon"),
        pytest.param([T, "../../etc/passwd"], id="path"),
        pytest.param([T, "/Europe/Berlin"], id="leading-slash"),
        pytest.param([T, "Europe/Zürich"], id="non-ascii"),
        pytest.param([T, "Europe/Berlin\x00"], id="nul"),
        pytest.param({"since": T, "zone": "Europe/Berlin"}, id="map"),
    ],
)
def test_every_bad_zone_is_malformed(key: ec.EllipticCurvePrivateKey, tz: object) -> None:
    assert refusal(payload_obj(v=3, tz=tz), key).reason is Reason.MALFORMED


def test_a_zone_is_checked_before_sealing(key: ec.EllipticCurvePrivateKey) -> None:
    payload = Payload(DEV, 7, T, (READING,), zone=ZoneReport("not a zone", T))
    with pytest.raises(EnvelopeError) as info:
        seal(payload, key)
    assert info.value.reason is Reason.MALFORMED
    assert open_envelope(seal(replace(payload, zone=BERLIN), key)).payload.zone == BERLIN


def test_v3_keeps_the_other_keys_exact(key: ec.EllipticCurvePrivateKey) -> None:
    assert refusal(payload_obj(v=3, zone=[T, "UTC"]), key).reason is Reason.MALFORMED
    assert refusal(payload_obj(v=3, tz=[T, "UTC"], gaps=...), key).reason is Reason.MALFORMED
