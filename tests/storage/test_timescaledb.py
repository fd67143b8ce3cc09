"""TimescaleDB mode over compressed chunks: the migrations after the first release apply to
a hypertable whose old chunks are compressed, and what they add is written into those chunks
by the writer's binary COPY and held to the same constraints as in plain mode."""

from __future__ import annotations

from dataclasses import replace

import psycopg
import pytest

from storage import db
from storage import migrate as migrate_module
from storage.migrate import ModeRequest, StorageMode, available_migrations, migrate
from storage.timeconv import from_ms
from storage.writer import BulkWriter
from tests.fixtures.postgres import compress_old_chunks
from tests.storage.test_writer import T0, batch, envelope

OLD = T0 - 60 * 86_400_000  # well past the compression policy's 14 days
BEFORE_READING_STATUS = 12


async def test_later_migrations_apply_over_compressed_chunks_and_their_columns_take_copy(
    timescale_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    everything = available_migrations(StorageMode.TIMESCALEDB)
    url = timescale_database_url
    async with db.connection(url, autocommit=True) as conn:
        with monkeypatch.context() as m:
            m.setattr(
                migrate_module,
                "available_migrations",
                lambda mode: everything[:BEFORE_READING_STATUS],
            )
            first = await migrate(conn, ModeRequest.TIMESCALEDB)
        assert first.version == BEFORE_READING_STATUS
        await conn.execute(
            "SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs"
            " WHERE job_id >= 1000"
        )
        # Readings as the writer before 0013 stored them: no flags, no device user.
        await conn.execute(
            "INSERT INTO readings (time, participant_id, metric, value, unit, device_id, seq,"
            " sensor, received_at) SELECT %s + g * interval '1 minute', 'P-A', 'heart_rate',"
            " 60, '/min', 'A', g, 'hr-strap-1', now() FROM generate_series(1, 100) g",
            (from_ms(OLD),),
        )
        assert await compress_old_chunks(conn) >= 1
        rest = await migrate(conn, ModeRequest.TIMESCALEDB)
        assert rest.applied == tuple(m.number for m in everything[BEFORE_READING_STATUS:])
        cur = await conn.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'readings'::regclass"
            " AND contype = 'c' ORDER BY conname"
        )
        assert [r[0] for r in await cur.fetchall()] == [
            "readings_device_user_check",
            "readings_flags_check",
            "readings_value_check",
        ]

    pool = await db.open_pool(url)
    try:
        writer = BulkWriter(pool, StorageMode.TIMESCALEDB)
        plain = envelope("A", 500, n=2, t0=OLD)
        said = replace(
            plain,
            readings=tuple(
                r._replace(flags=("no_sensor_contact",), user=3) for r in plain.readings
            ),
        )
        await writer.write(batch(said))
    finally:
        await pool.close()
    async with db.connection(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT flags, device_user, count(*) FROM readings GROUP BY 1, 2 ORDER BY 3"
        )
        assert await cur.fetchall() == [(["no_sensor_contact"], 3, 2), (None, None, 100)]
        # The old chunk holds them and is still compressed (now partially).
        assert await compress_old_chunks(conn) >= 1
        cur = await conn.execute(
            "SELECT flags, device_user FROM readings WHERE seq = 500 AND device_id = 'A'"
        )
        assert await cur.fetchall() == [(["no_sensor_contact"], 3)] * 2
        # The constraints hold for rows going into a compressed chunk.
        for column, bad in (("device_user", 256), ("flags", [])):
            with pytest.raises(psycopg.errors.CheckViolation, match=f"readings_{column}_check"):
                await conn.execute(
                    "INSERT INTO readings (time, participant_id, metric, value, unit,"
                    f" device_id, seq, sensor, received_at, {column})"
                    " VALUES (%s, 'P-A', 'heart_rate', 60, '/min', 'A', 9, 's', now(), %s)",
                    (from_ms(OLD + 30_000), bad),
                )
