"""Body Composition Measurement (0x2A9C), Body Composition service 0x181B (Body
Composition Service 1.0).

- flags uint16: bit 0 unit system (0 SI, 1 imperial); then presence bits for Time Stamp
  (1), User ID (2), Basal Metabolism (3), Muscle Percentage (4), Muscle Mass (5), Fat Free
  Mass (6), Soft Lean Mass (7), Body Water Mass (8), Impedance (9), Weight (10), Height
  (11); bit 12 "multiple packet measurement"; bits 13-15 reserved (ignored).
- body fat percentage uint16, 0.1 % (mandatory; 0xFFFF: measurement unsuccessful, decoded
  as None).
- then, as flagged and in this order: Date Time; user id uint8; basal metabolism uint16 kJ;
  muscle percentage uint16 0.1 %; muscle, fat free, soft lean and body water masses, weight
  uint16 each at 0.005 kg or 0.01 lb; impedance uint16 0.1 ohm; height uint16 0.001 m or
  0.1 in. (Impedance sits between body water mass and weight on the wire.)

Readings: ``body_fat`` (%) and, when the weight field is present, ``body_weight`` (kg).
A measurement split over several packets carries the flag ``multiple_packet``.
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

__all__ = [
    "CHARACTERISTIC",
    "BodyCompositionMeasurement",
    "UnitSystem",
    "decode",
    "encode",
    "measurements",
]

CHARACTERISTIC = 0x2A9C

_FLAG_IMPERIAL = 1 << 0
_FLAG_TIMESTAMP = 1 << 1
_FLAG_USER = 1 << 2
_FLAG_BASAL = 1 << 3
_FLAG_MUSCLE_PERCENT = 1 << 4
_FLAG_MUSCLE_MASS = 1 << 5
_FLAG_FAT_FREE = 1 << 6
_FLAG_SOFT_LEAN = 1 << 7
_FLAG_WATER = 1 << 8
_FLAG_IMPEDANCE = 1 << 9
_FLAG_WEIGHT = 1 << 10
_FLAG_HEIGHT = 1 << 11
_FLAG_MULTIPLE_PACKET = 1 << 12

UNSUCCESSFUL = 0xFFFF

_MASS_FIELDS = (
    ("muscle_mass", _FLAG_MUSCLE_MASS),
    ("fat_free_mass", _FLAG_FAT_FREE),
    ("soft_lean_mass", _FLAG_SOFT_LEAN),
    ("body_water_mass", _FLAG_WATER),
)


@dataclass(frozen=True, slots=True)
class BodyCompositionMeasurement:
    """Masses and ``weight`` in kg or lb and ``height`` in m or in, per ``unit``."""

    body_fat_percent: float | None
    unit: UnitSystem = UnitSystem.SI
    timestamp: DateTime | None = None
    user_id: int | None = None
    basal_metabolism_kj: int | None = None
    muscle_percent: float | None = None
    muscle_mass: float | None = None
    fat_free_mass: float | None = None
    soft_lean_mass: float | None = None
    body_water_mass: float | None = None
    impedance_ohm: float | None = None
    weight: float | None = None
    height: float | None = None
    multiple_packet: bool = False


def decode(data: bytes) -> BodyCompositionMeasurement:
    reader = Reader(data, CHARACTERISTIC)
    flags = reader.u16()
    unit = UnitSystem.IMPERIAL if flags & _FLAG_IMPERIAL else UnitSystem.SI
    mass_steps = MASS_STEPS[unit]
    raw_fat = reader.u16()

    def optional(bit: int, steps: int) -> float | None:
        return from_raw(reader.u16(), steps) if flags & bit else None

    stamp = date_time.read(reader) if flags & _FLAG_TIMESTAMP else None
    user = reader.u8() if flags & _FLAG_USER else None
    basal = reader.u16() if flags & _FLAG_BASAL else None
    muscle_percent = optional(_FLAG_MUSCLE_PERCENT, TENTHS)
    masses = [optional(bit, mass_steps) for _, bit in _MASS_FIELDS]
    impedance = optional(_FLAG_IMPEDANCE, TENTHS)
    weight = optional(_FLAG_WEIGHT, mass_steps)
    height = optional(_FLAG_HEIGHT, HEIGHT_STEPS[unit])
    return BodyCompositionMeasurement(
        body_fat_percent=None if raw_fat == UNSUCCESSFUL else from_raw(raw_fat, TENTHS),
        unit=unit,
        timestamp=stamp,
        user_id=user,
        basal_metabolism_kj=basal,
        muscle_percent=muscle_percent,
        muscle_mass=masses[0],
        fat_free_mass=masses[1],
        soft_lean_mass=masses[2],
        body_water_mass=masses[3],
        impedance_ohm=impedance,
        weight=weight,
        height=height,
        multiple_packet=bool(flags & _FLAG_MULTIPLE_PACKET),
    )


def encode(m: BodyCompositionMeasurement) -> bytes:
    mass_steps = MASS_STEPS[m.unit]
    masses = (m.muscle_mass, m.fat_free_mass, m.soft_lean_mass, m.body_water_mass)
    flags = _FLAG_IMPERIAL if m.unit is UnitSystem.IMPERIAL else 0
    if m.multiple_packet:
        flags |= _FLAG_MULTIPLE_PACKET
    optional_fields = (
        (m.timestamp, _FLAG_TIMESTAMP),
        (m.user_id, _FLAG_USER),
        (m.basal_metabolism_kj, _FLAG_BASAL),
        (m.muscle_percent, _FLAG_MUSCLE_PERCENT),
        *((mass, bit) for mass, (_, bit) in zip(masses, _MASS_FIELDS, strict=True)),
        (m.impedance_ohm, _FLAG_IMPEDANCE),
        (m.weight, _FLAG_WEIGHT),
        (m.height, _FLAG_HEIGHT),
    )
    for present, bit in optional_fields:
        if present is not None:
            flags |= bit
    writer = Writer()
    writer.u16(flags)
    if m.body_fat_percent is None:
        writer.u16(UNSUCCESSFUL)
    else:
        raw_fat = to_raw(m.body_fat_percent, TENTHS, "body fat percentage")
        if raw_fat == UNSUCCESSFUL:
            raise EncodeError("0xFFFF is reserved for 'measurement unsuccessful'")
        writer.u16(raw_fat)
    if m.timestamp is not None:
        date_time.write(writer, m.timestamp)
    if m.user_id is not None:
        writer.u8(m.user_id)
    if m.basal_metabolism_kj is not None:
        writer.u16(m.basal_metabolism_kj)
    if m.muscle_percent is not None:
        writer.u16(to_raw(m.muscle_percent, TENTHS, "muscle percentage"))
    for mass, (name, _) in zip(masses, _MASS_FIELDS, strict=True):
        if mass is not None:
            writer.u16(to_raw(mass, mass_steps, name))
    if m.impedance_ohm is not None:
        writer.u16(to_raw(m.impedance_ohm, TENTHS, "impedance"))
    if m.weight is not None:
        writer.u16(to_raw(m.weight, mass_steps, "weight"))
    if m.height is not None:
        writer.u16(to_raw(m.height, HEIGHT_STEPS[m.unit], "height"))
    return writer.getvalue()


def merge(
    first: BodyCompositionMeasurement, second: BodyCompositionMeasurement
) -> BodyCompositionMeasurement | None:
    """One measurement from the two packets of a split one (Multiple Packet Measurement):
    each field from the packet that carries it, the first's where both do. None when the two
    cannot be one measurement (another unit system, another user or time stamp)."""
    if first.unit is not second.unit:
        return None
    for a, b in (
        (first.user_id, second.user_id),
        (first.timestamp, second.timestamp),
    ):
        if a is not None and b is not None and a != b:
            return None
    fields = {
        name: getattr(first, name) if getattr(first, name) is not None else getattr(second, name)
        for name in (
            "body_fat_percent",
            "timestamp",
            "user_id",
            "basal_metabolism_kj",
            "muscle_percent",
            "muscle_mass",
            "fat_free_mass",
            "soft_lean_mass",
            "body_water_mass",
            "impedance_ohm",
            "weight",
            "height",
        )
    }
    return BodyCompositionMeasurement(unit=first.unit, multiple_packet=False, **fields)


def measurements(m: BodyCompositionMeasurement) -> list[Measurement]:
    time = m.timestamp.to_datetime() if m.timestamp is not None else None
    flags = ("multiple_packet",) if m.multiple_packet else ()
    user = m.user_id
    out = reading("body_fat", m.body_fat_percent, time=time, flags=flags, user=user)
    if m.weight is not None:
        out += reading("body_weight", mass_kg(m.weight, m.unit), time=time, flags=flags, user=user)
    return out
