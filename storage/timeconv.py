"""Milliseconds since the epoch <-> timezone-aware datetimes, at the storage boundary only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The milliseconds ``from_ms`` converts: what both ``datetime`` (years 1-9999) and
# PostgreSQL's timestamptz (4713 BC to 294276 AD) hold.
MIN_MS = (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)
MAX_MS = (datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC) - EPOCH) // timedelta(
    milliseconds=1
)

# The years a time given by a person (on the command line, through the API) may name: far
# from the calendar's ends, so that moving it to UTC or to milliseconds never overflows.
FIRST_YEAR = 1970
LAST_YEAR = 2099


def year_in_range(t: datetime) -> bool:
    return FIRST_YEAR <= t.year <= LAST_YEAR


def from_ms(t_ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=t_ms)


def from_ms_or_none(t_ms: int | None) -> datetime | None:
    """``from_ms`` where the time converts; None for None and for anything outside
    ``MIN_MS..MAX_MS`` (what an envelope claimed, kept as milliseconds beside it)."""
    if t_ms is None or not MIN_MS <= t_ms <= MAX_MS:
        return None
    return from_ms(t_ms)


def to_ms(t: datetime) -> int:
    return (t - EPOCH) // timedelta(milliseconds=1)
