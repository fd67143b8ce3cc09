"""Wearables' descriptions (Device Information) as hubs report them, kept over time.

Two tables (docs/storage.md):

- ``sensors``: one row per wearable seen through a hub, overwritten by each report: the
  latest description received, battery level, first and last seen.
- ``sensor_descriptions``: every change of a wearable's description (manufacturer, model,
  serial, firmware, hardware), from the time the hub reported it: the sealing time of the
  envelope that carried the report, since a report carries no time of its own. The view
  ``sensor_history`` gives each description the span of reading times it is valid for, so a
  reading is joined to the description valid at its own time (exports, pages): a strap
  replaced under the same sensor name does not rewrite the provenance of earlier readings.

A report adds a history row only when it changes the description valid at its time: one
that repeats it (the usual case: a hub reports each wearable on every connection, battery
included) adds nothing. A field a report leaves out keeps the value of the description valid
at its time, unless the report names another serial number: that is another wearable, and
nothing of the previous one carries over. A report older than the newest description (an
envelope delivered late) is placed at its own time, between the descriptions around it; the
later ones are left as they were reported.

Both tables are written with one statement each per batch, and only for batches that carry
reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import class_row

from ingest.model import AcceptedEnvelope, SensorReport
from storage.db import Conn
from storage.timeconv import from_ms

# The newest report received wins; a field it left out keeps what is known, unless the
# report names another serial number (another wearable).
_UPSERT_SENSORS = """
INSERT INTO sensors (device_id, sensor, manufacturer, model, serial, firmware, hardware,
                     battery_level, paired_user, first_seen, last_seen)
SELECT *, %b::timestamptz, %b::timestamptz
FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
            %b::text[], %b::int2[], %b::int2[])
ON CONFLICT (device_id, sensor) DO UPDATE SET
    manufacturer = CASE WHEN EXCLUDED.serial <> sensors.serial THEN EXCLUDED.manufacturer
                   ELSE coalesce(EXCLUDED.manufacturer, sensors.manufacturer) END,
    model = CASE WHEN EXCLUDED.serial <> sensors.serial THEN EXCLUDED.model
            ELSE coalesce(EXCLUDED.model, sensors.model) END,
    serial = coalesce(EXCLUDED.serial, sensors.serial),
    firmware = CASE WHEN EXCLUDED.serial <> sensors.serial THEN EXCLUDED.firmware
               ELSE coalesce(EXCLUDED.firmware, sensors.firmware) END,
    hardware = CASE WHEN EXCLUDED.serial <> sensors.serial THEN EXCLUDED.hardware
               ELSE coalesce(EXCLUDED.hardware, sensors.hardware) END,
    battery_level = coalesce(EXCLUDED.battery_level, sensors.battery_level),
    -- The hub's pairing, not the wearable's description: the newest report says it whole.
    paired_user = EXCLUDED.paired_user,
    last_seen = greatest(sensors.last_seen, EXCLUDED.last_seen)
"""
# Each report against the description valid at its time (p): completed from it, and added
# only when it differs from it.
_INSERT_DESCRIPTIONS = """
WITH report (device_id, sensor, reported_at, seq, manufacturer, model, serial, firmware,
             hardware) AS (
    SELECT * FROM unnest(%b::text[], %b::text[], %b::timestamptz[], %b::int8[], %b::text[],
                         %b::text[], %b::text[], %b::text[], %b::text[])
), described AS (
    SELECT r.device_id, r.sensor, r.reported_at, r.seq,
           CASE WHEN r.serial <> p.serial THEN r.manufacturer
                ELSE coalesce(r.manufacturer, p.manufacturer) END AS manufacturer,
           CASE WHEN r.serial <> p.serial THEN r.model ELSE coalesce(r.model, p.model) END AS model,
           coalesce(r.serial, p.serial) AS serial,
           CASE WHEN r.serial <> p.serial THEN r.firmware
                ELSE coalesce(r.firmware, p.firmware) END AS firmware,
           CASE WHEN r.serial <> p.serial THEN r.hardware
                ELSE coalesce(r.hardware, p.hardware) END AS hardware,
           ROW(p.manufacturer, p.model, p.serial, p.firmware, p.hardware) AS valid
    FROM report r
    LEFT JOIN LATERAL (
        SELECT d.manufacturer, d.model, d.serial, d.firmware, d.hardware
        FROM sensor_descriptions d
        WHERE d.device_id = r.device_id AND d.sensor = r.sensor AND d.reported_at <= r.reported_at
        ORDER BY d.reported_at DESC, d.description_id DESC
        LIMIT 1
    ) p ON true
)
INSERT INTO sensor_descriptions (device_id, sensor, reported_at, seq, manufacturer, model,
                                 serial, firmware, hardware)
SELECT device_id, sensor, reported_at, seq, manufacturer, model, serial, firmware, hardware
FROM described
WHERE ROW(manufacturer, model, serial, firmware, hardware) IS DISTINCT FROM valid
"""
# Infinite bounds leave as null (open): Python's datetime has no infinity.
_PARTICIPANT_HISTORY = """
SELECT h.device_id, h.sensor, h.manufacturer, h.model, h.serial, h.firmware, h.hardware,
       h.reported_at, CASE WHEN isfinite(h.valid_from) THEN h.valid_from END AS valid_from,
       CASE WHEN isfinite(h.valid_to) THEN h.valid_to END AS valid_to
