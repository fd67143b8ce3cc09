"""Unit systems and fixed resolutions shared by Weight Scale and Body Composition."""

from __future__ import annotations

import enum

from device_drivers.gatt.base import clean
from device_drivers.gatt.errors import EncodeError

__all__ = ["KG_PER_LB", "UnitSystem", "from_raw", "mass_kg", "to_raw"]

KG_PER_LB = 0.45359237
"""International avoirdupois pound (exact by definition)."""


class UnitSystem(enum.Enum):
    """Flag bit 0 of both profiles: SI (kg, m) or imperial (lb, in)."""

    SI = "SI"
    IMPERIAL = "imperial"


# Steps per unit: mass 0.005 kg / 0.01 lb, height 0.001 m / 0.1 in.
MASS_STEPS = {UnitSystem.SI: 200, UnitSystem.IMPERIAL: 100}
HEIGHT_STEPS = {UnitSystem.SI: 1000, UnitSystem.IMPERIAL: 10}
TENTHS = 10


def from_raw(raw: int, steps_per_unit: int) -> float:
    return raw / steps_per_unit


def to_raw(value: float, steps_per_unit: int, what: str) -> int:
    raw = round(value * steps_per_unit)
    if not 0 <= raw <= 0xFFFF:
        raise EncodeError(f"{what} {value!r} does not fit its uint16 field")
    return raw


def mass_kg(value: float, system: UnitSystem) -> float:
    return value if system is UnitSystem.SI else clean(value * KG_PER_LB)
