"""Date Time (0x2A08): the 7-byte timestamp embedded in most health measurements.

Layout (Bluetooth GATT Specification Supplement, "Date Time"): year uint16 (1582..9999),
month, day, hours, minutes, seconds (uint8 each). Year 0, month 0 and day 0 mean "not
known". The fields are kept as sent, so any 7 bytes decode (and encode back); only
:meth:`DateTime.to_datetime` judges them, giving None for unknown or impossible dates.
The structure carries no time zone: it is read as UTC (see :class:`base.Measurement`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime

from device_drivers.gatt._codec import Reader, Writer
from device_drivers.gatt.base import Measurement
from device_drivers.gatt.errors import EncodeError

__all__ = ["CHARACTERISTIC", "DateTime", "decode", "encode", "measurements"]

CHARACTERISTIC = 0x2A08
LAYOUT = struct.Struct("<HBBBBB")
"""year, month, day, hours, minutes, seconds."""

_FIRST_YEAR = 1582
_LAST_YEAR = 9999


@dataclass(frozen=True, slots=True)
class DateTime:
    """The raw Date Time fields (0 in year, month or day: not known)."""

    year: int
    month: int
    day: int
    hours: int
    minutes: int
    seconds: int

    @classmethod
    def from_datetime(cls, moment: datetime) -> DateTime:
        """Fields of an aware datetime in UTC (sub-second part dropped)."""
        if moment.utcoffset() is None:
            raise EncodeError("a device time must come from a timezone-aware datetime")
        utc = moment.astimezone(UTC)
        return cls(utc.year, utc.month, utc.day, utc.hour, utc.minute, utc.second)

    @property
    def is_known(self) -> bool:
        return self.year != 0 and self.month != 0 and self.day != 0

    def to_datetime(self) -> datetime | None:
        """The moment as an aware UTC datetime, or None if unknown or not a real date."""
        if not self.is_known or not _FIRST_YEAR <= self.year <= _LAST_YEAR:
            return None
        try:
            return datetime(
                self.year, self.month, self.day, self.hours, self.minutes, self.seconds, tzinfo=UTC
            )
        except ValueError:
            return None


def read(reader: Reader) -> DateTime:
    return DateTime(*reader.unpack(LAYOUT))


def write(writer: Writer, value: DateTime) -> None:
    writer.pack(
        LAYOUT, value.year, value.month, value.day, value.hours, value.minutes, value.seconds
    )


def decode(data: bytes) -> DateTime:
    return read(Reader(data, CHARACTERISTIC))


def encode(value: DateTime) -> bytes:
    writer = Writer()
    write(writer, value)
    return writer.getvalue()


def measurements(value: DateTime) -> list[Measurement]:
    """A bare clock value is no reading."""
    del value
    return []
