"""Hourly rollups leave out the readings the device put in doubt (migration 0021): the SQL
function that says so agrees with the flag registry, both modes' rollups skip them as they
arrive, plain mode's recomputed hours skip them, and the migration rebuilds an existing
plain table without them."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from psycopg_pool import AsyncConnectionPool

from ingest.flags import REGISTERED, in_doubt
from ingest.model import AcceptedEnvelope
from storage import db, rollups
from storage import migrate as migrate_module
from storage.migrate import ModeRequest, StorageMode, available_migrations, migrate
from storage.timeconv import from_ms
from storage.writer import BulkWriter
from tests.fixtures.postgres import ensure_test_partitions
from tests.storage.test_writer import T0, batch, envelope

HOUR = 3_600_000
HOUR0 = T0 - T0 % HOUR  # the hour T0 falls in; the envelopes below stay inside it
BEFORE_ROLLUPS_LEAVE_DOUBT = 20


def flagged(env: AcceptedEnvelope, *flags_by_index: tuple[str, ...]) -> AcceptedEnvelope:
    """``env`` with its i-th reading carrying ``flags_by_index[i]`` (empty: no flags)."""
    readings = tuple(
        r._replace(flags=flags_by_index[i]) if i < len(flags_by_index) else r
        for i, r in enumerate(env.readings)
    )
    return replace(env, readings=readings)


async def test_the_sql_function_agrees_with_the_flag_registry(database_url: str) -> None:
    cases: list[tuple[str, ...]] = [(f,) for f in sorted(REGISTERED)]
    cases += [("site_armpit",), ("sample_capillary_plasma",), ("a_flag_of_a_newer_hub",)]
    cases += [("site_armpit", "poor_signal"), ("irregular_pulse", "no_sensor_contact")]
    async with db.connection(database_url, autocommit=True) as conn:
        for flags in cases:
            cur = await conn.execute("SELECT reading_in_doubt(%s::text[])", (list(flags),))
            assert await cur.fetchone() == (in_doubt(flags),), flags
        cur = await conn.execute("SELECT reading_in_doubt(NULL)")
        assert await cur.fetchone() == (False,)


async def test_rollups_leave_out_what_the_device_doubted(
    pool: AsyncConnectionPool, database_url: str, storage_mode: StorageMode
) -> None:
    writer = BulkWriter(pool, storage_mode)
    # One hour: 70 and 71 clean, 250 without sensor contact, 73 at the armpit (context
    # only), 74 on a loose cuff. The next hour: only doubted readings.
    first = flagged(
        envelope("A", 1, 5, value=70.0, t0=HOUR0),
        (),
        (),
        ("no_sensor_contact",),
        ("site_armpit",),
        ("cuff_loose",),
    )
    first = replace(
        first,
        readings=tuple(
            r._replace(value=250.0) if r.flags == ("no_sensor_contact",) else r
            for r in first.readings
        ),
    )
    later = flagged(
        envelope("A", 2, 2, value=300.0, t0=HOUR0 + HOUR),
        ("poor_signal",),
        ("invalid_measurement",),
    )
    await writer.write(batch(first, later))
    async with db.connection(database_url, autocommit=True) as conn:
        await rollups.refresh_rollups(conn, storage_mode)
        rows = await rollups.hourly(conn, "P-A", from_ms(HOUR0 - HOUR))
    assert [(r.bucket, r.n, r.min, r.max) for r in rows] == [(from_ms(HOUR0), 3, 70.0, 73.0)]
    assert rows[0].mean == pytest.approx((70.0 + 71.0 + 73.0) / 3)
    if storage_mode is StorageMode.TIMESCALEDB:
        # What the policy materialises says the same as real-time aggregation did.
        async with db.connection(database_url, autocommit=True) as conn:
            await conn.execute("CALL refresh_continuous_aggregate('readings_1h', NULL, NULL)")
            await conn.execute(
                "ALTER MATERIALIZED VIEW readings_1h SET (timescaledb.materialized_only = true)"
            )
            materialized = await rollups.hourly(conn, "P-A", from_ms(HOUR0 - HOUR))
        assert materialized == rows


@pytest.mark.plain_only("plain mode recomputes invalidated hours itself")
async def test_a_recomputed_hour_also_leaves_them_out(
    pool: AsyncConnectionPool, database_url: str
) -> None:
    writer = BulkWriter(pool, StorageMode.PLAIN)
    env = flagged(envelope("A", 1, 4, value=60.0, t0=HOUR0), ("body_movement",))
    await writer.write(batch(env))
    async with db.connection(database_url, autocommit=True) as conn:
        await rollups.refresh_rollups(conn, StorageMode.PLAIN)
        async with conn.transaction():
            await rollups.invalidate_rollups(conn, ["P-A"], ["heart_rate"], [HOUR0 // HOUR])
        assert await rollups.refresh_rollups(conn, StorageMode.PLAIN) == 1
        rows = await rollups.hourly(conn, "P-A", from_ms(HOUR0))
    assert [(r.n, r.min, r.max) for r in rows] == [(3, 61.0, 63.0)]


@pytest.mark.plain_only("plain mode's rollup table is rebuilt by the migration")
async def test_the_migration_rebuilds_plain_rollups_without_doubted_readings(
    empty_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    everything = available_migrations(StorageMode.PLAIN)
    assert everything[BEFORE_ROLLUPS_LEAVE_DOUBT].number == BEFORE_ROLLUPS_LEAVE_DOUBT + 1
    async with db.connection(empty_database_url, autocommit=True) as conn:
        with monkeypatch.context() as m:
            m.setattr(
                migrate_module,
                "available_migrations",
                lambda mode: everything[:BEFORE_ROLLUPS_LEAVE_DOUBT],
            )
            await migrate(conn, ModeRequest.PLAIN)
        await ensure_test_partitions(conn, [HOUR0])
        # Readings and the rollup row the writer before 0021 made of them (doubted counted),
        # and a delta not yet merged.
        await conn.execute(
            "INSERT INTO readings (time, participant_id, metric, value, unit, device_id, seq,"
            " sensor, received_at, flags) SELECT %s + g * interval '1 minute', 'P-A',"
            " 'heart_rate', 60 + g, '/min', 'A', 1, 'hr-strap-1', now(),"
            " CASE WHEN g = 3 THEN ARRAY['no_sensor_contact'] END FROM generate_series(0, 3) g",
            (from_ms(HOUR0),),
        )
        await conn.execute(
            "INSERT INTO readings_1h (participant_id, metric, bucket, n, mean, min, max)"
            " VALUES ('P-A', 'heart_rate', %s, 4, 61.5, 60, 63)",
            (from_ms(HOUR0),),
        )
        await conn.execute(
            "INSERT INTO rollup_deltas (participant_ids, metrics, hours, counts, sums, mins, maxs)"
            " VALUES ('{P-A}', '{heart_rate}', %s, '{4}', '{246}', '{60}', '{63}')",
            ([HOUR0 // HOUR],),
        )
        rest = await migrate(conn, ModeRequest.PLAIN)
        assert BEFORE_ROLLUPS_LEAVE_DOUBT + 1 in rest.applied
        assert await rollups.refresh_rollups(conn, StorageMode.PLAIN) == 0
        rows = await rollups.hourly(conn, "P-A", from_ms(HOUR0) - timedelta(hours=1))
    assert [(r.bucket, r.n, r.mean, r.min, r.max) for r in rows] == [
        (from_ms(HOUR0), 3, 61.0, 60.0, 62.0)
    ]
