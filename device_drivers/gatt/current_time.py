"""Current Time (0x2A2B), Current Time service 0x1805 (Current Time Service 1.1).

Read from a wearable, or written to it: the hub sets the wearable's clock. Layout (10
bytes): Date Time (7), day of week uint8 (1 Monday .. 7 Sunday, 0 unknown), fractions256
uint8 (1/256 s), adjust reason uint8 (:class:`AdjustReason` bits). The hub writes UTC, the
time zone every device time is read in (see :class:`base.Measurement`).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta

from device_drivers.gatt import date_time
from device_drivers.gatt._codec import Reader, Writer
from device_drivers.gatt.base import Measurement
from device_drivers.gatt.date_time import DateTime

__all__ = ["CHARACTERISTIC", "AdjustReason", "CurrentTime", "decode", "encode", "measurements"]

CHARACTERISTIC = 0x2A2B
_TAIL = struct.Struct("<BBB")
"""day of week, fractions256, adjust reason."""

_FRACTIONS_PER_SECOND = 256
_MICROSECONDS_PER_SECOND = 1_000_000


class AdjustReason(enum.IntFlag):
    NONE = 0
    MANUAL_TIME_UPDATE = 1 << 0
    EXTERNAL_REFERENCE_TIME_UPDATE = 1 << 1
    CHANGE_OF_TIME_ZONE = 1 << 2
    CHANGE_OF_DST = 1 << 3


@dataclass(frozen=True, slots=True)
class CurrentTime:
    date_time: DateTime
    day_of_week: int = 0
    fractions256: int = 0
    adjust_reason: int = AdjustReason.NONE

    @classmethod
    def from_datetime(
        cls, moment: datetime, *, adjust_reason: int = AdjustReason.EXTERNAL_REFERENCE_TIME_UPDATE
    ) -> CurrentTime:
        """The value the hub writes: ``moment`` (timezone-aware) in UTC."""
        fields = DateTime.from_datetime(moment)
        fractions = moment.microsecond * _FRACTIONS_PER_SECOND // _MICROSECONDS_PER_SECOND
        return cls(fields, moment.isoweekday(), fractions, adjust_reason)

    def to_datetime(self) -> datetime | None:
        """Aware UTC datetime (with the 1/256 s part), or None when the date is unknown."""
        base = self.date_time.to_datetime()
        if base is None:
            return None
        micro = self.fractions256 * _MICROSECONDS_PER_SECOND // _FRACTIONS_PER_SECOND
        return base + timedelta(microseconds=micro)


def decode(data: bytes) -> CurrentTime:
    reader = Reader(data, CHARACTERISTIC)
    stamp = date_time.read(reader)
    day, fractions, reason = reader.unpack(_TAIL)
    return CurrentTime(stamp, day, fractions, reason)


def encode(value: CurrentTime) -> bytes:
    writer = Writer()
    date_time.write(writer, value.date_time)
    writer.pack(_TAIL, value.day_of_week, value.fractions256, value.adjust_reason)
    return writer.getvalue()


def measurements(value: CurrentTime) -> list[Measurement]:
    """A clock value is no reading."""
    del value
    return []
