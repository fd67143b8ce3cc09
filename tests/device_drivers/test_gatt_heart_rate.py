"""Heart Rate Measurement (0x2A37).

Vectors: "16 48 54 01 EC 02" is the example of movisens SmartGattLib's
HeartRateMeasurementTest (72 bpm, contact, RR 340/1024 s and 748/1024 s); "02 3C" and
"01 01 01" are OpenTracks' parseHeartRate tests (60 and 257 bpm). The rest are derived by
hand from the Heart Rate Service 1.0 field layout (flags; uint8/uint16 value; uint16
energy; uint16 RR list in 1/1024 s).
"""

from __future__ import annotations

import pytest

from device_drivers.errors import DeviceDriverError
from device_drivers.gatt import heart_rate
from device_drivers.gatt.base import Measurement
from device_drivers.gatt.errors import GattError, MalformedPayload
from device_drivers.gatt.heart_rate import HeartRateMeasurement


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("16 48 54 01 EC 02", HeartRateMeasurement(72, True, None, (332.03125, 730.46875))),
        ("02 3C", HeartRateMeasurement(60, None, None, ())),  # bit 1 alone: not supported
        ("01 01 01", HeartRateMeasurement(257, None, None, ())),
        ("06 48", HeartRateMeasurement(72, True, None, ())),
        ("04 50", HeartRateMeasurement(80, False, None, ())),
        # uint16 300 bpm, energy 1000 kJ, one RR of 1024/1024 s
        ("19 2C 01 E8 03 00 04", HeartRateMeasurement(300, None, 1000, (1000.0,))),
        # RR flag with no interval: an empty list
        ("10 48", HeartRateMeasurement(72, None, None, ())),
        # reserved flag bits 5-7 are ignored
        ("E0 48", HeartRateMeasurement(72, None, None, ())),
    ],
)
def test_decode_vectors(payload: str, expected: HeartRateMeasurement) -> None:
    assert heart_rate.decode(bytes.fromhex(payload)) == expected


@pytest.mark.parametrize(
    ("payload", "offset", "message"),
    [
        ("", 0, "0x2A37 payload too short at offset 0: need 1 more byte"),
        ("00", 1, "0x2A37 payload too short at offset 1: need 1 more byte"),
        ("01 48", 1, "0x2A37 payload too short at offset 1: need 1 more byte"),
        ("08 48", 2, "0x2A37 payload too short at offset 2: need 2 more bytes"),
        ("10 48 00", 2, "0x2A37 payload too short at offset 2: need 1 more byte"),
        ("10 48 00 04 01", 4, "0x2A37 payload too short at offset 4: need 1 more byte"),
    ],
)
def test_malformed(payload: str, offset: int, message: str) -> None:
    with pytest.raises(MalformedPayload) as caught:
        heart_rate.decode(bytes.fromhex(payload))
    assert caught.value.characteristic == "0x2A37"
    assert caught.value.offset == offset
    assert str(caught.value) == message
    assert isinstance(caught.value, GattError)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, DeviceDriverError)


@pytest.mark.parametrize(
    ("measurement", "kwargs", "payload"),
    [
        (HeartRateMeasurement(72, True, None, (332.03125, 730.46875)), {}, "16 48 54 01 EC 02"),
        (HeartRateMeasurement(60), {}, "00 3C"),
        (HeartRateMeasurement(60), {"uint16": True}, "01 3C 00"),
        (HeartRateMeasurement(257), {}, "01 01 01"),  # over 255: 16-bit regardless
        (HeartRateMeasurement(80, False), {}, "04 50"),
        (HeartRateMeasurement(300, None, 1000, (1000.0,)), {}, "19 2C 01 E8 03 00 04"),
        # RR in ms is rounded to the nearest 1/1024 s: 812.3 ms -> 831.8 -> 832 (0x0340)
        (HeartRateMeasurement(72, None, None, (812.3,)), {}, "10 48 40 03"),
    ],
)
def test_encode_vectors(
    measurement: HeartRateMeasurement, kwargs: dict[str, bool], payload: str
) -> None:
    assert heart_rate.encode(measurement, **kwargs) == bytes.fromhex(payload)


def test_measurements() -> None:
    m = heart_rate.decode(bytes.fromhex("16 48 54 01 EC 02"))
    assert heart_rate.measurements(m) == [
        Measurement("heart_rate", 72.0, "/min", None, ()),
        Measurement("rr_interval", 332.03125, "ms", None, ()),
        Measurement("rr_interval", 730.46875, "ms", None, ()),
    ]


def test_no_contact_is_flagged() -> None:
    m = heart_rate.decode(bytes.fromhex("14 48 00 04"))
    readings = heart_rate.measurements(m)
    assert [r.metric for r in readings] == ["heart_rate", "rr_interval"]
    assert all(r.flags == ("no_sensor_contact",) for r in readings)
