"""One explicit table from 16-bit characteristic UUIDs to their decoders.

:data:`CHARACTERISTICS` maps each supported characteristic to its name, its ``decode``
(bytes -> frozen dataclass or str) and its ``measurements`` (decoded value -> canonical
readings). :func:`parse_characteristic_id` reads the ways people write a UUID;
:func:`decode_to_measurements` is the one call a driver needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Generic, TypeVar

from device_drivers.gatt import (
    battery,
    blood_pressure,
    body_composition,
    current_time,
    date_time,
    device_information,
    glucose,
    heart_rate,
    pulse_oximeter,
    temperature,
    weight_scale,
)
from device_drivers.gatt._codec import char_label
from device_drivers.gatt.base import Measurement
from device_drivers.gatt.errors import UnknownCharacteristic

__all__ = [
    "BATTERY_SERVICE",
    "BLOOD_PRESSURE_SERVICE",
    "BODY_COMPOSITION_SERVICE",
    "CHARACTERISTICS",
    "CURRENT_TIME_SERVICE",
    "DEVICE_INFORMATION_SERVICE",
    "GLUCOSE_SERVICE",
    "HEALTH_THERMOMETER_SERVICE",
    "HEART_RATE_SERVICE",
    "PULSE_OXIMETER_SERVICE",
    "SERVICES",
    "WEIGHT_SCALE_SERVICE",
    "Characteristic",
    "decode",
    "decode_to_measurements",
    "full_uuid",
    "parse_characteristic_id",
]

HEART_RATE_SERVICE: Final = 0x180D
HEALTH_THERMOMETER_SERVICE: Final = 0x1809
BLOOD_PRESSURE_SERVICE: Final = 0x1810
PULSE_OXIMETER_SERVICE: Final = 0x1822
GLUCOSE_SERVICE: Final = 0x1808
WEIGHT_SCALE_SERVICE: Final = 0x181D
BODY_COMPOSITION_SERVICE: Final = 0x181B
BATTERY_SERVICE: Final = 0x180F
CURRENT_TIME_SERVICE: Final = 0x1805
DEVICE_INFORMATION_SERVICE: Final = 0x180A

SERVICES: Final[dict[int, str]] = {
    HEART_RATE_SERVICE: "Heart Rate",
    HEALTH_THERMOMETER_SERVICE: "Health Thermometer",
    BLOOD_PRESSURE_SERVICE: "Blood Pressure",
    PULSE_OXIMETER_SERVICE: "Pulse Oximeter",
    GLUCOSE_SERVICE: "Glucose",
    WEIGHT_SCALE_SERVICE: "Weight Scale",
    BODY_COMPOSITION_SERVICE: "Body Composition",
    BATTERY_SERVICE: "Battery",
    CURRENT_TIME_SERVICE: "Current Time",
    DEVICE_INFORMATION_SERVICE: "Device Information",
}

BASE_UUID_SUFFIX: Final = "-0000-1000-8000-00805f9b34fb"
"""The Bluetooth Base UUID: ``0000xxxx-0000-1000-8000-00805F9B34FB`` holds a 16-bit UUID."""

_SHORT = re.compile(r"(?:0x)?([0-9a-f]{4})")
_FULL = re.compile(r"0000([0-9a-f]{4})" + re.escape(BASE_UUID_SUFFIX))

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Characteristic(Generic[_T]):
    uuid: int
    name: str
    decode: Callable[[bytes], _T]
    measurements: Callable[[_T], list[Measurement]]

    def decode_to_measurements(self, data: bytes) -> list[Measurement]:
        return self.measurements(self.decode(data))


def _entries() -> dict[int, Characteristic[Any]]:
    entries: list[Characteristic[Any]] = [
        Characteristic(
            0x2A37, "Heart Rate Measurement", heart_rate.decode, heart_rate.measurements
        ),
        Characteristic(
            0x2A1C, "Temperature Measurement", temperature.decode, temperature.measurements
        ),
        Characteristic(
            0x2A1E,
            "Intermediate Temperature",
            temperature.decode_intermediate,
            temperature.intermediate_measurements,
        ),
        Characteristic(
            0x2A35,
            "Blood Pressure Measurement",
            blood_pressure.decode,
            blood_pressure.measurements,
        ),
        Characteristic(
            0x2A36,
            "Intermediate Cuff Pressure",
            blood_pressure.decode_intermediate,
            blood_pressure.intermediate_measurements,
        ),
        Characteristic(
            0x2A5E,
            "PLX Spot-Check Measurement",
            pulse_oximeter.decode_spot_check,
            pulse_oximeter.spot_check_measurements,
        ),
        Characteristic(
            0x2A5F,
            "PLX Continuous Measurement",
            pulse_oximeter.decode_continuous,
            pulse_oximeter.continuous_measurements,
        ),
        Characteristic(0x2A18, "Glucose Measurement", glucose.decode, glucose.measurements),
        Characteristic(
            0x2A34,
            "Glucose Measurement Context",
            glucose.decode_context,
            glucose.context_measurements,
        ),
        Characteristic(
            0x2A9D, "Weight Measurement", weight_scale.decode, weight_scale.measurements
        ),
        Characteristic(
            0x2A9C,
            "Body Composition Measurement",
            body_composition.decode,
            body_composition.measurements,
        ),
        Characteristic(0x2A19, "Battery Level", battery.decode, battery.measurements),
        Characteristic(0x2A2B, "Current Time", current_time.decode, current_time.measurements),
        Characteristic(0x2A08, "Date Time", date_time.decode, date_time.measurements),
    ]
    entries += [
        Characteristic(
            uuid,
            name,
            partial(device_information.decode, char_id=uuid),
            device_information.measurements,
        )
        for uuid, name in device_information.NAMES.items()
    ]
    return {entry.uuid: entry for entry in entries}


CHARACTERISTICS: Final[dict[int, Characteristic[Any]]] = _entries()


def full_uuid(char_id: int) -> str:
    """The 128-bit form bleak uses: ``00002a37-0000-1000-8000-00805f9b34fb``."""
    return f"0000{char_id:04x}{BASE_UUID_SUFFIX}"


def parse_characteristic_id(text: str) -> int:
    """``"0x2A37"``, ``"2a37"``, ``"2A37"`` or the Bluetooth-base 128-bit form -> ``0x2A37``.

    Raises :class:`UnknownCharacteristic` for anything else, or for a characteristic that
    has no decoder here.
    """
    cleaned = text.strip().lower()
    match = _SHORT.fullmatch(cleaned) or _FULL.fullmatch(cleaned)
    if match is None:
        raise UnknownCharacteristic(text, "not a 16-bit or Bluetooth-base characteristic UUID")
    char_id = int(match.group(1), 16)
    if char_id not in CHARACTERISTICS:
        raise UnknownCharacteristic(text, f"no decoder for characteristic {char_label(char_id)}")
    return char_id


def _lookup(char_id: int) -> Characteristic[Any]:
    entry = CHARACTERISTICS.get(char_id)
    if entry is None:
        label = char_label(char_id) if 0 <= char_id <= 0xFFFF else repr(char_id)
        raise UnknownCharacteristic(label, f"no decoder for characteristic {label}")
    return entry


def decode(char_id: int, data: bytes) -> object:
    """The decoded value (dataclass, or str for Device Information)."""
    return _lookup(char_id).decode(data)


def decode_to_measurements(char_id: int, data: bytes) -> list[Measurement]:
    """Canonical readings of one characteristic value (MalformedPayload on bad data)."""
    return _lookup(char_id).decode_to_measurements(data)