FROM sensor_history h
JOIN devices d ON d.device_id = h.device_id
WHERE d.participant_id = %s
ORDER BY h.device_id, h.sensor, h.valid_from, h.description_id
"""


@dataclass(frozen=True, slots=True)
class Description:
    """What identifies a wearable and its software: the fields a history row keeps."""

    manufacturer: str | None
    model: str | None
    serial: str | None
    firmware: str | None
    hardware: str | None

    @classmethod
    def of(cls, report: SensorReport) -> Description:
        r = report
        return cls(r.manufacturer, r.model, r.serial, r.firmware, r.hardware)

    def then(self, report: SensorReport) -> Description:
        """This description updated by a later ``report`` (the rule of the module doc)."""
        if report.serial is not None and self.serial is not None and report.serial != self.serial:
            return Description.of(report)
        return Description(
            report.manufacturer if report.manufacturer is not None else self.manufacturer,
            report.model if report.model is not None else self.model,
            report.serial if report.serial is not None else self.serial,
            report.firmware if report.firmware is not None else self.firmware,
            report.hardware if report.hardware is not None else self.hardware,
        )


@dataclass(frozen=True, slots=True)
class SensorPeriod:
    """One description of a wearable and the span of reading times it is valid for.

    ``valid_from`` is None for a wearable's first description (it also covers the readings
    before its report), ``valid_to`` None for the one valid now.
    """

    device_id: str
    sensor: str
    manufacturer: str | None
    model: str | None
    serial: str | None
    firmware: str | None
    hardware: str | None
    reported_at: datetime
    valid_from: datetime | None
    valid_to: datetime | None


@dataclass(frozen=True, slots=True)
class _Report:
    device_id: str
    sensor: str
    sent_ms: int
    seq: int
    description: Description


def history_rows(fresh: Sequence[AcceptedEnvelope]) -> list[_Report]:
    """The batch's reports as history candidates, in report time order per wearable.

    Within the batch, each report is completed from the one before it of the same wearable
    and dropped when that leaves it unchanged; the database compares the first with what it
    holds (a batch is one statement, which sees none of its own rows).
    """
    by_sensor: dict[tuple[str, str], list[tuple[int, int, SensorReport]]] = {}
    for e in fresh:
        for s in e.sensors:
            by_sensor.setdefault((e.dev, s.sensor), []).append((e.sent_ms, e.seq, s))
    out: list[_Report] = []
    for (dev, sensor), reports in by_sensor.items():
        previous: Description | None = None
        for sent_ms, seq, report in sorted(reports, key=lambda r: (r[0], r[1])):
            current = Description.of(report) if previous is None else previous.then(report)
            if current != previous:
                out.append(_Report(dev, sensor, sent_ms, seq, current))
            previous = current
    return out


def _latest_per_sensor(fresh: Sequence[AcceptedEnvelope]) -> list[tuple[str, SensorReport]]:
    """One report per wearable for ``sensors``: the batch's reports folded in the order the
    hub sealed them (newest wins, a left-out field keeps what an earlier one said)."""
    merged: dict[tuple[str, str], SensorReport] = {}
    for e in sorted(fresh, key=lambda e: (e.sent_ms, e.seq)):
        for s in e.sensors:
            before = merged.get((e.dev, s.sensor))
            if before is None:
                merged[(e.dev, s.sensor)] = s
                continue
            d = Description.of(before).then(s)
            battery = s.battery_level if s.battery_level is not None else before.battery_level
            merged[(e.dev, s.sensor)] = SensorReport(
                s.sensor,
                d.manufacturer,
                d.model,
                d.serial,
                d.firmware,
                d.hardware,
                battery,
                s.paired_user,
            )
    return [(dev, s) for (dev, _), s in merged.items()]


async def record_reports(conn: Conn, fresh: Sequence[AcceptedEnvelope], received: datetime) -> None:
    """Store the sensor reports of the batch's new envelopes (``sensors`` and history)."""
    if not any(e.sensors for e in fresh):
        return
    latest = _latest_per_sensor(fresh)
    await conn.execute(
        _UPSERT_SENSORS,
        (
            received,
            received,
            [dev for dev, _ in latest],
            [s.sensor for _, s in latest],
            [s.manufacturer for _, s in latest],
            [s.model for _, s in latest],
            [s.serial for _, s in latest],
            [s.firmware for _, s in latest],
            [s.hardware for _, s in latest],
            [s.battery_level for _, s in latest],
            [s.paired_user for _, s in latest],
        ),
    )
    rows = history_rows(fresh)
    if rows:
        await conn.execute(
            _INSERT_DESCRIPTIONS,
            (
                [r.device_id for r in rows],
                [r.sensor for r in rows],
                [from_ms(r.sent_ms) for r in rows],
                [r.seq for r in rows],
                [r.description.manufacturer for r in rows],
                [r.description.model for r in rows],
                [r.description.serial for r in rows],
                [r.description.firmware for r in rows],
                [r.description.hardware for r in rows],
            ),
        )


async def participant_history(conn: Conn, participant_id: str) -> list[SensorPeriod]:
    """Which wearable described how, from when to when, for every hub of the participant."""
    async with conn.cursor(row_factory=class_row(SensorPeriod)) as cur:
        await cur.execute(_PARTICIPANT_HISTORY, (participant_id,))
        return await cur.fetchall()
