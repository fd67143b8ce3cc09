"""Readings out of the database in bounded chunks, through a server-side cursor.

One statement (``DECLARE ... CURSOR`` in a read-only transaction; SDTM's two, daily
summaries then readings, in one REPEATABLE READ transaction), so the export reads one
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
from typing import Any, Generic, TypeVar

from psycopg import sql
from psycopg.rows import AsyncRowFactory, class_row

from ingest.flags import IN_DOUBT
from storage.db import Conn
from storage.exports.mapping import EXPORTED
from storage.exports.selection import Selection
from storage.zones import LOCAL_ZONE, ZONE_AT_READING, zone_join

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
# The wearable's description valid at the reading's own time (``sensor_history``).
_HISTORY_JOIN = """
    LEFT JOIN sensor_history s ON s.device_id = r.device_id AND s.sensor = r.sensor
        AND r.time >= s.valid_from AND r.time < s.valid_to
"""
_QUERY = f"""
    {_FROM}
    LEFT JOIN envelopes e ON e.device_id = r.device_id AND e.seq = r.seq
    {_HISTORY_JOIN}
    LEFT JOIN consents k ON k.consent_id = r.consent_id
    LEFT JOIN consent_documents d ON d.document_id = k.document_id
    LEFT JOIN codes c ON c.metric = r.metric
"""
_ORDERED = "ORDER BY r.participant_id, r.time\n"

# Whether the device put the reading in doubt: one of its flags is invalid or questionable.
_DOUBTED = "coalesce(r.flags && %(in_doubt)s::text[], false)"


def _zone_at(alias: str, participant: str, time: str) -> sql.Composable:
    """:func:`storage.zones.zone_join` as a composable of this module's queries."""
    return sql.SQL(zone_join(alias, participant, time))


def _local_iso(time: str, zone: str) -> str:
    """A timestamptz as ISO 8601 local date-time in ``zone`` with that instant's UTC offset
    (``2026-03-29T03:30:00+02:00``; seconds, truncated), formatted by the server from the
    same zone database that gives local days."""
    local = f"({time} AT TIME ZONE {zone})"
    offset = f"extract(epoch FROM {local} - ({time} AT TIME ZONE 'UTC'))::int"
    return (
        f"""to_char({local}, 'YYYY-MM-DD"T"HH24:MI:SS')"""
        f" || CASE WHEN {offset} < 0 THEN '-' ELSE '+' END"
        f" || to_char(make_interval(secs => abs({offset})), 'HH24:MI')"
    )


ENROLLMENT_ZONE = "coalesce(ez.time_zone, 'UTC')"
# The readings with the zone valid at each one's time (``tz``) and at the participant's
# enrollment (``ez``): local days and local times for SDTM.
_LOCAL_FROM = _FROM + ZONE_AT_READING + "{enrollment_zone}"
_ENROLLMENT_ZONE_JOIN = _zone_at("ez", "p.participant_id", "p.enrolled_at")
_LOCAL_DAY = f"(r.time AT TIME ZONE {LOCAL_ZONE})::date"
_ENROLLED_ON = f"(p.enrolled_at AT TIME ZONE {ENROLLMENT_ZONE})::date"


@dataclass(frozen=True, slots=True)
class Daily:
    """One participant's readings of one metric on one local day (in the zone valid at each
    reading's time), summarized over those the device did not put in doubt (``mean``,
    ``minimum``, ``maximum`` are None when it doubted all of them, ``counted`` is then 0);
    ``doubted`` counts the readings left out. ``enrolled_on``: the local date of enrollment."""

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


# Per participant, metric and local day (the SDTM summaries): the fields of :class:`Daily`.
DAILY_COLUMNS = (
    Column("participant_id", "r.participant_id"),
    Column("study_id", "p.study_id"),
    Column("enrolled_on", _ENROLLED_ON),
    Column("metric", "r.metric"),
    Column("day", _LOCAL_DAY),
    Column("mean", f"avg(r.value) FILTER (WHERE NOT {_DOUBTED})"),
    Column("minimum", f"min(r.value) FILTER (WHERE NOT {_DOUBTED})"),
    Column("maximum", f"max(r.value) FILTER (WHERE NOT {_DOUBTED})"),
    Column("counted", f"count(*) FILTER (WHERE NOT {_DOUBTED})"),
    Column("doubted", f"count(*) FILTER (WHERE {_DOUBTED})"),
)
_DAILY = f"""
    {_LOCAL_FROM}
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 4, 5
"""


@dataclass(frozen=True, slots=True)
class LocalReading:
    """One reading for SDTM: its local day and local date-time with offset (the zone valid
    at its time), and what the device said about it."""

    participant_id: str
    study_id: str
    enrolled_on: date
    metric: str
    value: float
    device_flags: list[str] | None
    device_user: int | None
    day: date
    local_time: str
    description_id: int | None


LOCAL_READING_COLUMNS = (
    Column("participant_id", "r.participant_id"),
    Column("study_id", "p.study_id"),
    Column("enrolled_on", _ENROLLED_ON),
    Column("metric", "r.metric"),
    Column("value", "r.value"),
    Column("device_flags", "r.flags"),
    Column("device_user", "r.device_user::int4"),
    Column("day", _LOCAL_DAY),
    Column("local_time", _local_iso("r.time", LOCAL_ZONE)),
    # The wearable's description valid at the reading's time (null: never described).
    Column("description_id", "s.description_id"),
)
_LOCAL_READINGS = f"""
    {_LOCAL_FROM}
    {_HISTORY_JOIN}
    ORDER BY r.participant_id, r.metric, r.time
"""


