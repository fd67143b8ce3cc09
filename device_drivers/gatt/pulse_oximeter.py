"""Pulse Oximeter (service 0x1822): PLX Spot-check (0x2A5E) and PLX Continuous (0x2A5F)
Measurements (Pulse Oximeter Service 1.0).

Spot-check: flags uint8 (bit 0 Timestamp, bit 1 Measurement Status, bit 2 Device and
Sensor Status, bit 3 Pulse Amplitude Index present, bit 4 device clock not set); SpO2 and
pulse rate (SFLOAT each); then, as flagged, Date Time, Measurement Status (uint16), Device
and Sensor Status (uint24), Pulse Amplitude Index (SFLOAT).

Continuous: flags uint8 (bit 0 SpO2PR-Fast, bit 1 SpO2PR-Slow, bit 2 Measurement Status,
bit 3 Device and Sensor Status, bit 4 Pulse Amplitude Index present); SpO2PR-Normal (two
SFLOAT); then, as flagged, SpO2PR-Fast, SpO2PR-Slow (two SFLOAT each), the two status
fields and the Pulse Amplitude Index.

Readings: ``spo2`` (%) and ``pulse_rate`` (/min). For Continuous only the Normal pair
becomes readings (Fast and Slow are other averagings of the same signal and stay in the
decoded value). A spot-check whose device clock is not set has no time and the flag
``device_clock_not_set``. Status bits become flags.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from device_drivers.gatt import date_time
from device_drivers.gatt._codec import Reader, Writer
from device_drivers.gatt.base import Measurement, reading
from device_drivers.gatt.date_time import DateTime
from device_drivers.gatt.ieee11073 import Numeric

__all__ = [
    "CONTINUOUS_CHARACTERISTIC",
    "SPOT_CHECK_CHARACTERISTIC",
    "ContinuousMeasurement",
    "DeviceSensorStatus",
    "PlxMeasurementStatus",
    "SpO2PulseRate",
    "SpotCheckMeasurement",
    "continuous_measurements",
    "decode_continuous",
    "decode_spot_check",
    "encode_continuous",
    "encode_spot_check",
    "spot_check_measurements",
    "status_flags",
]

SPOT_CHECK_CHARACTERISTIC = 0x2A5E
CONTINUOUS_CHARACTERISTIC = 0x2A5F

_SPOT_TIMESTAMP = 0x01
_SPOT_MEASUREMENT_STATUS = 0x02
_SPOT_DEVICE_STATUS = 0x04
_SPOT_PAI = 0x08
_SPOT_CLOCK_NOT_SET = 0x10

_CONT_FAST = 0x01
_CONT_SLOW = 0x02
_CONT_MEASUREMENT_STATUS = 0x04
_CONT_DEVICE_STATUS = 0x08
_CONT_PAI = 0x10


class PlxMeasurementStatus(enum.IntFlag):
    """PLX Measurement Status (uint16); bits 0-4 reserved."""

    MEASUREMENT_ONGOING = 1 << 5
    EARLY_ESTIMATE = 1 << 6
    VALIDATED = 1 << 7
    FULLY_QUALIFIED = 1 << 8
    FROM_STORAGE = 1 << 9
    DEMONSTRATION = 1 << 10
    TESTING = 1 << 11
    CALIBRATION_ONGOING = 1 << 12
    MEASUREMENT_UNAVAILABLE = 1 << 13
    QUESTIONABLE_MEASUREMENT = 1 << 14
    INVALID_MEASUREMENT = 1 << 15


class DeviceSensorStatus(enum.IntFlag):
    """PLX Device and Sensor Status (uint24); bits 16-23 reserved."""

    EXTENDED_DISPLAY_UPDATE_ONGOING = 1 << 0
    EQUIPMENT_MALFUNCTION = 1 << 1
    SIGNAL_PROCESSING_IRREGULARITY = 1 << 2
    INADEQUATE_SIGNAL = 1 << 3
    POOR_SIGNAL = 1 << 4
    LOW_PERFUSION = 1 << 5
    ERRATIC_SIGNAL = 1 << 6
    NONPULSATILE_SIGNAL = 1 << 7
    QUESTIONABLE_PULSE = 1 << 8
    SIGNAL_ANALYSIS_ONGOING = 1 << 9
    SENSOR_INTERFERENCE = 1 << 10
    SENSOR_UNCONNECTED_TO_USER = 1 << 11
    UNKNOWN_SENSOR = 1 << 12
    SENSOR_DISPLACED = 1 << 13
    SENSOR_MALFUNCTION = 1 << 14
    SENSOR_DISCONNECTED = 1 << 15


@dataclass(frozen=True, slots=True)
class SpO2PulseRate:
    spo2: Numeric
    pulse_rate: Numeric


@dataclass(frozen=True, slots=True)
class SpotCheckMeasurement:
    spo2: Numeric
    pulse_rate: Numeric
    timestamp: DateTime | None = None
    measurement_status: int | None = None
    device_sensor_status: int | None = None
    pulse_amplitude_index: Numeric | None = None
    device_clock_not_set: bool = False


@dataclass(frozen=True, slots=True)
class ContinuousMeasurement:
    normal: SpO2PulseRate
    fast: SpO2PulseRate | None = None
    slow: SpO2PulseRate | None = None
    measurement_status: int | None = None
    device_sensor_status: int | None = None
    pulse_amplitude_index: Numeric | None = None


def _pair(reader: Reader) -> SpO2PulseRate:
    return SpO2PulseRate(reader.sfloat(), reader.sfloat())


def _write_pair(writer: Writer, pair: SpO2PulseRate) -> None:
    writer.sfloat(pair.spo2)
    writer.sfloat(pair.pulse_rate)


def status_flags(
    measurement_status: int | None, device_sensor_status: int | None
) -> tuple[str, ...]:
    """Reading flags for the two PLX status fields (None: field not reported)."""
    flags: list[str] = []
    if measurement_status is not None:
        flags += [str(bit.name).lower() for bit in PlxMeasurementStatus if measurement_status & bit]
    if device_sensor_status is not None:
        flags += [str(bit.name).lower() for bit in DeviceSensorStatus if device_sensor_status & bit]
    return tuple(flags)


def decode_spot_check(data: bytes) -> SpotCheckMeasurement:
    reader = Reader(data, SPOT_CHECK_CHARACTERISTIC)
    flags = reader.u8()
    spo2, pulse = reader.sfloat(), reader.sfloat()
    return SpotCheckMeasurement(
        spo2=spo2,
        pulse_rate=pulse,
        timestamp=date_time.read(reader) if flags & _SPOT_TIMESTAMP else None,
        measurement_status=reader.u16() if flags & _SPOT_MEASUREMENT_STATUS else None,
        device_sensor_status=reader.u24() if flags & _SPOT_DEVICE_STATUS else None,
        pulse_amplitude_index=reader.sfloat() if flags & _SPOT_PAI else None,
        device_clock_not_set=bool(flags & _SPOT_CLOCK_NOT_SET),
    )


def encode_spot_check(m: SpotCheckMeasurement) -> bytes:
    flags = _SPOT_CLOCK_NOT_SET if m.device_clock_not_set else 0
    for present, bit in (
        (m.timestamp, _SPOT_TIMESTAMP),
        (m.measurement_status, _SPOT_MEASUREMENT_STATUS),
        (m.device_sensor_status, _SPOT_DEVICE_STATUS),
        (m.pulse_amplitude_index, _SPOT_PAI),
    ):
        if present is not None:
            flags |= bit
    writer = Writer()
    writer.u8(flags)
    writer.sfloat(m.spo2)
    writer.sfloat(m.pulse_rate)
    if m.timestamp is not None:
        date_time.write(writer, m.timestamp)
    if m.measurement_status is not None:
        writer.u16(m.measurement_status)
    if m.device_sensor_status is not None:
        writer.u24(m.device_sensor_status)
    if m.pulse_amplitude_index is not None:
        writer.sfloat(m.pulse_amplitude_index)
    return writer.getvalue()


def spot_check_measurements(m: SpotCheckMeasurement) -> list[Measurement]:
    flags = status_flags(m.measurement_status, m.device_sensor_status)
    time = None
    if m.device_clock_not_set:
        flags = (*flags, "device_clock_not_set")
    elif m.timestamp is not None:
        time = m.timestamp.to_datetime()
    return reading("spo2", m.spo2, time=time, flags=flags) + reading(
        "pulse_rate", m.pulse_rate, time=time, flags=flags
    )


def decode_continuous(data: bytes) -> ContinuousMeasurement:
    reader = Reader(data, CONTINUOUS_CHARACTERISTIC)
    flags = reader.u8()
    normal = _pair(reader)
    return ContinuousMeasurement(
        normal=normal,
        fast=_pair(reader) if flags & _CONT_FAST else None,
        slow=_pair(reader) if flags & _CONT_SLOW else None,
        measurement_status=reader.u16() if flags & _CONT_MEASUREMENT_STATUS else None,
        device_sensor_status=reader.u24() if flags & _CONT_DEVICE_STATUS else None,
        pulse_amplitude_index=reader.sfloat() if flags & _CONT_PAI else None,
    )


def encode_continuous(m: ContinuousMeasurement) -> bytes:
    flags = 0
    for present, bit in (
        (m.fast, _CONT_FAST),
        (m.slow, _CONT_SLOW),
        (m.measurement_status, _CONT_MEASUREMENT_STATUS),
        (m.device_sensor_status, _CONT_DEVICE_STATUS),
        (m.pulse_amplitude_index, _CONT_PAI),
    ):
        if present is not None:
            flags |= bit
    writer = Writer()
    writer.u8(flags)
    _write_pair(writer, m.normal)
    if m.fast is not None:
        _write_pair(writer, m.fast)
    if m.slow is not None:
        _write_pair(writer, m.slow)
    if m.measurement_status is not None:
        writer.u16(m.measurement_status)
    if m.device_sensor_status is not None:
        writer.u24(m.device_sensor_status)
    if m.pulse_amplitude_index is not None:
        writer.sfloat(m.pulse_amplitude_index)
    return writer.getvalue()


def continuous_measurements(m: ContinuousMeasurement) -> list[Measurement]:
    """The SpO2PR-Normal pair; the continuous profile carries no time."""
    flags = status_flags(m.measurement_status, m.device_sensor_status)
    return reading("spo2", m.normal.spo2, flags=flags) + reading(
        "pulse_rate", m.normal.pulse_rate, flags=flags
    )
