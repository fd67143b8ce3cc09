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

What the device said about a reading (its flags and user index, ``ingest.flags``) comes out
with it. The daily summaries leave out the readings the device put in doubt and count them
instead; which codes do that is :data:`ingest.flags.IN_DOUBT`, passed as a query parameter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, TypeVar

from psycopg import sql
from psycopg.rows import AsyncRowFactory, class_row

from ingest.flags import IN_DOUBT
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
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Column:
    """One column of the export query: its name in the result and its SQL expression (a
    constant of this module, never built from input)."""

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
# What the device said about the reading: its flags (sorted, distinct; null when it said
# nothing) and its user index on a shared wearable (null when the profile has none).
FLAGS = Column("device_flags", "r.flags")
DEVICE_USER = Column("device_user", "r.device_user")
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

_BY_NAME = {
    c.name: c
    for c in (
        PARTICIPANT,
        TIME_US,
        TIME_ISO,
        METRIC,
        LOINC,
        VALUE,
        UNIT,
        FLAGS,
        DEVICE_USER,
        DEVICE,
        SEQ,
        ENVELOPE_SHA,
        SENT_US,
        RECEIVED_US,
        RECEIVED_ISO,
        SENSOR,
        MANUFACTURER,
        MODEL,
        SERIAL,
        FIRMWARE,
        HARDWARE,
        DESCRIPTION_ID,
        CONSENT_ID,
        CONSENT_VERSION,
        CONSENT_DOCUMENT,
        STUDY,
        SITE,
    )
}


def columns(names: Iterable[str]) -> tuple[Column, ...]:
    """The reading columns of these names, in this order (a row type's field names)."""
    return tuple(_BY_NAME[n] for n in names)


_FROM = """
    WITH allowed (participant_id, metric, lo, hi) AS (
        SELECT * FROM unnest(
            %(participants)s::text[], %(metrics)s::text[],
            %(lo)s::timestamptz[], %(hi)s::timestamptz[]
        )
    ), codes (metric, loinc) AS (
        SELECT * FROM unnest(%(code_metrics)s::text[], %(loincs)s::text[])
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
_ORDERED = "ORDER BY r.participant_id, r.time\n"

# Whether the device put the reading in doubt: one of its flags is invalid or questionable.
_DOUBTED = "coalesce(r.flags && %(in_doubt)s::text[], false)"


@dataclass(frozen=True, slots=True)
class Daily:
    """One participant's readings of one metric on one UTC day, summarized over those the
    device did not put in doubt (``mean``, ``minimum``, ``maximum`` are None when it doubted
    all of them, ``counted`` is then 0); ``doubted`` counts the readings left out."""

    participant_id: str
    study_id: str
    enrolled_on: date
    metric: str
    day: date
    mean: float | None
    minimum: float | None
    maximum: float | None
    counted: int
    doubted: int


# Per participant, metric and UTC day (the SDTM summaries): the fields of :class:`Daily`.
DAILY_COLUMNS = (
    Column("participant_id", "r.participant_id"),
    Column("study_id", "p.study_id"),
    Column("enrolled_on", "(p.enrolled_at AT TIME ZONE 'UTC')::date"),
    Column("metric", "r.metric"),
    Column("day", "(r.time AT TIME ZONE 'UTC')::date"),
    Column("mean", f"avg(r.value) FILTER (WHERE NOT {_DOUBTED})"),
    Column("minimum", f"min(r.value) FILTER (WHERE NOT {_DOUBTED})"),
    Column("maximum", f"max(r.value) FILTER (WHERE NOT {_DOUBTED})"),
    Column("counted", f"count(*) FILTER (WHERE NOT {_DOUBTED})"),
    Column("doubted", f"count(*) FILTER (WHERE {_DOUBTED})"),
)
_DAILY = f"""
    {_FROM}
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 4, 5
"""


def _query(template: str, selected: Sequence[Column]) -> sql.Composed:
    items = (sql.SQL("{} AS {}").format(sql.SQL(c.sql), sql.Identifier(c.name)) for c in selected)
    return sql.SQL(template).format(columns=sql.SQL(", ").join(items))


def _params(selection: Selection) -> dict[str, Any]:
    return {
        **selection.as_params(),
        "code_metrics": list(EXPORTED),
        "loincs": [e.metric.loinc for e in EXPORTED.values()],
        "in_doubt": sorted(IN_DOUBT),
    }


Consume = Callable[[list[R]], Awaitable[None]]


async def stream(
    conn: Conn,
    selection: Selection,
    selected: Sequence[Column],
    consume: Consume[R],
    *,
    row_factory: AsyncRowFactory[R],
    ordered: bool = True,
    chunk_rows: int = CHUNK_ROWS,
) -> int:
    """Hand the selected readings to ``consume`` in chunks, each row made by
    ``row_factory`` from ``selected`` in order; returns the row count.

    ``ordered``: by participant and time (what a partitioned writer needs); else in the
    order the database finds them, which spares it a sort of the whole export.
    """
    if not selection.windows:
        return 0
    query = _query(_QUERY + (_ORDERED if ordered else ""), selected)
    return await _stream(conn, query, selection, row_factory, consume, chunk_rows)


async def stream_daily(
    conn: Conn, selection: Selection, consume: Consume[Daily], *, chunk_rows: int = CHUNK_ROWS
) -> int:
    """Hand the daily summaries (:class:`Daily`) to ``consume``; returns the row count."""
    if not selection.windows:
        return 0
    query = _query(_DAILY, DAILY_COLUMNS)
    return await _stream(conn, query, selection, class_row(Daily), consume, chunk_rows)


async def _stream(
    conn: Conn,
    query: sql.Composed,
    selection: Selection,
    row_factory: AsyncRowFactory[R],
    consume: Consume[R],
    chunk_rows: int,
) -> int:
    queue: asyncio.Queue[list[R] | None] = asyncio.Queue(QUEUE_CHUNKS)
    total = 0

    async def produce() -> None:
        async with (
            conn.transaction(),
            conn.cursor(name="export", binary=True, row_factory=row_factory) as cur,
        ):
            await conn.execute("SET TRANSACTION READ ONLY")
            await conn.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(SORT_MEMORY)))
            await cur.execute(query, _params(selection))
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
