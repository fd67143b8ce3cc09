"""Numbered SQL migrations and the storage mode (TimescaleDB or plain PostgreSQL).

Files in ``storage/migrations`` are named ``NNNN_name.sql``, or ``NNNN_name.MODE.sql`` where
the schema differs by mode (``plain`` or ``timescaledb``). Each applies in its own
transaction, is recorded in ``schema_migrations``, and is skipped once recorded: running
``migrate`` again is a no-op. An advisory lock keeps two gateway processes from migrating at
once. The mode is decided on the first migration and recorded in ``schema_info``; it never
changes afterwards, because the shape of ``readings`` depends on it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources

import psycopg

from storage.db import Conn
from storage.errors import MigrationError, StorageModeError, first_line
from storage.partitions import ahead, ensure_partitions

log = logging.getLogger(__name__)

# An arbitrary, fixed key for pg_advisory_lock: "trialstream migrations".
_MIGRATION_LOCK_KEY = 0x7472_6D69_6772

_NAME = re.compile(r"^(?P<num>\d{4})_(?P<name>[a-z0-9_]+?)(?:\.(?P<mode>plain|timescaledb))?\.sql$")


class StorageMode(StrEnum):
    PLAIN = "plain"
    TIMESCALEDB = "timescaledb"


class ModeRequest(StrEnum):
    AUTO = "auto"
    PLAIN = "plain"
    TIMESCALEDB = "timescaledb"


@dataclass(frozen=True, slots=True)
class Migration:
    number: int
    name: str
    sql: str


@dataclass(frozen=True, slots=True)
class MigrationReport:
    mode: StorageMode
    applied: tuple[int, ...]
    version: int
    partitions_created: int = 0


def available_migrations(mode: StorageMode) -> list[Migration]:
    """The migrations for ``mode``, in order; fails on a numbering mistake in the package."""
    by_number: dict[int, Migration] = {}
    for entry in resources.files("storage.migrations").iterdir():
        m = _NAME.match(entry.name)
        if m is None or (m["mode"] is not None and m["mode"] != mode.value):
            continue
        number = int(m["num"])
        if number in by_number:
            raise MigrationError(f"two migrations numbered {number:04d} for mode {mode}")
        by_number[number] = Migration(number, m["name"], entry.read_text(encoding="utf-8"))
    numbers = sorted(by_number)
    if numbers != list(range(1, len(numbers) + 1)):
        raise MigrationError(f"migration numbers are not contiguous from 0001: {numbers}")
    return [by_number[n] for n in numbers]


async def _timescaledb_works(conn: Conn) -> bool:
    """Whether ``CREATE EXTENSION timescaledb`` works here; it is tried only when it can.

    TimescaleDB installed but not in ``shared_preload_libraries`` ends the session with a
    FATAL error on CREATE EXTENSION, so that case is recognised from the settings first.
    """
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'),"
        " EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),"
        " 'timescaledb' = ANY(string_to_array("
        "   replace(current_setting('shared_preload_libraries'), ' ', ''), ','))"
    )
    row = await cur.fetchone()
    created, available, preloaded = row if row else (False, False, False)
    if created:
        return True
    if not available:
        log.info("timescaledb is not installed: using plain partitions")
        return False
    if not preloaded:
        log.info(
            "timescaledb is installed but not in shared_preload_libraries: using plain partitions"
        )
        return False
    try:
        async with conn.transaction():
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.OperationalError:
        raise  # the connection failed: not an answer about TimescaleDB
    except psycopg.Error as exc:
        log.info("timescaledb unavailable, using plain partitions: %s", first_line(exc))
        return False
    return True


async def recorded_mode(conn: Conn) -> StorageMode | None:
    cur = await conn.execute("SELECT to_regclass('schema_info') IS NOT NULL")
    row = await cur.fetchone()
    if row is None or not row[0]:
        return None
    cur = await conn.execute("SELECT mode FROM schema_info")
    info = await cur.fetchone()
    return StorageMode(str(info[0])) if info else None


async def schema_version(conn: Conn) -> int:
    cur = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    row = await cur.fetchone()
    if row is None or not row[0]:
        return 0
    cur = await conn.execute("SELECT coalesce(max(number), 0) FROM schema_migrations")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _decide_mode(conn: Conn, request: ModeRequest) -> StorageMode:
    existing = await recorded_mode(conn)
    if existing is not None:
        if request is not ModeRequest.AUTO and request.value != existing.value:
            raise StorageModeError(
                f"this database was set up in {existing} mode; it cannot be migrated as {request}"
            )
        if existing is StorageMode.TIMESCALEDB and not await _timescaledb_works(conn):
            raise StorageModeError(
                "this database was set up with TimescaleDB, which is no longer available "
                "(check shared_preload_libraries)"
            )
        return existing
    works = request is not ModeRequest.PLAIN and await _timescaledb_works(conn)
    if request is ModeRequest.TIMESCALEDB and not works:
        raise StorageModeError(
            "TimescaleDB mode was asked for but CREATE EXTENSION timescaledb failed "
            "(is timescaledb in shared_preload_libraries?)"
        )
    mode = StorageMode.TIMESCALEDB if works else StorageMode.PLAIN
    await conn.execute(
        "CREATE TABLE schema_info ("
        " mode text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
    )
    await conn.execute("INSERT INTO schema_info (mode) VALUES (%s)", (mode.value,))
    return mode


async def migrate(conn: Conn, request: ModeRequest = ModeRequest.AUTO) -> MigrationReport:
    """Apply every migration not yet applied. ``conn`` must be in autocommit mode."""
    if not conn.autocommit:
        raise MigrationError(
            "migrate() needs an autocommit connection (each migration is its own transaction)"
        )
    await conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_KEY,))
    try:
        async with conn.transaction():
            mode = await _decide_mode(conn, request)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " number integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
        cur = await conn.execute("SELECT number FROM schema_migrations")
        done = {int(r[0]) for r in await cur.fetchall()}
        applied: list[int] = []
        for migration in available_migrations(mode):
            if migration.number in done:
                continue
            log.info(
                "applying migration number=%04d name=%s mode=%s",
                migration.number,
                migration.name,
                mode,
            )
            try:
                async with conn.transaction():
                    await conn.execute(migration.sql.encode())
                    await conn.execute(
                        "INSERT INTO schema_migrations (number, name) VALUES (%s, %s)",
                        (migration.number, migration.name),
                    )
            except psycopg.Error as exc:
                raise MigrationError(
                    f"migration {migration.number:04d}_{migration.name} failed and was "
                    f"rolled back: {first_line(exc)}"
                ) from exc
            applied.append(migration.number)
        version = await schema_version(conn)
        created: list[int] = []
        if mode is StorageMode.PLAIN:
            # Partitions for the coming weeks, made by the schema's owner: live data never
            # waits on DDL, and a gateway running as the application role never needs it.
            cur = await conn.execute("SELECT (extract(epoch FROM now()) * 1000)::bigint")
            row = await cur.fetchone()
            assert row is not None
            created = await ensure_partitions(conn, ahead(int(row[0])))
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_KEY,))
    return MigrationReport(
        mode=mode, applied=tuple(applied), version=version, partitions_created=len(created)
    )
