from __future__ import annotations

import psycopg
import pytest

from storage import db
from storage.errors import StorageModeError
from storage.migrate import ModeRequest, StorageMode, available_migrations, migrate
from storage.status import status
from tests.fixtures.postgres import PgServer


async def test_migrations_apply_to_empty_database_then_rerun_as_noop(
    empty_database_url: str,
) -> None:
    async with db.connection(empty_database_url, autocommit=True) as conn:
        first = await migrate(conn, ModeRequest.PLAIN)
        second = await migrate(conn, ModeRequest.AUTO)
        st = await status(conn)
    expected = tuple(m.number for m in available_migrations(StorageMode.PLAIN))
    assert first.applied == expected
    assert second.applied == ()
    assert first.mode is StorageMode.PLAIN
    assert second.mode is StorageMode.PLAIN
    # Partitions for this week and the next two are made by the first run, none by the second.
    assert first.partitions_created == 3
    assert second.partitions_created == 0
    assert st.partitions == 3
    assert st.mode is StorageMode.PLAIN
    assert st.up_to_date
    assert st.schema_version == expected[-1]
    for table in ("studies", "envelopes", "readings", "rejections", "audit_log"):
        assert st.counts[table] == 0


async def test_auto_mode_reports_what_the_server_offers(
    empty_database_url: str, pg_server: PgServer
) -> None:
    async with db.connection(empty_database_url, autocommit=True) as conn:
        report = await migrate(conn, ModeRequest.AUTO)
        cur = await conn.execute(
            "SELECT (SELECT partstrat FROM pg_partitioned_table"
            " WHERE partrelid = 'readings'::regclass)"
        )
        row = await cur.fetchone()
    assert row is not None
    if pg_server.timescaledb_available():
        assert report.mode is StorageMode.TIMESCALEDB
        assert row[0] is None
    else:
        assert report.mode is StorageMode.PLAIN
        assert row[0] == "r"  # natively range-partitioned


async def test_recorded_mode_cannot_be_changed(
    database_url: str, storage_mode: StorageMode
) -> None:
    other = (
        ModeRequest.PLAIN if storage_mode is StorageMode.TIMESCALEDB else ModeRequest.TIMESCALEDB
    )
    async with db.connection(database_url, autocommit=True) as conn:
        with pytest.raises(StorageModeError, match=f"set up in {storage_mode} mode"):
            await migrate(conn, other)


async def test_timescaledb_requested_but_absent_is_a_clear_error(
    empty_database_url: str, pg_server: PgServer
) -> None:
    if pg_server.timescaledb_available():
        pytest.skip("TimescaleDB is installed here: the absent case cannot be shown")
    async with db.connection(empty_database_url, autocommit=True) as conn:
        with pytest.raises(StorageModeError, match="CREATE EXTENSION timescaledb failed"):
            await migrate(conn, ModeRequest.TIMESCALEDB)
        cur = await conn.execute("SELECT to_regclass('readings')")
        assert (await cur.fetchone()) == (None,)


async def test_timescaledb_mode_makes_readings_a_compressed_hypertable(
    timescale_database_url: str,
) -> None:
    async with db.connection(timescale_database_url, autocommit=True) as conn:
        report = await migrate(conn, ModeRequest.TIMESCALEDB)
        cur = await conn.execute(
            "SELECT compression_enabled FROM timescaledb_information.hypertables "
            "WHERE hypertable_name = 'readings'"
        )
        row = await cur.fetchone()
        cur = await conn.execute(
            "SELECT attname, segmentby_column_index"
            " FROM timescaledb_information.compression_settings "
            "WHERE hypertable_name = 'readings' AND segmentby_column_index IS NOT NULL ORDER BY 2"
        )
        segment_by = [r[0] for r in await cur.fetchall()]
    assert report.mode is StorageMode.TIMESCALEDB
    assert row == (True,)
    assert segment_by == ["participant_id", "metric"]


async def test_audit_log_refuses_update_and_delete(database_url: str) -> None:
    async with db.connection(database_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO audit_log (actor, action, entity, entity_id, hash) "
            "VALUES ('test', 'create', 'study', 'S1', '\\x00')"
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            await conn.execute("UPDATE audit_log SET actor = 'someone else'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            await conn.execute("DELETE FROM audit_log")
        cur = await conn.execute("SELECT actor FROM audit_log")
        assert await cur.fetchall() == [("test",)]