@dataclass(frozen=True, slots=True)
class Description:
    """A wearable's description (a ``sensor_descriptions`` row): what it said about itself,
    None for what it did not serve."""

    description_id: int
    device_id: str
    sensor: str
    manufacturer: str | None
    model: str | None
    serial: str | None
    firmware: str | None
    hardware: str | None


_DESCRIPTIONS = """
    SELECT description_id, device_id, sensor, manufacturer, model, serial, firmware, hardware
    FROM sensor_descriptions
    WHERE description_id = ANY(%(ids)s::int8[])
    ORDER BY device_id, sensor, reported_at, description_id
"""


async def descriptions(conn: Conn, ids: Iterable[int]) -> list[Description]:
    """These wearable descriptions, by hub, sensor name and report time (SDTM DI). A
    description is never changed once recorded, so reading it after the readings' snapshot
    gives what the readings were joined to."""
    wanted = sorted(set(ids))
    if not wanted:
        return []
    async with conn.cursor(row_factory=class_row(Description)) as cur:
        await cur.execute(_DESCRIPTIONS, {"ids": wanted})
        return await cur.fetchall()


@dataclass(frozen=True, slots=True)
class Subject:
    """An exported participant for SDTM DM: enrollment and first consent as local
    date-times with offset (the zone valid at each; ``consented`` None without a consent)."""

    participant_id: str
    study_id: str
    site_id: str
    enrolled: str
    consented: str | None


_SUBJECTS = """
    SELECT p.participant_id, p.study_id, p.site_id, {enrolled} AS enrolled,
        {consented} AS consented
    FROM participants p
    {enrollment_zone}
    LEFT JOIN LATERAL (
        SELECT min(c.signed_at) AS signed_at FROM consents c
        WHERE c.participant_id = p.participant_id AND c.action = 'consent'
    ) k ON true
    {consent_zone}
    WHERE p.participant_id = ANY(%s)
    ORDER BY p.participant_id
"""


async def subjects(conn: Conn, selection: Selection) -> list[Subject]:
    """The exported participants (all of the selection, with readings or not), for DM."""
    ids = [p.participant_id for p in selection.participants]
    async with conn.cursor(row_factory=class_row(Subject)) as cur:
        query = sql.SQL(_SUBJECTS).format(
            enrolled=sql.SQL(_local_iso("p.enrolled_at", ENROLLMENT_ZONE)),
            consented=sql.SQL(_local_iso("k.signed_at", "coalesce(kz.time_zone, 'UTC')")),
            enrollment_zone=_ENROLLMENT_ZONE_JOIN,
            consent_zone=_zone_at("kz", "p.participant_id", "k.signed_at"),
        )
        await cur.execute(query, (ids,))
        return await cur.fetchall()


def _query(template: str, selected: Sequence[Column]) -> sql.Composed:
    """The template with its columns (and, for local time, the enrollment zone's join)."""
    items = (sql.SQL("{} AS {}").format(sql.SQL(c.sql), sql.Identifier(c.name)) for c in selected)
    parts: dict[str, sql.Composable] = {"columns": sql.SQL(", ").join(items)}
    if "{enrollment_zone}" in template:
        parts["enrollment_zone"] = _ENROLLMENT_ZONE_JOIN
    return sql.SQL(template).format(**parts)


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


async def stream_sdtm(
    conn: Conn,
    selection: Selection,
    daily: Consume[Daily],
    readings: Consume[LocalReading],
    *,
    chunk_rows: int = CHUNK_ROWS,
) -> int:
    """Hand the daily summaries to ``daily``, then the readings (by participant, metric and
    time) to ``readings``, both read from one snapshot; returns the row count."""
    if not selection.windows:
        return 0
    stages: list[_Stage[Any]] = [
        _Stage(_query(_DAILY, DAILY_COLUMNS), class_row(Daily), daily),
        _Stage(_query(_LOCAL_READINGS, LOCAL_READING_COLUMNS), class_row(LocalReading), readings),
    ]
    return await _stream_stages(conn, selection, stages, chunk_rows)


@dataclass(frozen=True, slots=True)
class _Stage(Generic[R]):
    query: sql.Composed
    row_factory: AsyncRowFactory[R]
    consume: Consume[R]


async def _stream(
    conn: Conn,
    query: sql.Composed,
    selection: Selection,
    row_factory: AsyncRowFactory[R],
    consume: Consume[R],
    chunk_rows: int,
) -> int:
    return await _stream_stages(conn, selection, [_Stage(query, row_factory, consume)], chunk_rows)


async def _stream_stages(
    conn: Conn, selection: Selection, stages: Sequence[_Stage[Any]], chunk_rows: int
) -> int:
    """Run the stages' queries in turn in one read-only snapshot (REPEATABLE READ), each
    chunk handed to its stage's ``consume``."""
    queue: asyncio.Queue[tuple[Consume[Any], list[Any]] | None] = asyncio.Queue(QUEUE_CHUNKS)
    total = 0

    async def produce() -> None:
        async with conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            await conn.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(SORT_MEMORY)))
            for stage in stages:
                async with conn.cursor(
                    name="export", binary=True, row_factory=stage.row_factory
                ) as cur:
                    await cur.execute(stage.query, _params(selection))
                    while chunk := await cur.fetchmany(chunk_rows):
                        await queue.put((stage.consume, chunk))
        await queue.put(None)

    async def drain() -> None:
        nonlocal total
        while (item := await queue.get()) is not None:
            consume, chunk = item
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
