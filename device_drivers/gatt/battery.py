"""Battery Level (0x2A19), Battery service 0x180F: uint8 percent, 0..100 (101..255 are
reserved and rejected). The reading ``battery_level`` (%) is device health, not clinical.
"""

from __future__ import annotations

from dataclasses import dataclass

from device_drivers.gatt._codec import Reader, Writer
from device_drivers.gatt.base import Measurement, reading
from device_drivers.gatt.errors import EncodeError

__all__ = ["CHARACTERISTIC", "BatteryLevel", "decode", "encode", "measurements"]

CHARACTERISTIC = 0x2A19
_MAX_PERCENT = 100


@dataclass(frozen=True, slots=True)
class BatteryLevel:
    percent: int


def decode(data: bytes) -> BatteryLevel:
    reader = Reader(data, CHARACTERISTIC)
    percent = reader.u8()
    if percent > _MAX_PERCENT:
        raise reader.error("value out of range", f"battery level {percent} > 100", offset=0)
    return BatteryLevel(percent)


def encode(level: BatteryLevel) -> bytes:
    if not 0 <= level.percent <= _MAX_PERCENT:
        raise EncodeError(f"battery level {level.percent} is outside 0..100")
    writer = Writer()
    writer.u8(level.percent)
    return writer.getvalue()


def measurements(level: BatteryLevel) -> list[Measurement]:
    return reading("battery_level", float(level.percent))
