"""Readings out of the database in bounded chunks, through a server-side cursor.

One statement (``DECLARE ... CURSOR`` in a read-only transaction), so the export reads one
consistent snapshot, and PostgreSQL streams: each ``FETCH`` brings ``CHUNK_ROWS`` rows in
binary, parsed by psycopg's C loaders a whole batch at a time, and the client holds at most
``QUEUE_CHUNKS + 2`` chunks whatever the export's size. (A ``COPY ... TO STDOUT`` streams
too, but psycopg hands its rows over one at a time through the event loop: measured here it
was about three times slower.) Readings are joined to the consent windows
of :mod:`storage.exports.selection` (only those inside a window leave the database), to
their envelope, their wearable's provenance (``sensor_history``: the description of the
wearable, by device and sensor name, valid at the reading's own time, so a strap replaced
later does not rewrite it; null columns where the hub never reported it) and the consent
version that admitted them.

Rows come in order of participant and time. A producer task reads the COPY while the
consumer (a writer, in a worker thread) handles the previous chunk; the queue between them
is bounded, so a slow disk slows the read instead of filling memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from storage.db import Conn
from storage.exports.mapping import EXPORTED
from storage.exports.selection import Selection

# 10k rows of ~20 columns are about 10 MB of Python objects: large enough that per-chunk
# costs (a round trip, a thread hop, a Parquet row group) vanish, small enough for a flat
# memory profile.
CHUNK_ROWS = 10_000
# Chunks read ahead of the writer: keeps the database and the writer busy at once.
QUEUE_CHUNKS = 1
# Sort memory for the export's one query (SET LOCAL, this transaction only): ordering by
# participant and time spills to disk past it, which is slower but still bounded.
SORT_MEMORY = "64MB"

Row = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    sql: str


def _us(expr: str) -> str:
    """A timestamptz as integer microseconds since the epoch (exact: extract gives numeric)."""
    return f"(extract(epoch FROM {expr}) * 1000000)::int8"


def _iso(expr: str) -> str:
    """A timestamptz as an ISO 8601 UTC instant with milliseconds, formatted by the server."""
    return f"""to_char({expr} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


PARTICIPANT = Column("participant_id", "r.participant_id")
TIME_US = Column("time_us", _us("r.time"))
TIME_ISO = Column("time_iso", _iso("r.time"))
METRIC = Column("metric", "r.metric")
LOINC = Column("loinc", "c.loinc")
VALUE = Column("value", "r.value")
UNIT = Column("unit", "r.unit")
DEVICE = Column("device_id", "r.device_id")
SEQ = Column("envelope_seq", "r.seq")
ENVELOPE_SHA = Column("envelope_sha256", "e.envelope_sha256")
SENT_US = Column("envelope_sent_at_us", _us("e.sent_at"))
RECEIVED_US = Column("received_at_us", _us("r.received_at"))
RECEIVED_ISO = Column("received_at_iso", _iso("r.received_at"))
SENSOR = Column("sensor", "r.sensor")
MANUFACTURER = Column("sensor_manufacturer", "s.manufacturer")
MODEL = Column("sensor_model", "s.model")
SERIAL = Column("sensor_serial", "s.serial")
FIRMWARE = Column("sensor_firmware", "s.firmware")
HARDWARE = Column("sensor_hardware", "s.hardware")
DESCRIPTION_ID = Column("sensor_description_id", "s.description_id")
CONSENT_ID = Column("consent_id", "r.consent_id")
CONSENT_VERSION = Column("consent_version", "d.version")
CONSENT_DOCUMENT = Column("consent_document", "d.title")
STUDY = Column("study_id", "p.study_id")
SITE = Column("site_id", "p.site_id")

_FROM = """
    WITH allowed (participant_id, metric, lo, hi) AS (
        SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[])
    ), codes (metric, loinc) AS (
        SELECT * FROM unnest(%s::text[], %s::text[])
    )
    SELECT {columns}
    FROM allowed a
    JOIN readings r ON r.participant_id = a.participant_id AND r.metric = a.metric
        AND r.time >= a.lo AND r.time < coalesce(a.hi, 'infinity'::timestamptz)
    JOIN participants p ON p.participant_id = r.participant_id
"""
_QUERY = f"""
    {_FROM}
    LEFT JOIN envelopes e ON e.device_id = r.device_id AND e.seq = r.seq
    LEFT JOIN sensor_history s ON s.device_id = r.device_id AND s.sensor = r.sensor
        AND r.time >= s.valid_from AND r.time < s.valid_to
    LEFT JOIN consents k ON k.consent_id = r.consent_id
    LEFT JOIN consent_documents d ON d.document_id = k.document_id
    LEFT JOIN codes c ON c.metric = r.metric
"""
# Per participant, metric and UTC day: mean, min, max, count (the SDTM summaries).
DAILY_COLUMNS = (
    Column("participant_id", "r.participant_id"),
    Column("study_id", "p.study_id"),
    Column("enrolled_on", "(p.enrolled_at AT TIME ZONE 'UTC')::date"),
    Column("metric", "r.metric"),
    Column("day", "(r.time AT TIME ZONE 'UTC')::date"),
    Column("mean", "avg(r.value)"),
    Column("min", "min(r.value)"),
    Column("max", "max(r.value)"),
    Column("n", "count(*)"),
)
_DAILY = f"""
    {_FROM}
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 4, 5
"""


def _params(selection: Selection) -> tuple[Any, ...]:
    codes = [(name, e.metric.loinc) for name, e in EXPORTED.items()]
    return (*selection.as_params(), [c[0] for c in codes], [c[1] for c in codes])


Consume = Callable[[list[Row]], Awaitable[None]]


async def stream(
    conn: Conn,
    selection: Selection,
    columns: Sequence[Column],
    consume: Consume,
    *,
    ordered: bool = True,
    chunk_rows: int = CHUNK_ROWS,
) -> int:
    """Hand the selected readings to ``consume`` in chunks; returns the row count.

    ``ordered``: by participant and time (what a partitioned writer needs); else in the
    order the database finds them, which spares it a sort of the whole export.
    """
    if not selection.windows:
        return 0
    query = _QUERY.format(columns=", ".join(f"{c.sql} AS {c.name}" for c in columns))
    if ordered:
        query += "ORDER BY r.participant_id, r.time\n"
    return await _stream(conn, query, selection, consume, chunk_rows)


async def stream_daily(
    conn: Conn, selection: Selection, consume: Consume, *, chunk_rows: int = CHUNK_ROWS
) -> int:
    """Hand the daily summaries (:data:`DAILY_COLUMNS`) to ``consume``; returns the row count."""
    if not selection.windows:
        return 0
    query = _DAILY.format(columns=", ".join(f"{c.sql} AS {c.name}" for c in DAILY_COLUMNS))
    return await _stream(conn, query, selection, consume, chunk_rows)


async def _stream(
    conn: Conn,
    query: str,
    selection: Selection,
    consume: Consume,
    chunk_rows: int,
) -> int:
    queue: asyncio.Queue[list[Row] | None] = asyncio.Queue(QUEUE_CHUNKS)
    total = 0

    async def produce() -> None:
        async with (
            conn.transaction(),
            conn.cursor(name="export", binary=True) as cur,
        ):
            await conn.execute("SET TRANSACTION READ ONLY")
            await conn.execute(f"SET LOCAL work_mem = '{SORT_MEMORY}'")
            await cur.execute(query.encode(), _params(selection))
            while chunk := await cur.fetchmany(chunk_rows):
                await queue.put(chunk)
        await queue.put(None)

    async def drain() -> None:
        nonlocal total
        while (chunk := await queue.get()) is not None:
            await consume(chunk)
            total += len(chunk)

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(produce(), name="export-read")
            tg.create_task(drain(), name="export-write")
    except BaseExceptionGroup as group:
        # One side failed and the other was cancelled: the failure is what callers match.
        raise group.exceptions[0] from None
    return total
