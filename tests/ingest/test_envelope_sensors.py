"""Sensor reports (``s``): the provenance of a wearable's readings, optional in a payload."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ingest.envelope import MAX_SENSORS_PER_ENVELOPE, open_envelope, seal, verify
from ingest.model import Payload, Reason, SensorReport
from ingest.wire import EnvelopeError
from tests.ingest.test_envelope import make_payload, payload_obj, raw_sign1

STRAP = SensorReport("hr-1", "Acme", "HRM-2", "SN-42", "1.4.2", "rev C", 87)


def test_sensor_reports_round_trip(key: ec.EllipticCurvePrivateKey) -> None:
    payload = replace(make_payload(), sensors=(STRAP, SensorReport("spo2-1")))
    opened = open_envelope(seal(payload, key))
    verify(opened, key.public_key())
    assert opened.payload == payload


def test_a_payload_without_sensors_has_no_s_key(key: ec.EllipticCurvePrivateKey) -> None:
    data = raw_sign1(payload_obj(), key)
    assert open_envelope(data).payload.sensors == ()


def test_a_sensor_only_envelope_is_valid(key: ec.EllipticCurvePrivateKey) -> None:
    payload = Payload("hub-0001", 1, 1_700_000_000_000, (), (), sensors=(STRAP,))
    assert open_envelope(seal(payload, key)).payload.sensors == (STRAP,)


@pytest.mark.parametrize(
    "s",
    [
        [],  # present but empty
        "hr-1",  # not an array
        [["hr-1", "Acme"]],  # wrong arity
        [["hr-1", None, None, None, None, None, 101]],  # battery out of range
        [["hr-1", None, None, None, None, None, True]],  # bool is not a battery level
        [["", None, None, None, None, None, None]],  # empty sensor name
        [["hr-1", 7, None, None, None, None, None]],  # a number where text belongs
        [["hr-1", "x" * 65, None, None, None, None, None]],  # field too long
        [["hr-1", None, None, None, None, None, None]] * (MAX_SENSORS_PER_ENVELOPE + 1),
    ],
)
def test_malformed_sensor_reports_are_refused(key: ec.EllipticCurvePrivateKey, s: Any) -> None:
    with pytest.raises(EnvelopeError) as info:
        open_envelope(raw_sign1(payload_obj(s=s), key))
    assert info.value.reason is Reason.MALFORMED


def test_sealing_refuses_what_the_gateway_would_refuse(key: ec.EllipticCurvePrivateKey) -> None:
    bad = replace(make_payload(), sensors=(replace(STRAP, battery_level=250),))
    with pytest.raises(EnvelopeError):
        seal(bad, key)
    many = replace(make_payload(), sensors=tuple(SensorReport(f"s{i}") for i in range(17)))
    with pytest.raises(EnvelopeError) as info:
        seal(many, key)
    assert info.value.reason is Reason.TOO_LARGE
