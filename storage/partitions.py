"""Time partitions of ``readings`` in plain mode (TimescaleDB creates its own chunks).

Partitions are 7 days wide, the same interval as the hypertable's chunks, aligned to whole
UTC days from the epoch. They are created ahead for the coming weeks and on demand for
backfilled data before a batch is written, so a COPY never meets a time with no partition.
There is no DEFAULT partition: rows in it would block creating the partition they belong to.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from psycopg import errors as pg_errors
from psycopg import sql

from storage.db import Conn

log = logging.getLogger(__name__)

PARTITION_DAYS = 7
# Weeks of partitions kept ready ahead of "now", so live data never waits on DDL.
AHEAD_WEEKS = 2

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_WIDTH_MS = PARTITION_DAYS * 86_400_000


def partition_start_ms(t_ms: int) -> int:
    return (t_ms // _WIDTH_MS) * _WIDTH_MS


def partition_name(start_ms: int) -> str:
    start = _EPOCH + timedelta(milliseconds=start_ms)
    return f"readings_p{start:%Y%m%d}"


async def existing_partitions(conn: Conn) -> set[int]:
    """Start times (ms) of the partitions attached to ``readings``."""
    cur = await conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'readings'::regclass"
    )
    starts: set[int] = set()
    for (name,) in await cur.fetchall():
        text = str(name)
        if text.startswith("readings_p"):
            day = datetime.strptime(text.removeprefix("readings_p"), "%Y%m%d").replace(tzinfo=UTC)
            starts.add(int((day - _EPOCH).total_seconds() * 1000))
    return starts


async def ensure_partitions(conn: Conn, starts: Iterable[int]) -> list[int]:
    """Create the partitions starting at ``starts`` (ms) that do not exist; return those created.

    Each is created in its own short transaction (or savepoint) so that two gateway processes
    racing to create the same partition both succeed.
    """
    created: list[int] = []
    for start in sorted(set(starts) - await existing_partitions(conn)):
        lo = _EPOCH + timedelta(milliseconds=start)
        hi = lo + timedelta(days=PARTITION_DAYS)
        stmt = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF readings FOR VALUES FROM ({}) TO ({})"
        ).format(sql.Identifier(partition_name(start)), sql.Literal(lo), sql.Literal(hi))
        try:
            async with conn.transaction():
                await conn.execute(stmt)
        except (pg_errors.DuplicateTable, pg_errors.UniqueViolation):
            continue  # created concurrently by another process
        created.append(start)
        log.info("created partition name=%s", partition_name(start))
    return created


def ahead(now_ms: int, weeks: int = AHEAD_WEEKS) -> list[int]:
    first = partition_start_ms(now_ms)
    return [first + i * _WIDTH_MS for i in range(weeks + 1)]
