"""Device Information service 0x180A: the UTF-8 string characteristics.

0x2A24 model number, 0x2A25 serial number, 0x2A26 firmware revision, 0x2A27 hardware
revision, 0x2A28 software revision, 0x2A29 manufacturer name. Devices often pad with NULs:
trailing NULs are stripped. Invalid UTF-8 is a :class:`MalformedPayload` at the first bad
byte. These go into a sensor's provenance; they are no readings.
"""

from __future__ import annotations

from typing import Final

from device_drivers.gatt._codec import Reader, char_label
from device_drivers.gatt.base import Measurement
from device_drivers.gatt.errors import EncodeError

__all__ = [
    "FIRMWARE_REVISION",
    "HARDWARE_REVISION",
    "MANUFACTURER_NAME",
    "MODEL_NUMBER",
    "NAMES",
    "SERIAL_NUMBER",
    "SOFTWARE_REVISION",
    "decode",
    "encode",
    "measurements",
]

MODEL_NUMBER: Final = 0x2A24
SERIAL_NUMBER: Final = 0x2A25
FIRMWARE_REVISION: Final = 0x2A26
HARDWARE_REVISION: Final = 0x2A27
SOFTWARE_REVISION: Final = 0x2A28
MANUFACTURER_NAME: Final = 0x2A29

NAMES: Final[dict[int, str]] = {
    MODEL_NUMBER: "Model Number String",
    SERIAL_NUMBER: "Serial Number String",
    FIRMWARE_REVISION: "Firmware Revision String",
    HARDWARE_REVISION: "Hardware Revision String",
    SOFTWARE_REVISION: "Software Revision String",
    MANUFACTURER_NAME: "Manufacturer Name String",
}


def decode(data: bytes, char_id: int = MANUFACTURER_NAME) -> str:
    """The string, trailing NULs removed; ``char_id`` only names the characteristic in errors."""
    reader = Reader(data, char_id)
    raw = reader.rest().rstrip(b"\x00")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise reader.error("invalid UTF-8", exc.reason, offset=exc.start) from exc


def encode(text: str, char_id: int = MANUFACTURER_NAME) -> bytes:
    if text.endswith("\x00"):
        raise EncodeError(f"{char_label(char_id)}: trailing NULs would be stripped on decode")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EncodeError(f"{char_label(char_id)}: {exc.reason}") from exc


def measurements(text: str) -> list[Measurement]:
    """Provenance, not a reading."""
    del text
    return []
