"""Readings with their provenance as a Parquet dataset, partitioned by participant and day.

Layout (hive style, what ``pyarrow.dataset.dataset(DIR, partitioning="hive")`` reads):
``participant_id=P1/date=2026-01-31/part-0.parquet``, one file per participant and UTC day.
Rows arrive ordered by participant and time, so each file is opened once, filled and closed:
at most one file is open at a time. The columns are :data:`SCHEMA` (docs/exports.md).

What the device said about a reading is in ``device_flags`` and ``device_user`` as stored,
and ``device_quality`` is the class of its worst flag, judged by ``ingest.flags`` (the one
registry the gateway and its alert rules use too).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta
from typing import BinaryIO

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from ingest.flags import worst
from storage.exports import source
from storage.exports.output import OutputDir
from storage.exports.source import Row

SCHEMA_NAME = b"trialstream.readings/2"
DAY_US = 86_400_000_000
_EPOCH_DAY = date(1970, 1, 1)
TS = pa.timestamp("us", tz="UTC")

# Read from the database in this order: the participant first (the partition, not a column).
COLUMNS = (
    source.PARTICIPANT,
    source.TIME_US,
    source.METRIC,
    source.LOINC,
    source.VALUE,
    source.UNIT,
    source.FLAGS,
    source.DEVICE_USER,
    source.DEVICE,
    source.SEQ,
    source.ENVELOPE_SHA,
    source.SENT_US,
    source.RECEIVED_US,
    source.SENSOR,
    source.MANUFACTURER,
    source.MODEL,
    source.SERIAL,
    source.FIRMWARE,
    source.HARDWARE,
    source.CONSENT_ID,
    source.CONSENT_VERSION,
    source.CONSENT_DOCUMENT,
    source.STUDY,
    source.SITE,
)

SCHEMA = pa.schema(
    [
        pa.field("time", TS, nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("loinc", pa.string()),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("unit", pa.string(), nullable=False),
        pa.field("device_flags", pa.list_(pa.string())),
        pa.field("device_quality", pa.string()),
        pa.field("device_user", pa.int16()),
        pa.field("device_id", pa.string(), nullable=False),
        pa.field("envelope_seq", pa.int64(), nullable=False),
        pa.field("envelope_sha256", pa.binary(32)),
        pa.field("envelope_sent_at", TS),
        pa.field("received_at", TS, nullable=False),
        pa.field("sensor", pa.string(), nullable=False),
        pa.field("sensor_manufacturer", pa.string()),
        pa.field("sensor_model", pa.string()),
        pa.field("sensor_serial", pa.string()),
        pa.field("sensor_firmware", pa.string()),
        pa.field("sensor_hardware", pa.string()),
        pa.field("consent_id", pa.int64()),
        pa.field("consent_version", pa.string()),
        pa.field("consent_document", pa.string()),
        pa.field("study_id", pa.string(), nullable=False),
        pa.field("site_id", pa.string(), nullable=False),
    ]
)
PARTITIONING = pa.schema([("participant_id", pa.string()), ("date", pa.date32())])
# Computed here from device_flags; every other field is read, in COLUMNS order after the
# participant.
QUALITY = "device_quality"
_READ = [f for f in SCHEMA if f.name != QUALITY]
_FLAGS_AT = COLUMNS.index(source.FLAGS)


def device_quality(flags: Sequence[str] | None) -> str | None:
    """The class of the reading's worst flag (``invalid``, ``questionable``, ``info``), None
    when the device said nothing about it."""
    quality = None if flags is None else worst(flags)
    return None if quality is None else quality.value


def partition_path(participant_id: str, day: date, part: int = 0) -> str:
    return f"participant_id={participant_id}/date={day.isoformat()}/part-{part}.parquet"


class ParquetWriter:
    """Writes chunks of rows (in :data:`COLUMNS` order) into the partitioned dataset."""

    def __init__(self, out: OutputDir, export_id: str) -> None:
        self._out = out
        self._schema = SCHEMA.with_metadata(
            {b"trialstream.schema": SCHEMA_NAME, b"trialstream.export_id": export_id.encode()}
        )
        self._key: tuple[str, int] | None = None
        self._path = ""
        self._file: BinaryIO | None = None
        self._writer: pq.ParquetWriter | None = None
        self._parts: dict[tuple[str, int], int] = {}

    def write(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        columns = list(zip(*rows, strict=True))
        participants, times = columns[0], columns[1]
        days = [t // DAY_US for t in times]
        arrays = {
            field.name: pa.array(col, type=field.type)
            for col, field in zip(columns[1:], _READ, strict=True)
        }
        arrays[QUALITY] = pa.array(
            [device_quality(f) for f in columns[_FLAGS_AT]], type=pa.string()
        )
        batch = pa.RecordBatch.from_arrays(
            [arrays[field.name] for field in self._schema], schema=self._schema
        )
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or participants[i] != participants[start] or days[i] != days[start]:
                self._switch((participants[start], days[start]))
                assert self._writer is not None
                self._writer.write_batch(batch.slice(start, i - start))
                self._out.count(self._path, i - start)
                start = i

    def _switch(self, key: tuple[str, int]) -> None:
        if key == self._key:
            return
        self._close_current()
        part = self._parts.get(key, 0)
        self._parts[key] = part + 1
        self._path = partition_path(key[0], _EPOCH_DAY + timedelta(days=key[1]), part)
        self._file = self._out.open(self._path)
        self._writer = pq.ParquetWriter(self._file, self._schema, compression="zstd")
        self._key = key

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._key = None

    def close(self) -> None:
        self._close_current()
