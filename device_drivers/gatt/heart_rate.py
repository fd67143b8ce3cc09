"""Heart Rate Measurement (0x2A37), Heart Rate Service 0x180D.

Layout (Bluetooth SIG Heart Rate Service 1.0 / GATT Specification Supplement):

- flags uint8: bit 0 value format (0 uint8, 1 uint16); bits 1-2 sensor contact (bit 2 set:
  supported, then bit 1 is "contact detected"); bit 3 Energy Expended present; bit 4 RR
  intervals present; bits 5-7 reserved (ignored).
- heart rate: uint8 or uint16, beats per minute.
- energy expended: uint16, kilojoules (if bit 3).
- RR intervals: uint16 each, units of 1/1024 s, filling the rest of the payload (if bit 4).

RR intervals are returned in milliseconds (``raw * 1000 / 1024``, exact in binary). The
measurement carries no timestamp.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from device_drivers.gatt._codec import Reader, Writer
from device_drivers.gatt.base import Measurement, reading

__all__ = ["CHARACTERISTIC", "HeartRateMeasurement", "decode", "encode", "measurements"]

CHARACTERISTIC = 0x2A37

_RR = struct.Struct("<H")

_FLAG_UINT16 = 0x01
_FLAG_CONTACT_DETECTED = 0x02
_FLAG_CONTACT_SUPPORTED = 0x04
_FLAG_ENERGY = 0x08
_FLAG_RR = 0x10

_RR_UNITS_PER_SECOND = 1024
_UINT8_MAX = 0xFF


@dataclass(frozen=True, slots=True)
class HeartRateMeasurement:
    """``sensor_contact`` None: the sensor does not report contact."""

    bpm: int
    sensor_contact: bool | None = None
    energy_expended_kj: int | None = None
    rr_intervals_ms: tuple[float, ...] = ()


def _rr_ms(raw: int) -> float:
    return raw * 1000 / _RR_UNITS_PER_SECOND


def _rr_raw(ms: float) -> int:
    return round(ms * _RR_UNITS_PER_SECOND / 1000)


def decode(data: bytes) -> HeartRateMeasurement:
    reader = Reader(data, CHARACTERISTIC)
    flags = reader.u8()
    bpm = reader.u16() if flags & _FLAG_UINT16 else reader.u8()
    contact: bool | None = None
    if flags & _FLAG_CONTACT_SUPPORTED:
        contact = bool(flags & _FLAG_CONTACT_DETECTED)
    energy = reader.u16() if flags & _FLAG_ENERGY else None
    rr: list[float] = []
    if flags & _FLAG_RR:
        while reader.remaining:
            (raw,) = reader.unpack(_RR)
            rr.append(_rr_ms(raw))
    return HeartRateMeasurement(bpm, contact, energy, tuple(rr))


def encode(m: HeartRateMeasurement, *, uint16: bool = False) -> bytes:
    """Encode; ``uint16`` forces the 16-bit value format (used anyway above 255 bpm).

    RR intervals are rounded to the nearest 1/1024 s; the RR flag is set when there is at
    least one interval.
    """
    wide = uint16 or m.bpm > _UINT8_MAX
    flags = _FLAG_UINT16 if wide else 0
    if m.sensor_contact is not None:
        flags |= _FLAG_CONTACT_SUPPORTED
        if m.sensor_contact:
            flags |= _FLAG_CONTACT_DETECTED
    if m.energy_expended_kj is not None:
        flags |= _FLAG_ENERGY
    if m.rr_intervals_ms:
        flags |= _FLAG_RR
    writer = Writer()
    writer.u8(flags)
    if wide:
        writer.u16(m.bpm)
    else:
        writer.u8(m.bpm)
    if m.energy_expended_kj is not None:
        writer.u16(m.energy_expended_kj)
    for interval in m.rr_intervals_ms:
        writer.u16(_rr_raw(interval))
    return writer.getvalue()


def measurements(m: HeartRateMeasurement) -> list[Measurement]:
    """heart_rate (/min) and one rr_interval (ms) per interval; no device time."""
    flags = ("no_sensor_contact",) if m.sensor_contact is False else ()
    out = reading("heart_rate", float(m.bpm), flags=flags)
    for interval in m.rr_intervals_ms:
        out += reading("rr_interval", interval, flags=flags)
    return out
