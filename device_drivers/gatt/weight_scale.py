"""Weight Measurement (0x2A9D), Weight Scale service 0x181D (Weight Scale Service 1.0).

- flags uint8: bit 0 unit system (0 SI: kg and m, 1 imperial: lb and in); bit 1 Time
  Stamp; bit 2 User ID; bit 3 BMI and Height; bits 4-7 reserved (ignored).
- weight uint16: resolution 0.005 kg (SI) or 0.01 lb (imperial); 0xFFFF means
  "measurement unsuccessful" (decoded as None, never a reading).
- time stamp: Date Time; user id: uint8 (255: unknown user).
- BMI uint16 (0.1 kg/m2) and height uint16 (0.001 m or 0.1 in), sent together.

The reading is ``body_weight`` in kg (pounds converted with 1 lb = 0.45359237 kg). BMI and
height are decoded but are not readings: DESIGN.md defines no canonical metric for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from device_drivers.gatt import date_time
from device_drivers.gatt._codec import Reader, Writer
from device_drivers.gatt._mass import (
    HEIGHT_STEPS,
    MASS_STEPS,
    TENTHS,
    UnitSystem,
    from_raw,
    mass_kg,
    to_raw,
)
from device_drivers.gatt.base import Measurement, reading
from device_drivers.gatt.date_time import DateTime
from device_drivers.gatt.errors import EncodeError

__all__ = ["CHARACTERISTIC", "UnitSystem", "WeightMeasurement", "decode", "encode", "measurements"]

CHARACTERISTIC = 0x2A9D

_FLAG_IMPERIAL = 0x01
_FLAG_TIMESTAMP = 0x02
_FLAG_USER = 0x04
_FLAG_BMI_HEIGHT = 0x08

UNSUCCESSFUL = 0xFFFF


@dataclass(frozen=True, slots=True)
class WeightMeasurement:
    """``weight`` in kg or lb per ``unit`` (None: measurement unsuccessful); ``height`` in m
    or in; ``bmi`` in kg/m2 (``bmi`` and ``height`` are both set or both None)."""

    weight: float | None
    unit: UnitSystem = UnitSystem.SI
    timestamp: DateTime | None = None
    user_id: int | None = None
    bmi: float | None = None
    height: float | None = None


def decode(data: bytes) -> WeightMeasurement:
    reader = Reader(data, CHARACTERISTIC)
    flags = reader.u8()
    unit = UnitSystem.IMPERIAL if flags & _FLAG_IMPERIAL else UnitSystem.SI
    raw = reader.u16()
    weight = None if raw == UNSUCCESSFUL else from_raw(raw, MASS_STEPS[unit])
    stamp = date_time.read(reader) if flags & _FLAG_TIMESTAMP else None
    user = reader.u8() if flags & _FLAG_USER else None
    bmi = height = None
    if flags & _FLAG_BMI_HEIGHT:
        bmi = from_raw(reader.u16(), TENTHS)
        height = from_raw(reader.u16(), HEIGHT_STEPS[unit])
    return WeightMeasurement(weight, unit, stamp, user, bmi, height)


def encode(m: WeightMeasurement) -> bytes:
    if (m.bmi is None) != (m.height is None):
        raise EncodeError("BMI and height are sent together: set both or neither")
    flags = _FLAG_IMPERIAL if m.unit is UnitSystem.IMPERIAL else 0
    for present, bit in (
        (m.timestamp, _FLAG_TIMESTAMP),
        (m.user_id, _FLAG_USER),
        (m.bmi, _FLAG_BMI_HEIGHT),
    ):
        if present is not None:
            flags |= bit
    writer = Writer()
    writer.u8(flags)
    if m.weight is None:
        writer.u16(UNSUCCESSFUL)
    else:
        raw = to_raw(m.weight, MASS_STEPS[m.unit], "weight")
        if raw == UNSUCCESSFUL:
            raise EncodeError("0xFFFF is reserved for 'measurement unsuccessful'")
        writer.u16(raw)
    if m.timestamp is not None:
        date_time.write(writer, m.timestamp)
    if m.user_id is not None:
        writer.u8(m.user_id)
    if m.bmi is not None and m.height is not None:
        writer.u16(to_raw(m.bmi, TENTHS, "BMI"))
        writer.u16(to_raw(m.height, HEIGHT_STEPS[m.unit], "height"))
    return writer.getvalue()


def measurements(m: WeightMeasurement) -> list[Measurement]:
    if m.weight is None:
        return []
    time = m.timestamp.to_datetime() if m.timestamp is not None else None
    return reading("body_weight", mass_kg(m.weight, m.unit), time=time, user=m.user_id)
