"""Sensor descriptions kept over time: what a report adds to the history, where a late one
goes, what a migrated database starts with, and that the write stays one statement a table."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import datetime

from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from ingest.model import AcceptedEnvelope, Batch, Reading, SensorReport
from storage import db, registry, sensors
from storage.migrate import ModeRequest, StorageMode, migrate
from storage.timeconv import from_ms
from storage.writer import BulkWriter
from tests.fixtures.pgtrace import protocol_trace, waits
from tests.fixtures.postgres import suite_storage_mode
from tests.fixtures.trial import Trial

T0 = 1_795_000_000_000  # 2026-11-18, inside the pre-created partitions' range
MINUTE = 60_000

STRAP_A = SensorReport("hr-strap", "Acme", "HRM-2", "S1", "1.0", "rev-B", 90)
STRAP_B = SensorReport("hr-strap", None, "HRM-3", "S2", "2.0", None, 100)


def envelope(seq: int, sent_ms: int, *reports: SensorReport) -> AcceptedEnvelope:
    return AcceptedEnvelope(
        dev="hub-1",
        seq=seq,
        participant_id="P1",
        sent_ms=sent_ms,
        envelope_sha256=hashlib.sha256(f"hub-1/{seq}".encode()).digest(),
        reading_count=1,
        readings=(Reading(sent_ms - 1000, "heart_rate", 70.0, "/min", "hr-strap"),),
        consent_ids=(None,),
        sensors=reports,
    )


async def write(pool: AsyncConnectionPool, *envelopes: AcceptedEnvelope) -> None:
    await BulkWriter(pool, suite_storage_mode()).write(Batch(envelopes, (), T0 + 3_600_000))


@dataclass(frozen=True, slots=True)
class Span:
    serial: str | None
    manufacturer: str | None
    model: str | None
    firmware: str | None
    hardware: str | None
    seq: int | None
    valid_from: datetime | None
    valid_to: datetime | None


async def history(url: str, sensor: str = "hr-strap") -> list[Span]:
    async with db.connection(url) as conn, conn.cursor(row_factory=class_row(Span)) as cur:
        await cur.execute(
            "SELECT serial, manufacturer, model, firmware, hardware, seq,"
            " CASE WHEN isfinite(valid_from) THEN valid_from END AS valid_from,"
            " CASE WHEN isfinite(valid_to) THEN valid_to END AS valid_to"
            " FROM sensor_history WHERE device_id = 'hub-1' AND sensor = %s"
            " ORDER BY sensor_history.valid_from, description_id",
            (sensor,),
        )
        return await cur.fetchall()


@dataclass(frozen=True, slots=True)
class Latest:
    serial: str | None
    manufacturer: str | None
    hardware: str | None
    battery_level: int | None


async def latest(url: str) -> Latest:
    async with db.connection(url) as conn, conn.cursor(row_factory=class_row(Latest)) as cur:
        await cur.execute(
            "SELECT serial, manufacturer, hardware, battery_level FROM sensors"
            " WHERE device_id = 'hub-1' AND sensor = 'hr-strap'"
        )
        row = await cur.fetchone()
    assert row is not None
    return row


async def test_a_report_that_repeats_the_description_adds_no_row(
    trial: Trial, pool: AsyncConnectionPool
) -> None:
    await write(pool, envelope(1, T0, STRAP_A))
    # The same wearable on its next connections: only the battery differs.
    await write(pool, envelope(2, T0 + MINUTE, replace(STRAP_A, battery_level=80)))
    await write(pool, envelope(3, T0 + 2 * MINUTE, replace(STRAP_A, battery_level=70)))
    await write(pool, envelope(4, T0 + 3 * MINUTE, SensorReport("hr-strap", battery_level=60)))
    assert await history(trial.url) == [Span("S1", "Acme", "HRM-2", "1.0", "rev-B", 1, None, None)]
    assert (await latest(trial.url)).battery_level == 60


async def test_a_change_is_valid_from_its_report_and_keeps_what_it_left_out(
    trial: Trial, pool: AsyncConnectionPool
) -> None:
    await write(pool, envelope(1, T0, STRAP_A))
    await write(pool, envelope(2, T0 + MINUTE, SensorReport("hr-strap", firmware="1.1")))
    assert await history(trial.url) == [
        # The first description also covers the readings before its report.
        Span("S1", "Acme", "HRM-2", "1.0", "rev-B", 1, None, from_ms(T0 + MINUTE)),
        Span("S1", "Acme", "HRM-2", "1.1", "rev-B", 2, from_ms(T0 + MINUTE), None),
    ]


async def test_another_serial_is_another_wearable_and_nothing_carries_over(
    trial: Trial, pool: AsyncConnectionPool
) -> None:
    await write(pool, envelope(1, T0, STRAP_A))
    await write(pool, envelope(2, T0 + MINUTE, STRAP_B))
    assert await history(trial.url) == [
        Span("S1", "Acme", "HRM-2", "1.0", "rev-B", 1, None, from_ms(T0 + MINUTE)),
        Span("S2", None, "HRM-3", "2.0", None, 2, from_ms(T0 + MINUTE), None),
    ]
    # The latest description follows the same rule: strap B has no manufacturer of A's.
    assert await latest(trial.url) == Latest("S2", None, None, 100)


async def test_a_late_report_is_placed_at_its_own_time(
    trial: Trial, pool: AsyncConnectionPool
) -> None:
    """An envelope delivered late (a resend after a later one was stored) puts its report
    between the descriptions around it; the later description is left as it was."""
    strap_c = SensorReport("hr-strap", "Acme", "HRM-4", "S3", "3.0", None)
    await write(pool, envelope(1, T0, STRAP_A))
    await write(pool, envelope(3, T0 + 10 * MINUTE, strap_c))
    await write(pool, envelope(2, T0 + 5 * MINUTE, STRAP_B))
    # Late, and repeating the description valid at its time: nothing to add.
    await write(pool, envelope(4, T0 + 2 * MINUTE, STRAP_A))
    assert [(s.serial, s.seq, s.valid_from, s.valid_to) for s in await history(trial.url)] == [
        ("S1", 1, None, from_ms(T0 + 5 * MINUTE)),
        ("S2", 2, from_ms(T0 + 5 * MINUTE), from_ms(T0 + 10 * MINUTE)),
        ("S3", 3, from_ms(T0 + 10 * MINUTE), None),
    ]


async def test_reports_of_one_batch_are_taken_in_report_time_order(
    trial: Trial, pool: AsyncConnectionPool
) -> None:
    await write(
        pool,
        envelope(3, T0 + 2 * MINUTE, SensorReport("hr-strap", firmware="1.1", battery_level=50)),
        envelope(1, T0, STRAP_A),
        envelope(2, T0 + MINUTE, STRAP_A),  # a repeat inside the batch
        envelope(4, T0 + 3 * MINUTE, SensorReport("hr-strap", firmware="1.1")),
    )
    assert [(s.firmware, s.seq, s.hardware) for s in await history(trial.url)] == [
        ("1.0", 1, "rev-B"),
        ("1.1", 3, "rev-B"),
    ]
    assert await latest(trial.url) == Latest("S1", "Acme", "rev-B", 50)


async def test_a_report_of_only_a_battery_level_describes_nothing(
    trial: Trial, pool: AsyncConnectionPool
) -> None:
    await write(pool, envelope(1, T0, SensorReport("hr-strap", battery_level=80)))
    assert await history(trial.url) == []
    assert await latest(trial.url) == Latest(None, None, None, 80)


async def test_a_batch_writes_its_reports_in_one_statement_a_table(
    trial: Trial, pool: AsyncConnectionPool
) -> None:
    """However many reports a batch carries (the write path is benchmarked)."""
    fresh = [
        envelope(i, T0 + i * MINUTE, SensorReport(f"s{j}", "Acme", "M", f"S{i}-{j}", None, None))
        for i in range(1, 41)
        for j in range(3)
    ]
    async with pool.connection() as conn:
        async with conn.transaction():
            with protocol_trace(conn) as messages:
                await sensors.record_reports(conn, fresh, from_ms(T0))
        sent = [m for side, m in messages if side == "F"]
        assert sent.count("Execute") == 2, sent
        assert waits(messages) == 2, messages
        cur = await conn.execute("SELECT count(*) FROM sensor_descriptions")
        assert await cur.fetchone() == (120,)


async def test_the_migration_starts_the_history_with_what_sensors_held(
    empty_database_url: str, storage_mode: StorageMode
) -> None:
    """Rows of ``sensors`` from before the history become each wearable's first description,
    valid for all its readings; a wearable never described gets no row."""
    async with db.connection(empty_database_url, autocommit=True) as conn:
        await migrate(conn, ModeRequest(storage_mode.value))
        # Back to the schema before 0012, with a wearable as the old writer left it.
        await conn.execute("DROP VIEW sensor_history")
        await conn.execute("DROP TABLE sensor_descriptions")
        await conn.execute("DELETE FROM schema_migrations WHERE number = 12")
        await registry.create_study(conn, "S1", "Study")
        await registry.create_site(conn, "SITE-A", "S1", "Site A")
        await registry.create_participant(conn, "P1", "S1", "SITE-A")
        await registry.add_device(conn, "hub-1", "P1", b"\x00", "fp")
        await conn.execute(
            "INSERT INTO sensors (device_id, sensor, manufacturer, model, serial, firmware,"
            " battery_level, first_seen, last_seen) VALUES"
            " ('hub-1', 'hr-strap', 'Acme', 'HRM-2', 'S1', '1.0', 90, %s, %s),"
            " ('hub-1', 'thermo', NULL, NULL, NULL, NULL, 40, %s, %s)",
            (from_ms(T0), from_ms(T0 + MINUTE), from_ms(T0), from_ms(T0)),
        )
        assert (await migrate(conn, ModeRequest(storage_mode.value))).applied == (12,)
    assert await history(empty_database_url) == [
        Span("S1", "Acme", "HRM-2", "1.0", None, None, None, None)
    ]
    assert await history(empty_database_url, "thermo") == []
    async with db.connection(empty_database_url) as conn:
        cur = await conn.execute(
            "SELECT reported_at FROM sensor_history"
            " WHERE device_id = 'hub-1' AND sensor = 'hr-strap'"
        )
        assert await cur.fetchone() == (from_ms(T0),)
