"""What ``trialstream db status`` reports: mode, schema version, row counts; and what each
hub's data came to (``device_tallies``), for the cluster harness's verdict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql
from psycopg.rows import class_row

from storage.db import Conn
from storage.migrate import StorageMode, available_migrations, recorded_mode, schema_version

COUNTED_TABLES = (
    "studies",
    "sites",
    "participants",
    "devices",
    "consents",
    "envelopes",
    "readings",
    "rejections",
    "alerts",
    "audit_log",
)


@dataclass(frozen=True, slots=True)
class DatabaseStatus:
    server_version: str
    mode: StorageMode | None
    schema_version: int
    latest_version: int
    counts: dict[str, int]
    partitions: int

    @property
    def up_to_date(self) -> bool:
        return self.mode is not None and self.schema_version == self.latest_version


async def status(conn: Conn) -> DatabaseStatus:
    cur = await conn.execute("SHOW server_version")
    row = await cur.fetchone()
    server = str(row[0]) if row else "?"
    mode = await recorded_mode(conn)
    version = await schema_version(conn)
    latest = len(available_migrations(mode or StorageMode.PLAIN))
    counts: dict[str, int] = {}
    partitions = 0
    if mode is not None:
        for table in COUNTED_TABLES:
            cur = await conn.execute(sql.SQL("SELECT to_regclass({})").format(sql.Literal(table)))
            exists = await cur.fetchone()
            if exists and exists[0] is not None:
                cur = await conn.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
                )
                n = await cur.fetchone()
                counts[table] = int(n[0]) if n else 0
        if "readings" in counts:
            if mode is StorageMode.TIMESCALEDB:
                cur = await conn.execute("SELECT count(*) FROM show_chunks('readings')")
            else:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_inherits WHERE inhparent = 'readings'::regclass"
                )
            n = await cur.fetchone()
            partitions = int(n[0]) if n else 0
    return DatabaseStatus(server, mode, version, latest, counts, partitions)


@dataclass(frozen=True, slots=True)
class DeviceTally:
    """What is stored of one hub: its readings, its envelopes (how many, their highest
    sequence number, the readings they carried) and its rejection rows."""

    device_id: str
    readings: int
    envelopes: int
    max_seq: int
    carried: int
    rejections: int


async def device_tallies(conn: Conn, device_ids: Sequence[str]) -> list[DeviceTally]:
    """One tally per device id asked for, in the order asked (zeros for a device with none)."""
    async with conn.cursor(row_factory=class_row(DeviceTally)) as cur:
        await cur.execute(
            """
            SELECT d.device_id,
                   (SELECT count(*) FROM readings r WHERE r.device_id = d.device_id)::int
                       AS readings,
                   count(e.seq)::int AS envelopes,
                   coalesce(max(e.seq), 0)::int AS max_seq,
                   coalesce(sum(e.reading_count), 0)::int AS carried,
                   (SELECT count(*) FROM rejections j WHERE j.device_id = d.device_id)::int
                       AS rejections
            FROM unnest(%(ids)s::text[]) WITH ORDINALITY AS d(device_id, n)
            LEFT JOIN envelopes e ON e.device_id = d.device_id
            GROUP BY d.device_id, d.n
            ORDER BY d.n
            """,
            {"ids": list(device_ids)},
        )
        return await cur.fetchall()
