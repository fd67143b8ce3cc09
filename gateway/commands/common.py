"""Helpers shared by the command modules."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.settings import Settings
from storage import timeconv

Handler = Callable[[argparse.Namespace, Settings], int]
if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers = argparse._SubParsersAction

T = TypeVar("T")


def add_database_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", help="PostgreSQL URL (default: $TRIALSTREAM_DATABASE_URL)")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``, its length checked first."""

    def parse(text: str) -> int:
        if len(text) > 12 or not text.strip().lstrip("+-").isdigit():
            raise argparse.ArgumentTypeError(f"not a whole number: {text[:12]!r}")
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"from {low} to {high}, not {value}")
        return value

    return parse


def float_in(low: float, high: float, unit: str) -> Callable[[str], float]:
    """An argparse type: a number of ``unit`` from ``low`` to ``high``, its length checked
    first (NaN and infinities refused)."""

    def parse(text: str) -> float:
        if len(text) > 12:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {text[:12]!r}")
        try:
            value = float(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from exc
        if not low <= value <= high:  # NaN fails here too
            raise argparse.ArgumentTypeError(f"from {low:g} to {high:g} {unit}, not {text}")
        return value

    return parse


def seconds_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: seconds from ``low`` to ``high``."""
    return float_in(low, high, "seconds")


# The longest ISO 8601 time with a zone and microseconds is 32 characters.
MAX_TIME_CHARS = 40


def iso_time(text: str) -> datetime:
    """An argparse type: an ISO 8601 time with its zone (a time without one is ambiguous),
    of a bounded length."""
    if len(text) > MAX_TIME_CHARS:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text[:MAX_TIME_CHARS]!r}...")
    try:
        t = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc
    if t.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone (e.g. {text}+00:00)")
    if not timeconv.year_in_range(t):
        raise argparse.ArgumentTypeError(
            f"a time from {timeconv.FIRST_YEAR} to {timeconv.LAST_YEAR}, not {text}"
        )
    return t
