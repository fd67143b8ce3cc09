"""Health Thermometer (service 0x1809): Temperature Measurement (0x2A1C) and Intermediate
Temperature (0x2A1E), which share one layout (Health Thermometer Service 1.0):

- flags uint8: bit 0 unit (0 Celsius, 1 Fahrenheit); bit 1 Time Stamp present; bit 2
  Temperature Type present; bits 3-7 reserved (ignored).
- temperature: FLOAT (IEEE 11073 32-bit).
- time stamp: Date Time (7 bytes), if bit 1.
- temperature type: uint8 (:class:`TemperatureType`), if bit 2.

Readings are ``body_temperature`` in Cel; Fahrenheit is converted, ``(F - 32) * 5 / 9``.
The temperature type becomes a ``site_<name>`` flag; intermediate values carry the flag
``intermediate`` (a reading taken while the thermometer is still measuring).
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
    "IntermediateTemperature",
    "TemperatureMeasurement",
    "TemperatureType",
    "TemperatureUnit",
    "decode",
    "decode_intermediate",
    "encode",
    "encode_intermediate",
    "intermediate_measurements",
    "measurements",
]

MEASUREMENT_CHARACTERISTIC = 0x2A1C
INTERMEDIATE_CHARACTERISTIC = 0x2A1E

_FLAG_FAHRENHEIT = 0x01
_FLAG_TIMESTAMP = 0x02
_FLAG_TYPE = 0x04


class TemperatureUnit(enum.Enum):
    CELSIUS = "Cel"
    FAHRENHEIT = "[degF]"


class TemperatureType(enum.IntEnum):
    """Temperature Type (0x2A1D) values; 0 and 10..255 are reserved."""

    ARMPIT = 1
    BODY = 2
    EAR = 3
    FINGER = 4
    GASTROINTESTINAL_TRACT = 5
    MOUTH = 6
    RECTUM = 7
    TOE = 8
    TYMPANUM = 9


@dataclass(frozen=True, slots=True)
class TemperatureMeasurement:
    """``temperature`` in ``unit``; ``temperature_type`` a :class:`TemperatureType` or the
    reserved raw value the device sent."""

    temperature: Numeric
    unit: TemperatureUnit = TemperatureUnit.CELSIUS
    timestamp: DateTime | None = None
    temperature_type: int | None = None


@dataclass(frozen=True, slots=True)
class IntermediateTemperature:
    """Same fields as :class:`TemperatureMeasurement`, for a measurement in progress."""

    temperature: Numeric
    unit: TemperatureUnit = TemperatureUnit.CELSIUS
    timestamp: DateTime | None = None
    temperature_type: int | None = None


def _type(raw: int) -> int:
    try:
        return TemperatureType(raw)
    except ValueError:
        return raw


def _decode_fields(
    data: bytes, char_id: int
) -> tuple[Numeric, TemperatureUnit, DateTime | None, int | None]:
    reader = Reader(data, char_id)
    flags = reader.u8()
    value = reader.float32()
    unit = TemperatureUnit.FAHRENHEIT if flags & _FLAG_FAHRENHEIT else TemperatureUnit.CELSIUS
    stamp = date_time.read(reader) if flags & _FLAG_TIMESTAMP else None
    kind = _type(reader.u8()) if flags & _FLAG_TYPE else None
    return value, unit, stamp, kind


def _encode_fields(m: TemperatureMeasurement | IntermediateTemperature) -> bytes:
    flags = _FLAG_FAHRENHEIT if m.unit is TemperatureUnit.FAHRENHEIT else 0
    if m.timestamp is not None:
        flags |= _FLAG_TIMESTAMP
    if m.temperature_type is not None:
        flags |= _FLAG_TYPE
    writer = Writer()
    writer.u8(flags)
    writer.float32(m.temperature)
    if m.timestamp is not None:
        date_time.write(writer, m.timestamp)
    if m.temperature_type is not None:
        writer.u8(m.temperature_type)
    return writer.getvalue()


def _celsius(value: Numeric, unit: TemperatureUnit) -> Numeric:
    if isinstance(value, SpecialValue) or unit is TemperatureUnit.CELSIUS:
        return value
    return clean((value - 32.0) * 5.0 / 9.0)


def _readings(
    m: TemperatureMeasurement | IntermediateTemperature, extra: tuple[str, ...]
) -> list[Measurement]:
    flags = extra
    if m.temperature_type is not None:
        kind = _type(m.temperature_type)
        name = kind.name.lower() if isinstance(kind, TemperatureType) else f"reserved_{kind}"
        flags = (*flags, f"site_{name}")
    time = m.timestamp.to_datetime() if m.timestamp is not None else None
    return reading("body_temperature", _celsius(m.temperature, m.unit), time=time, flags=flags)


def decode(data: bytes) -> TemperatureMeasurement:
    return TemperatureMeasurement(*_decode_fields(data, MEASUREMENT_CHARACTERISTIC))


def encode(m: TemperatureMeasurement) -> bytes:
    return _encode_fields(m)


def measurements(m: TemperatureMeasurement) -> list[Measurement]:
    return _readings(m, ())


def decode_intermediate(data: bytes) -> IntermediateTemperature:
    return IntermediateTemperature(*_decode_fields(data, INTERMEDIATE_CHARACTERISTIC))


def encode_intermediate(m: IntermediateTemperature) -> bytes:
    return _encode_fields(m)


def intermediate_measurements(m: IntermediateTemperature) -> list[Measurement]:
    return _readings(m, ("intermediate",))
