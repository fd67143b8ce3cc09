"""Blood Pressure (service 0x1810): Blood Pressure Measurement (0x2A35) and Intermediate
Cuff Pressure (0x2A36), which share one layout (Blood Pressure Service 1.0):

- flags uint8: bit 0 unit (0 mmHg, 1 kPa); bit 1 Time Stamp; bit 2 Pulse Rate; bit 3 User
  ID; bit 4 Measurement Status; bits 5-7 reserved (ignored).
- systolic, diastolic, mean arterial pressure: SFLOAT each. In Intermediate Cuff Pressure
  the first is the current cuff pressure and the other two are unused (sent as NaN).
- time stamp: Date Time (7 bytes); pulse rate: SFLOAT (/min); user id: uint8 (255 is
  "unknown user"); measurement status: uint16 (:class:`MeasurementStatus`).

Readings: ``systolic_bp``, ``diastolic_bp``, ``mean_bp`` in mm[Hg] (kPa converted with
1 mmHg = 133.322387415 Pa) and ``pulse_rate`` in /min, with status bits as flags. The cuff
pressure while inflating is no blood pressure: an Intermediate Cuff Pressure gives only its
pulse rate, if any, flagged ``intermediate``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from device_drivers.gatt import date_time
from device_drivers.gatt._codec import Reader, Writer
from device_drivers.gatt.base import Measurement, clean, reading
from device_drivers.gatt.date_time import DateTime
from device_drivers.gatt.ieee11073 import Numeric, SpecialValue

__all__ = [
    "INTERMEDIATE_CHARACTERISTIC",
    "MEASUREMENT_CHARACTERISTIC",
    "BloodPressureMeasurement",
    "IntermediateCuffPressure",
    "MeasurementStatus",
    "PressureUnit",
    "decode",
    "decode_intermediate",
    "encode",
    "encode_intermediate",
    "intermediate_measurements",
    "measurements",
    "status_flags",
]

MEASUREMENT_CHARACTERISTIC = 0x2A35
INTERMEDIATE_CHARACTERISTIC = 0x2A36

_FLAG_KPA = 0x01
_FLAG_TIMESTAMP = 0x02
_FLAG_PULSE = 0x04
_FLAG_USER = 0x08
_FLAG_STATUS = 0x10

PASCAL_PER_MMHG = 133.322387415
"""Conventional millimetre of mercury (exact by definition)."""


class PressureUnit(enum.Enum):
    MMHG = "mm[Hg]"
    KPA = "kPa"


class MeasurementStatus(enum.IntFlag):
    """Blood Pressure Measurement Status bits (bits 3-4 are a 2-bit pulse rate range)."""

    BODY_MOVEMENT = 0x0001
    CUFF_LOOSE = 0x0002
    IRREGULAR_PULSE = 0x0004
    PULSE_RATE_ABOVE_RANGE = 0x0008
    PULSE_RATE_BELOW_RANGE = 0x0010
    IMPROPER_POSITION = 0x0020


_PULSE_RANGE_MASK = 0x0018
_PULSE_RANGE_RESERVED = 0x0018

_STATUS_NAMES = (
    (MeasurementStatus.BODY_MOVEMENT, "body_movement"),
    (MeasurementStatus.CUFF_LOOSE, "cuff_loose"),
    (MeasurementStatus.IRREGULAR_PULSE, "irregular_pulse"),
    (MeasurementStatus.IMPROPER_POSITION, "improper_position"),
)


@dataclass(frozen=True, slots=True)
class BloodPressureMeasurement:
    systolic: Numeric
    diastolic: Numeric
    mean_arterial_pressure: Numeric
    unit: PressureUnit = PressureUnit.MMHG
    timestamp: DateTime | None = None
    pulse_rate: Numeric | None = None
    user_id: int | None = None
    status: int | None = None


@dataclass(frozen=True, slots=True)
class IntermediateCuffPressure:
    cuff_pressure: Numeric
    unit: PressureUnit = PressureUnit.MMHG
    timestamp: DateTime | None = None
    pulse_rate: Numeric | None = None
    user_id: int | None = None
    status: int | None = None


@dataclass(frozen=True, slots=True)
class _Record:
    pressures: tuple[Numeric, Numeric, Numeric]
    unit: PressureUnit
    timestamp: DateTime | None
    pulse_rate: Numeric | None
    user_id: int | None
    status: int | None


def _decode(data: bytes, char_id: int) -> _Record:
    reader = Reader(data, char_id)
    flags = reader.u8()
    pressures = (reader.sfloat(), reader.sfloat(), reader.sfloat())
    return _Record(
        pressures=pressures,
        unit=PressureUnit.KPA if flags & _FLAG_KPA else PressureUnit.MMHG,
        timestamp=date_time.read(reader) if flags & _FLAG_TIMESTAMP else None,
        pulse_rate=reader.sfloat() if flags & _FLAG_PULSE else None,
        user_id=reader.u8() if flags & _FLAG_USER else None,
        status=reader.u16() if flags & _FLAG_STATUS else None,
    )


def _encode(record: _Record) -> bytes:
    flags = _FLAG_KPA if record.unit is PressureUnit.KPA else 0
    for present, bit in (
        (record.timestamp, _FLAG_TIMESTAMP),
        (record.pulse_rate, _FLAG_PULSE),
        (record.user_id, _FLAG_USER),
        (record.status, _FLAG_STATUS),
    ):
        if present is not None:
            flags |= bit
    writer = Writer()
    writer.u8(flags)
    for pressure in record.pressures:
        writer.sfloat(pressure)
    if record.timestamp is not None:
        date_time.write(writer, record.timestamp)
    if record.pulse_rate is not None:
        writer.sfloat(record.pulse_rate)
    if record.user_id is not None:
        writer.u8(record.user_id)
    if record.status is not None:
        writer.u16(record.status)
    return writer.getvalue()


def status_flags(status: int | None) -> tuple[str, ...]:
    """Reading flags for a Measurement Status value (None: status not reported)."""
    if status is None:
        return ()
    flags = [name for bit, name in _STATUS_NAMES if status & bit]
    pulse_range = status & _PULSE_RANGE_MASK
    if pulse_range == _PULSE_RANGE_RESERVED:
        flags.append("pulse_rate_range_reserved")
    elif pulse_range == MeasurementStatus.PULSE_RATE_ABOVE_RANGE:
        flags.append("pulse_rate_above_range")
    elif pulse_range == MeasurementStatus.PULSE_RATE_BELOW_RANGE:
        flags.append("pulse_rate_below_range")
    return tuple(sorted(flags))


def _mmhg(value: Numeric, unit: PressureUnit) -> Numeric:
    if isinstance(value, SpecialValue) or unit is PressureUnit.MMHG:
        return value
    return clean(value * 1000.0 / PASCAL_PER_MMHG)


def decode(data: bytes) -> BloodPressureMeasurement:
    r = _decode(data, MEASUREMENT_CHARACTERISTIC)
    return BloodPressureMeasurement(
        *r.pressures, r.unit, r.timestamp, r.pulse_rate, r.user_id, r.status
    )


def encode(m: BloodPressureMeasurement) -> bytes:
    pressures = (m.systolic, m.diastolic, m.mean_arterial_pressure)
    return _encode(_Record(pressures, m.unit, m.timestamp, m.pulse_rate, m.user_id, m.status))


def measurements(m: BloodPressureMeasurement) -> list[Measurement]:
    time = m.timestamp.to_datetime() if m.timestamp is not None else None
    flags = status_flags(m.status)
    out: list[Measurement] = []
    for metric, value in (
        ("systolic_bp", m.systolic),
        ("diastolic_bp", m.diastolic),
        ("mean_bp", m.mean_arterial_pressure),
    ):
        out += reading(metric, _mmhg(value, m.unit), time=time, flags=flags, user=m.user_id)
    out += reading("pulse_rate", m.pulse_rate, time=time, flags=flags, user=m.user_id)
    return out


def decode_intermediate(data: bytes) -> IntermediateCuffPressure:
    r = _decode(data, INTERMEDIATE_CHARACTERISTIC)
    return IntermediateCuffPressure(
        r.pressures[0], r.unit, r.timestamp, r.pulse_rate, r.user_id, r.status
    )


def encode_intermediate(m: IntermediateCuffPressure) -> bytes:
    pressures = (m.cuff_pressure, SpecialValue.NAN, SpecialValue.NAN)
    return _encode(_Record(pressures, m.unit, m.timestamp, m.pulse_rate, m.user_id, m.status))


def intermediate_measurements(m: IntermediateCuffPressure) -> list[Measurement]:
    time = m.timestamp.to_datetime() if m.timestamp is not None else None
    flags = tuple(sorted((*status_flags(m.status), "intermediate")))
    return reading("pulse_rate", m.pulse_rate, time=time, flags=flags)
