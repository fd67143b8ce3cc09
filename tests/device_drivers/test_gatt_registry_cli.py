"""The characteristic registry and the ``decode`` CLI helper."""

from __future__ import annotations

import io
import json

import pytest

from device_drivers.gatt import registry
from device_drivers.gatt.base import Measurement
from device_drivers.gatt.cli import parse_hex, run_decode
from device_drivers.gatt.errors import InvalidHex, MalformedPayload, UnknownCharacteristic


@pytest.mark.parametrize(
    "text",
    [
        "0x2A37",
        "0X2a37",
        "2a37",
        "2A37",
        " 2A37 ",
        "00002a37-0000-1000-8000-00805f9b34fb",
        "00002A37-0000-1000-8000-00805F9B34FB",
    ],
)
def test_parse_characteristic_id(text: str) -> None:
    assert registry.parse_characteristic_id(text) == 0x2A37


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0x",
        "2a3",
        "2a377",
        "0x2G37",
        "heart rate",
        "00002a37-0000-1000-8000-00805f9b34fc",  # not the Bluetooth base UUID
        "12342a37-0000-1000-8000-00805f9b34fb",  # 32-bit alias, not supported
        "0x2A00",  # Device Name: a real UUID with no decoder here
    ],
)
def test_parse_characteristic_id_rejects(text: str) -> None:
    with pytest.raises(UnknownCharacteristic) as caught:
        registry.parse_characteristic_id(text)
    assert caught.value.text == text


def test_registry_covers_every_profile() -> None:
    assert set(registry.CHARACTERISTICS) == {
        0x2A37,
        0x2A1C,
        0x2A1E,
        0x2A35,
        0x2A36,
        0x2A5E,
        0x2A5F,
        0x2A18,
        0x2A34,
        0x2A9D,
        0x2A9C,
        0x2A19,
        0x2A2B,
        0x2A08,
        0x2A24,
        0x2A25,
        0x2A26,
        0x2A27,
        0x2A28,
        0x2A29,
    }
    for uuid, entry in registry.CHARACTERISTICS.items():
        assert entry.uuid == uuid
        assert registry.parse_characteristic_id(registry.full_uuid(uuid)) == uuid


def test_service_constants() -> None:
    assert registry.HEART_RATE_SERVICE == 0x180D
    assert registry.HEALTH_THERMOMETER_SERVICE == 0x1809
    assert registry.BLOOD_PRESSURE_SERVICE == 0x1810
    assert registry.PULSE_OXIMETER_SERVICE == 0x1822
    assert registry.GLUCOSE_SERVICE == 0x1808
    assert registry.WEIGHT_SCALE_SERVICE == 0x181D
    assert registry.BODY_COMPOSITION_SERVICE == 0x181B
    assert registry.BATTERY_SERVICE == 0x180F
    assert registry.CURRENT_TIME_SERVICE == 0x1805
    assert registry.DEVICE_INFORMATION_SERVICE == 0x180A
    assert len(registry.SERVICES) == 10


def test_decode_to_measurements() -> None:
    assert registry.decode_to_measurements(0x2A37, bytes.fromhex("06 48")) == [
        Measurement("heart_rate", 72.0, "/min")
    ]
    assert registry.decode(0x2A29, b"Acme\x00") == "Acme"
    assert registry.decode_to_measurements(0x2A25, b"SN-1") == []
    with pytest.raises(UnknownCharacteristic):
        registry.decode_to_measurements(0x2A00, b"\x00")
    with pytest.raises(UnknownCharacteristic):
        registry.decode_to_measurements(-1, b"\x00")
    with pytest.raises(MalformedPayload) as caught:
        registry.decode_to_measurements(0x2A26, b"\xff")
    assert caught.value.characteristic == "0x2A26"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0648", b"\x06\x48"),
        ("06 48", b"\x06\x48"),
        ("06:48", b"\x06\x48"),
        ("0x0648", b"\x06\x48"),
        ("06-48\n", b"\x06\x48"),
        ("", b""),
    ],
)
def test_parse_hex(text: str, expected: bytes) -> None:
    assert parse_hex(text) == expected


@pytest.mark.parametrize("text", ["064", "zz", "06 4", "0x0x06"])
def test_parse_hex_rejects(text: str) -> None:
    with pytest.raises(InvalidHex):
        parse_hex(text)


def run(characteristic: str, payload: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_decode(characteristic, payload, out, err)
    return code, out.getvalue(), err.getvalue()


def test_cli_prints_one_json_object_per_measurement() -> None:
    payload = "1E 78 00 50 00 5E 00 E8 07 03 0F 0A 1E 00 48 00 01 02 00"
    code, out, err = run("0x2A35", payload)
    assert (code, err) == (0, "")
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0] == {
        "metric": "systolic_bp",
        "value": 120.0,
        "unit": "mm[Hg]",
        "time": "2024-03-15T10:30:00+00:00",
        "flags": ["cuff_loose"],
    }
    assert [line["metric"] for line in lines] == [
        "systolic_bp",
        "diastolic_bp",
        "mean_bp",
        "pulse_rate",
    ]


def test_cli_colons_and_null_time() -> None:
    code, out, _ = run("2a37", "16:48:54:01:EC:02")
    assert code == 0
    first = json.loads(out.splitlines()[0])
    assert first == {
        "metric": "heart_rate",
        "value": 72.0,
        "unit": "/min",
        "time": None,
        "flags": [],
    }


def test_cli_no_measurements_prints_nothing() -> None:
    assert run("0x2A29", "41 63 6D 65") == (0, "", "")


@pytest.mark.parametrize(
    ("characteristic", "payload", "message"),
    [
        ("0x2A37", "00", "error: 0x2A37 payload too short at offset 1: need 1 more byte\n"),
        ("0x2A19", "FF", "error: 0x2A19 value out of range at offset 0: battery level 255 > 100\n"),
        ("0x2A37", "0g", "error: invalid hex payload '0g': not hexadecimal\n"),
        ("0x2A37", "064", "error: invalid hex payload '064': odd number of hex digits\n"),
        ("nope", "00", "error: not a 16-bit or Bluetooth-base characteristic UUID: 'nope'\n"),
        ("0x2A00", "00", "error: no decoder for characteristic 0x2A00: '0x2A00'\n"),
    ],
)
def test_cli_errors_are_one_line(characteristic: str, payload: str, message: str) -> None:
    assert run(characteristic, payload) == (2, "", message)
