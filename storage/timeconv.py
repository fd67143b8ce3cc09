"""Milliseconds since the epoch <-> timezone-aware datetimes, at the storage boundary only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def from_ms(t_ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=t_ms)


def to_ms(t: datetime) -> int:
    return (t - EPOCH) // timedelta(milliseconds=1)
