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
