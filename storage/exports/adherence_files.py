"""Adherence as files (``trialstream export adherence``, docs/exports.md): one row per
participant, local day and metric, as ``storage.adherence.days`` gives it, in
``adherence.parquet`` and ``adherence.csv`` (the same rows and columns, for statistics
packages and for spreadsheets). Counts and shares only: no reading's value is in them.

The days run from the request's ``from`` (else the earliest enrollment of the selected
participants) to its ``to`` (else today, UTC), participants a chunk at a time so memory stays
bounded for a whole study. Only participants with data that may be exported at all are in
it: one withdrawn under the ``delete`` policy is not.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from storage import adherence
from storage.adherence import MetricDay
from storage.db import Conn
from storage.exports.output import OutputDir
from storage.exports.selection import ExportRequest, Selection

PARQUET: Final = "adherence.parquet"
CSV: Final = "adherence.csv"
SCHEMA_NAME: Final = b"trialstream.adherence/1"
# Participants per query: a quarter of days for 100 participants is some 40,000 rows.
CHUNK: Final = 100

SCHEMA = pa.schema(
    [
        pa.field("participant_id", pa.string(), nullable=False),
        pa.field("day", pa.date32(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("kind", pa.string()),
        pa.field("readings", pa.int64(), nullable=False),
        pa.field("invalid", pa.int64(), nullable=False),
        pa.field("worn_minutes", pa.int64(), nullable=False),
        pa.field("study_minutes", pa.float64(), nullable=False),
        pa.field("expected_minutes", pa.float64()),
        pa.field("expected_count", pa.int64()),
        pa.field("adherence", pa.float64()),
        pa.field("completeness", pa.float64()),
    ],
    metadata={b"schema": SCHEMA_NAME},
)
COLUMNS: Final = tuple(SCHEMA.names)

Consume = Callable[[list[MetricDay]], Awaitable[None]]


def exportable(selection: Selection) -> Selection:
    """The participants whose data may go out at all: consent held at some time. One
    withdrawn under the delete policy has no window left, and their counts stay in."""
    windowed = {w.participant_id for w in selection.windows}
    kept = tuple(p for p in selection.participants if p.participant_id in windowed)
    return replace(selection, participants=kept)


def span(request: ExportRequest, selection: Selection) -> tuple[date, date]:
    """The local days to export: the request's, else enrollment to today (UTC)."""
    first = (
        request.from_time.astimezone(UTC).date()
        if request.from_time is not None
        else min((p.enrolled_on for p in selection.participants), default=datetime.now(UTC).date())
    )
    last = (
        (request.to_time - timedelta(microseconds=1)).astimezone(UTC).date()
        if request.to_time is not None
        else datetime.now(UTC).date()
    )
    return first, max(first, last)


async def stream(conn: Conn, request: ExportRequest, selection: Selection, consume: Consume) -> int:
    """Hand ``consume`` each chunk of rows; the number of rows."""
    first, last = span(request, selection)
    ids = [p.participant_id for p in selection.participants]
    rows = 0
    for i in range(0, len(ids), CHUNK):
        chunk = await adherence.days(conn, ids[i : i + CHUNK], first, last)
        if chunk:
            await consume(chunk)
            rows += len(chunk)
    return rows


def _values(r: MetricDay) -> tuple[Any, ...]:
    return (
        r.participant_id,
        r.day,
        r.metric,
        r.kind,
        r.readings,
        r.invalid,
        r.worn_minutes,
        r.study_minutes,
        r.expected_minutes,
        r.expected_count,
        r.adherence,
        r.completeness,
    )


class AdherenceWriter:
    """Both files, written as the chunks come."""

    def __init__(self, output: OutputDir) -> None:
        self._output = output
        self._parquet = pq.ParquetWriter(output.path(PARQUET), SCHEMA)
        self._csv_file = io.TextIOWrapper(output.open(CSV), encoding="utf-8", newline="")
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(COLUMNS)

    def write(self, rows: Sequence[MetricDay]) -> None:
        values = [_values(r) for r in rows]
        columns = list(zip(*values, strict=True))
        arrays = [pa.array(c, type=f.type) for c, f in zip(columns, SCHEMA, strict=True)]
        self._parquet.write_table(pa.Table.from_arrays(arrays, schema=SCHEMA))
        self._csv.writerows(
            [v[0], v[1].isoformat(), *("" if x is None else x for x in v[2:])] for v in values
        )
        self._output.count(PARQUET, len(rows))
        self._output.count(CSV, len(rows))

    def close(self) -> None:
        self._parquet.close()
        self._csv_file.close()
