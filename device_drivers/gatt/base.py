"""The canonical reading every profile decoder reduces to.

Metric names and UCUM units follow DESIGN.md, "Metrics and units": drivers convert, so a
:class:`Measurement` is always in the canonical unit of its metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from device_drivers.gatt.errors import GattError
from device_drivers.gatt.ieee11073 import Numeric, is_finite_value

__all__ = ["CANONICAL_UNITS", "Measurement", "clean", "reading"]

CANONICAL_UNITS: Final[dict[str, str]] = {
    "heart_rate": "/min",
    "rr_interval": "ms",
    "body_temperature": "Cel",
    "systolic_bp": "mm[Hg]",
    "diastolic_bp": "mm[Hg]",
    "mean_bp": "mm[Hg]",
    "pulse_rate": "/min",
    "spo2": "%",
    "glucose": "mg/dL",
    "body_weight": "kg",
    "body_fat": "%",
    "battery_level": "%",
    # Glucose Measurement Context values.
    "carbohydrate_intake": "g",
    "exercise_duration": "s",
    "exercise_intensity": "%",
    "medication_mass": "mg",
    "medication_volume": "mL",
    "hba1c": "%",
}


@dataclass(frozen=True, slots=True)
class Measurement:
    """One canonical reading.

    ``time`` is the time the device reported with the value (timezone-aware UTC), or None
    when the profile carries no time or the device sent an unknown/invalid one. GATT date
    fields have no time zone; the hub sets wearables' clocks in UTC (Current Time), so a
    device time is read as UTC. ``flags`` are short snake_case annotations from the device
    (``no_sensor_contact``, ``cuff_loose``, ``measurement_ongoing``...: ingest.flags is
    their registry). ``user`` is the device's user index on a wearable shared by several
    people (Blood Pressure, Weight Scale, Body Composition; 255 is "unknown user"), None
    when the profile carries none.
    """

    metric: str
    value: float
    unit: str
    time: datetime | None = None
    flags: tuple[str, ...] = ()
    user: int | None = None

    def __post_init__(self) -> None:
        if CANONICAL_UNITS.get(self.metric) != self.unit:
            raise GattError(f"{self.unit!r} is not the canonical unit of {self.metric!r}")
        if not math.isfinite(self.value):
            raise GattError(f"{self.metric} value {self.value!r} is not finite")
        if self.time is not None and self.time.utcoffset() is None:
            raise GattError("a Measurement time must be timezone-aware")


def reading(
    metric: str,
    value: Numeric | None,
    *,
    time: datetime | None = None,
    flags: tuple[str, ...] = (),
    user: int | None = None,
) -> list[Measurement]:
    """Zero or one Measurement: absent fields and special values give none."""
    if not is_finite_value(value):
        return []
    return [Measurement(metric, float(value), CANONICAL_UNITS[metric], time, flags, user)]


def clean(value: float) -> float:
    """Round a unit-converted value to 6 decimals, dropping binary noise (37.0, not 36.99...)."""
    return round(value, 6)
