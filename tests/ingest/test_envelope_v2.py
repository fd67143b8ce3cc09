"""Protocol v2 (docs/protocol.md section 4): readings with the device's flags and user, sensor
reports with the paired user; v1 still read; pycose agrees on the signatures."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pycose.algorithms import Es256
from pycose.headers import KID, Algorithm
from pycose.messages.sign1message import Sign1Message

from ingest.envelope import (
    MAX_FLAGS_PER_READING,
    MAX_ITEMS_PER_ENVELOPE,
    open_envelope,
    seal,
    verify,
)
from ingest.model import Gap, Payload, Reading, Reason, SensorReport
from ingest.wire import EnvelopeError
from tests.ingest.test_envelope import DEV, cose_key, payload_obj, raw_sign1

T = 1_700_000_000_000
CUFF = Reading(T, "systolic_bp", 128.0, "mm[Hg]", "cuff", ("cuff_loose", "irregular_pulse"), 2)
METER = Reading(
    T, "glucose", 104.0, "mg/dL", "meter", ("location_finger",), None, "g:17:1699999999000"
)
PLAIN = Reading(T + 1, "diastolic_bp", 81.0, "mm[Hg]", "cuff")
CUFF_REPORT = SensorReport("cuff", "Acme", "BP-7", "SN9", "2.1", None, 80, paired_user=2)


def v2_payload(*readings: Reading, sensors: tuple[SensorReport, ...] = ()) -> Payload:
    return Payload(DEV, 7, T + 5000, readings or (CUFF, PLAIN), v=2, sensors=sensors)


def v2_obj(**changes: Any) -> dict[str, Any]:
    return payload_obj(v=2, **changes)


def refusal(obj: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        open_envelope(raw_sign1(obj, key))
    return info.value


def test_v2_is_still_sealed_on_request(key: ec.EllipticCurvePrivateKey) -> None:
    payload = v2_payload(CUFF, PLAIN)
    opened = open_envelope(seal(payload, key))
    assert opened.payload == payload
    assert cbor2.loads(opened.payload_bytes)["v"] == 2


def test_flags_user_and_paired_user_round_trip(key: ec.EllipticCurvePrivateKey) -> None:
    payload = v2_payload(CUFF, PLAIN, METER, sensors=(CUFF_REPORT,))
    opened = open_envelope(seal(payload, key))
    verify(opened, key.public_key())
    assert opened.payload == payload
    assert opened.payload.readings[0].flags == ("cuff_loose", "irregular_pulse")
    assert opened.payload.readings[0].user == 2
    assert opened.payload.sensors[0].paired_user == 2
    assert opened.payload.readings[2].record == "g:17:1699999999000"


def test_wire_shape_of_v2(key: ec.EllipticCurvePrivateKey) -> None:
    """A reading without a status keeps v1's five elements; one with a status has eight; a
    v2 sensor report has eight."""
    payload_bytes = cbor2.loads(seal(v2_payload(sensors=(CUFF_REPORT,)), key)).value[2]
    obj = cbor2.loads(payload_bytes)
    assert obj["v"] == 2
    assert obj["r"] == [
        [T, "systolic_bp", 128.0, "mm[Hg]", "cuff", ["cuff_loose", "irregular_pulse"], 2, None],
        [T + 1, "diastolic_bp", 81.0, "mm[Hg]", "cuff"],
    ]
    assert obj["s"] == [["cuff", "Acme", "BP-7", "SN9", "2.1", None, 80, 2]]


def test_pycose_verifies_a_v2_envelope(key: ec.EllipticCurvePrivateKey) -> None:
    message = Sign1Message.decode(seal(v2_payload(sensors=(CUFF_REPORT,)), key))
    message.key = cose_key(key, private=False)
    assert message.verify_signature()
    assert message.phdr[Algorithm] is Es256
    assert cbor2.loads(message.payload)["r"][0][5:] == [["cuff_loose", "irregular_pulse"], 2, None]


def test_a_v2_envelope_signed_by_pycose_opens(key: ec.EllipticCurvePrivateKey) -> None:
    obj = v2_obj(
        r=[
            [T, "spo2", 88.0, "%", "oxi", ["questionable_measurement", "low_perfusion"], None, None]
        ],
        s=[["oxi", None, None, None, None, None, None, None]],
    )
    message = Sign1Message(
        phdr={Algorithm: Es256}, uhdr={KID: DEV.encode()}, payload=cbor2.dumps(obj)
    )
    message.key = cose_key(key, private=True)
    opened = open_envelope(message.encode())
    verify(opened, key.public_key())
    assert opened.payload.v == 2
    # Flags are a set: decoded in sorted order whatever order they were sent in.
    assert opened.payload.readings == (
        Reading(T, "spo2", 88.0, "%", "oxi", ("low_perfusion", "questionable_measurement")),
    )
    assert opened.payload.sensors == (SensorReport("oxi"),)


def test_v1_envelopes_are_still_read(key: ec.EllipticCurvePrivateKey) -> None:
    v1 = replace(v2_payload(PLAIN, sensors=(replace(CUFF_REPORT, paired_user=None),)), v=1)
    data = seal(v1, key)
    assert cbor2.loads(cbor2.loads(data).value[2])["v"] == 1
    opened = open_envelope(data)
    assert opened.payload == v1
    assert opened.payload.v == 1


def test_an_empty_status_means_no_status(key: ec.EllipticCurvePrivateKey) -> None:
    obj = v2_obj(r=[[T, "heart_rate", 61.0, "/min", "strap", [], None, None]])
    assert open_envelope(raw_sign1(obj, key)).payload.readings == (
        Reading(T, "heart_rate", 61.0, "/min", "strap"),
    )


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(
            {"r": [[T, "hr", 1.0, "/min", "s", ["x"], None, None]]}, id="v1-reading-status"
        ),
        pytest.param({"s": [["s", None, None, None, None, None, None, 1]]}, id="v1-paired-user"),
    ],
)
def test_v1_carries_no_status(key: ec.EllipticCurvePrivateKey, change: dict[str, Any]) -> None:
    assert refusal(payload_obj(**change), key).reason is Reason.MALFORMED


def test_sealing_v1_refuses_what_only_v2_can_carry(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(EnvelopeError, match="need protocol v2"):
        seal(replace(v2_payload(CUFF), v=1), key)
    with pytest.raises(EnvelopeError, match="need protocol v2"):
        seal(replace(v2_payload(PLAIN._replace(record="g:1:2")), v=1), key)
    with pytest.raises(EnvelopeError, match="needs protocol v2"):
        seal(replace(v2_payload(PLAIN, sensors=(CUFF_REPORT,)), v=1), key)


def reading_with(flags: Any = ("cuff_loose",), user: Any = None, record: Any = None) -> list[Any]:
    return [T, "systolic_bp", 120.0, "mm[Hg]", "cuff", flags, user, record]


@pytest.mark.parametrize(
    "reading",
    [
        pytest.param(reading_with("cuff_loose"), id="flags-not-an-array"),
        pytest.param(reading_with({"cuff_loose": 1}), id="flags-a-map"),
        pytest.param(reading_with([f"f{i}" for i in range(17)]), id="seventeen-flags"),
        pytest.param(reading_with(["cuff_loose", "cuff_loose"]), id="flag-twice"),
        pytest.param(reading_with(["Cuff_loose"]), id="upper-case"),
        pytest.param(reading_with(["1cuff"]), id="leading-digit"),
        pytest.param(reading_with(["_cuff"]), id="leading-underscore"),
        pytest.param(reading_with([""]), id="empty-flag"),
        pytest.param(reading_with(["a" * 33]), id="flag-too-long"),
        pytest.param(reading_with(["cuff-loose"]), id="hyphen"),
        pytest.param(reading_with(["cuff loose"]), id="space"),
        pytest.param(reading_with(["cuffé"]), id="non-ascii"),
        pytest.param(reading_with(["cuff\x00"]), id="nul"),
        pytest.param(reading_with([7]), id="int-flag"),
        pytest.param(reading_with([b"cuff"]), id="bstr-flag"),
        pytest.param(reading_with(None), id="nil-flags"),
        pytest.param(reading_with(user=256), id="user-256"),
        pytest.param(reading_with(user=-1), id="user-negative"),
        pytest.param(reading_with(user=True), id="user-bool"),
        pytest.param(reading_with(user=2.0), id="user-float"),
        pytest.param(reading_with(user="2"), id="user-text"),
        pytest.param(reading_with(user=2**64 - 1), id="user-huge"),
        pytest.param(reading_with(record=""), id="empty-record"),
        pytest.param(reading_with(record="r" * 65), id="record-too-long"),
        pytest.param(reading_with(record=17), id="int-record"),
        pytest.param(reading_with(record="g:1\x00"), id="record-control"),
        pytest.param(reading_with()[:6], id="six-elements"),
        pytest.param(reading_with()[:7], id="seven-elements"),
        pytest.param([*reading_with(), None], id="nine-elements"),
    ],
)
def test_a_malformed_status_refuses_the_envelope(
    key: ec.EllipticCurvePrivateKey, reading: list[Any]
) -> None:
    error = refusal(v2_obj(r=[reading]), key)
    assert error.reason is Reason.MALFORMED
    assert "r[0]" in error.detail


@pytest.mark.parametrize(
    "report",
    [
        pytest.param(["s", None, None, None, None, None, None], id="v1-shape-in-v2"),
        pytest.param(["s", None, None, None, None, None, None, 256], id="paired-256"),
        pytest.param(["s", None, None, None, None, None, None, "2"], id="paired-text"),
        pytest.param(["s", None, None, None, None, None, None, 1, 2], id="nine-elements"),
    ],
)
def test_a_malformed_v2_sensor_report_refuses_the_envelope(
    key: ec.EllipticCurvePrivateKey, report: list[Any]
) -> None:
    assert refusal(v2_obj(s=[report]), key).reason is Reason.MALFORMED


def test_sixteen_flags_is_the_limit(key: ec.EllipticCurvePrivateKey) -> None:
    flags = tuple(sorted(f"flag_{i}" for i in range(MAX_FLAGS_PER_READING)))
    reading = PLAIN._replace(flags=flags)
    assert open_envelope(seal(v2_payload(reading), key)).payload.readings == (reading,)
    with pytest.raises(EnvelopeError):
        seal(v2_payload(PLAIN._replace(flags=(*flags, "flag_x"))), key)


def test_a_full_batch_of_maximal_flagged_readings_is_too_large_to_seal(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    """Flags can make a full batch exceed the size limit: sealing says so (the hub's outbox
    then seals fewer readings per envelope), it never signs what the gateway would refuse."""
    flags = tuple(sorted(f"{chr(97 + i)}" * 32 for i in range(MAX_FLAGS_PER_READING)))
    big = Reading(T, "m" * 64, 1.0, "u" * 32, "s" * 128, flags, 255, "r" * 64)
    with pytest.raises(EnvelopeError) as info:
        seal(v2_payload(*([big] * MAX_ITEMS_PER_ENVELOPE)), key)
    assert info.value.reason is Reason.TOO_LARGE


def test_a_gap_names_its_wearable_in_v2(key: ec.EllipticCurvePrivateKey) -> None:
    gaps = (Gap(T - 5000, T, "out_of_range", "strap"), Gap(T - 9000, T - 8000, "clock_jump"))
    payload = Payload(DEV, 1, T, (), gaps)
    assert open_envelope(seal(payload, key)).payload.gaps == gaps
    with pytest.raises(EnvelopeError, match="needs protocol v2"):
        seal(replace(payload, v=1), key)


@pytest.mark.parametrize(
    ("v", "gap"),
    [
        pytest.param(1, [T - 5, T, "out_of_range", "strap"], id="v1-sensor"),
        pytest.param(2, [T - 5, T, "out_of_range", ""], id="empty-sensor"),
        pytest.param(2, [T - 5, T, "out_of_range", 7], id="int-sensor"),
        pytest.param(2, [T - 5, T, "out_of_range", "s\x00"], id="nul-sensor"),
        pytest.param(2, [T - 5, T, "out_of_range", "s", "x"], id="five-elements"),
    ],
)
def test_a_malformed_gap_sensor_refuses_the_envelope(
    key: ec.EllipticCurvePrivateKey, v: int, gap: list[Any]
) -> None:
    assert refusal(payload_obj(v=v, gaps=[gap]), key).reason is Reason.MALFORMED
