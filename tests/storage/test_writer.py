from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import replace

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from ingest.model import (
    AcceptedEnvelope,
    Batch,
    Gap,
    Reading,
    Reason,
    Refusal,
    RejectedEnvelope,
    SensorReport,
)
from storage import db, rollups
from storage.errors import BatchWriteError
from storage.migrate import StorageMode
from storage.partitions import existing_partitions, partition_start_ms
from storage.writer import BulkWriter
from tests.fixtures.postgres import compress_old_chunks
from tests.fixtures.trial import Trial

T0 = 1_795_000_000_000  # 2026-11-18, inside the pre-created partitions' range


def envelope(
    dev: str,
    seq: int,
    n: int = 5,
    *,
    value: float = 70.0,
    t0: int = T0,
    refusals: Sequence[Refusal] = (),
    gaps: Sequence[Gap] = (),
) -> AcceptedEnvelope:
    readings = tuple(
        Reading(
            t_ms=t0 + seq * 10_000 + i * 1000,
            metric="heart_rate",
            value=value + i,
            unit="/min",
            sensor="hr-strap-1",
        )
        for i in range(n)
    )
    return AcceptedEnvelope(
        dev=dev,
        seq=seq,
        participant_id=f"P-{dev}",
        sent_ms=t0 + seq * 10_000 + n * 1000,
        envelope_sha256=hashlib.sha256(f"{dev}/{seq}".encode()).digest(),
        reading_count=n + sum(r.count for r in refusals),
        readings=readings,
        consent_ids=(None,) * n,
        refusals=tuple(refusals),
        gaps=tuple(gaps),
    )


def batch(*accepted: AcceptedEnvelope, rejected: Sequence[RejectedEnvelope] = ()) -> Batch:
    return Batch(accepted=accepted, rejected=tuple(rejected), received_ms=T0 + 3_600_000)


async def counts(url: str) -> dict[str, int]:
    out = {}
    async with db.connection(url, autocommit=True) as conn:
        for table in ("envelopes", "readings", "rejections", "gaps"):
            cur = await conn.execute(f"SELECT count(*) FROM {table}")
            row = await cur.fetchone()
            assert row is not None
            out[table] = int(row[0])
    return out


async def test_overlapping_batches_store_each_reading_exactly_once(
    pool: AsyncConnectionPool, database_url: str, storage_mode: StorageMode
) -> None:
    writer = BulkWriter(pool, storage_mode)
    first = await writer.write(batch(envelope("A", 1), envelope("A", 2), envelope("B", 1)))
    second = await writer.write(batch(envelope("A", 2), envelope("A", 3), envelope("B", 1)))
    third = await writer.write(batch(envelope("A", 1), envelope("A", 3), envelope("B", 2)))
    assert [(o.dev, o.seq, o.new) for o in first] == [
        ("A", 1, True),
        ("A", 2, True),
        ("B", 1, True),
    ]
    assert [(o.dev, o.seq, o.new) for o in second] == [
        ("A", 2, False),
        ("A", 3, True),
        ("B", 1, False),
    ]
    assert [(o.dev, o.seq, o.new) for o in third] == [
        ("A", 1, False),
        ("A", 3, False),
        ("B", 2, True),
    ]
    # A replay reports what was stored the first time, so its receipt can be sent again.
    assert all(o.stored == 5 for o in first + second + third)
    assert await counts(database_url) == {
        "envelopes": 5,
        "readings": 25,
        "rejections": 0,
        "gaps": 0,
    }
    async with db.connection(database_url) as conn:
        cur = await conn.execute(
            "SELECT device_id, seq, count(*), count(DISTINCT time) FROM readings"
            " GROUP BY 1, 2 ORDER BY 1, 2"
        )
        assert await cur.fetchall() == [
            ("A", 1, 5, 5),
            ("A", 2, 5, 5),
            ("A", 3, 5, 5),
            ("B", 1, 5, 5),
            ("B", 2, 5, 5),
        ]


async def test_refused_readings_gaps_and_rejected_envelopes_leave_rows(
    pool: AsyncConnectionPool, database_url: str, storage_mode: StorageMode
) -> None:
    writer = BulkWriter(pool, storage_mode)
    refusal = Refusal(
        Reason.SCOPE_NOT_CONSENTED, count=3, first_ms=T0, last_ms=T0 + 2000, metric="spo2"
    )
    gap = Gap(T0 - 60_000, T0 - 1000, "out_of_range")
    rejected = RejectedEnvelope(
        Reason.BAD_SIGNATURE,
        "signature does not verify",
        "dct/v1/C/up",
        b"\x01" * 32,
        dev="C",
        seq=9,
        reading_count=4,
    )
    out = await writer.write(
        batch(envelope("A", 1, refusals=[refusal], gaps=[gap]), rejected=[rejected])
    )
    assert [(o.stored, o.refused) for o in out] == [(5, 3)]
    # Replaying the envelope adds no second refusal row; the rejected one is recorded each time.
    await writer.write(batch(envelope("A", 1, refusals=[refusal], gaps=[gap]), rejected=[rejected]))
    assert await counts(database_url) == {"envelopes": 1, "readings": 5, "rejections": 3, "gaps": 1}
    async with db.connection(database_url) as conn:
        cur = await conn.execute(
            "SELECT reason, metric, reading_count FROM rejections ORDER BY rejection_id"
        )
        assert await cur.fetchall() == [
            ("bad_signature", None, 4),
            ("scope_not_consented", "spo2", 3),
            ("bad_signature", None, 4),
        ]


async def test_failing_batch_stores_nothing_and_names_the_envelope(
    pool: AsyncConnectionPool, database_url: str, storage_mode: StorageMode
) -> None:
    writer = BulkWriter(pool, storage_mode)
    await writer.write(batch(envelope("A", 1)))
    before = await counts(database_url)
    with pytest.raises(BatchWriteError) as info:
        await writer.write(
            batch(envelope("A", 2), envelope("B", 7, value=math.nan), envelope("A", 3))
        )
    assert info.value.envelope == ("B", 7)
    assert "B#7" in str(info.value)
    assert await counts(database_url) == before
    # The writer is still usable afterwards.
    await writer.write(batch(envelope("A", 2)))
    assert (await counts(database_url))["envelopes"] == 2


async def test_pool_survives_terminated_backends_between_batches(
    pool: AsyncConnectionPool, database_url: str, pg_server: object, storage_mode: StorageMode
) -> None:
    writer = BulkWriter(pool, storage_mode)
    for seq in range(1, 4):
        await writer.write(batch(envelope("A", seq)))
        # Kill every backend of this database, as a restart or failover would.
        async with db.connection(database_url, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            row = await cur.fetchone()
            assert row is not None
            assert row[0] >= 1
    assert await counts(database_url) == {
        "envelopes": 3,
        "readings": 15,
        "rejections": 0,
        "gaps": 0,
    }


@pytest.mark.plain_only("partitions are plain mode's: TimescaleDB makes its own chunks")
async def test_backfilled_readings_get_their_partition_created(
    pool: AsyncConnectionPool, database_url: str
) -> None:
    writer = BulkWriter(pool, StorageMode.PLAIN)
    old = T0 - 90 * 86_400_000  # a quarter earlier: a glucose meter's stored records
    await writer.write(batch(envelope("A", 1, t0=old), envelope("A", 2)))
    async with db.connection(database_url) as conn:
        parts = await existing_partitions(conn)
        cur = await conn.execute(
            "SELECT count(*) FROM readings WHERE time < to_timestamp(%s)", (T0 / 1000,)
        )
        row = await cur.fetchone()
    assert partition_start_ms(old + 10_000) in parts
    assert partition_start_ms(T0 + 20_000) in parts
    assert row == (5,)


@pytest.mark.plain_only("partitions are plain mode's: TimescaleDB makes its own chunks")
async def test_unknown_partition_failure_is_typed(pool: AsyncConnectionPool) -> None:
    """In plain mode the writer creates partitions; a writer told the wrong mode fails typed."""
    writer = BulkWriter(pool, StorageMode.TIMESCALEDB)
    with pytest.raises(BatchWriteError) as info:
        await writer.write(batch(envelope("Z", 1, t0=T0 - 400 * 86_400_000)))
    assert info.value.envelope == ("Z", 1)
    assert isinstance(info.value.__cause__, psycopg.Error)


async def test_reused_seq_with_other_content_is_a_recorded_conflict(
    pool: AsyncConnectionPool, database_url: str, storage_mode: StorageMode
) -> None:
    writer = BulkWriter(pool, storage_mode)
    await writer.write(batch(envelope("A", 1)))
    other = envelope("A", 1, value=90.0)
    other = AcceptedEnvelope(
        **{**{f: getattr(other, f) for f in other.__slots__}, "envelope_sha256": b"\x02" * 32}
    )
    (outcome,) = await writer.write(batch(other))
    assert (outcome.new, outcome.conflict, outcome.stored, outcome.refused) == (False, True, 0, 5)
    assert await counts(database_url) == {"envelopes": 1, "readings": 5, "rejections": 1, "gaps": 0}
    async with db.connection(database_url) as conn:
        cur = await conn.execute("SELECT reason, device_id, seq, reading_count FROM rejections")
        assert await cur.fetchall() == [("duplicate", "A", 1, 5)]
        cur = await conn.execute("SELECT DISTINCT value FROM readings WHERE value >= 90")
        assert await cur.fetchall() == []


async def test_sensor_reports_fill_the_sensors_table(
    trial: Trial, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    """Newest report wins; a field a report leaves out keeps what was known."""
    writer = BulkWriter(pool, storage_mode)
    first = replace(
        envelope("hub-1", 1),
        sensors=(SensorReport("hr-strap-1", "Acme", "HRM-2", "SN-1", "1.0", None, 90),),
    )
    second = replace(
        envelope("hub-1", 2),
        sensors=(SensorReport("hr-strap-1", None, None, None, "1.1", None, 85),),
    )
    await writer.write(batch(first))
    await writer.write(batch(second))
    await writer.write(batch(first))  # a replay changes nothing
    async with db.connection(trial.url) as conn:
        cur = await conn.execute(
            "SELECT manufacturer, model, serial, firmware, battery_level FROM sensors"
            " WHERE device_id = 'hub-1' AND sensor = 'hr-strap-1'"
        )
        assert await cur.fetchall() == [("Acme", "HRM-2", "SN-1", "1.1", 85)]


async def test_hypertable_mode_stores_exactly_once_even_into_compressed_chunks(
    timescale_database_url: str,
) -> None:
    from storage.migrate import ModeRequest, migrate

    async with db.connection(timescale_database_url, autocommit=True) as conn:
        report = await migrate(conn, ModeRequest.TIMESCALEDB)
        # The policy is run by hand below; its scheduled run would race with that.
        cur = await conn.execute(
            "SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs"
            " WHERE proc_name = 'policy_compression' AND hypertable_name = 'readings'"
        )
        assert len(await cur.fetchall()) == 1
    assert report.mode is StorageMode.TIMESCALEDB
    pool = await db.open_pool(timescale_database_url)
    try:
        writer = BulkWriter(pool, StorageMode.TIMESCALEDB)
        old = T0 - 60 * 86_400_000
        await writer.write(batch(envelope("A", 1, t0=old), envelope("A", 2)))
        await writer.write(batch(envelope("A", 2), envelope("A", 3)))
        async with db.connection(timescale_database_url, autocommit=True) as conn:
            # Run the compression policy now: chunks past 14 days are compressed.
            assert await compress_old_chunks(conn) >= 1
        # A hub's late backfill lands in the compressed chunk, once.
        await writer.write(batch(envelope("A", 4, t0=old + 3_600_000), envelope("A", 1, t0=old)))
        async with db.connection(timescale_database_url) as conn:
            cur = await conn.execute("SELECT count(*), count(DISTINCT (seq, time)) FROM readings")
            assert await cur.fetchone() == (20, 20)
            cur = await conn.execute("SELECT count(*) FROM envelopes")
            assert await cur.fetchone() == (4,)
    finally:
        await pool.close()


async def rollups_and_truth(url: str) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """``readings_1h`` and the same hours computed from the readings the device did not
    doubt (means rounded)."""
    async with db.connection(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT participant_id, metric, bucket, n, round(mean::numeric, 9), min, max"
            " FROM readings_1h ORDER BY 1, 2, 3"
        )
        stored = await cur.fetchall()
        cur = await conn.execute(
            "SELECT participant_id, metric,"
            " to_timestamp(floor(extract(epoch FROM time) / 3600) * 3600), count(*),"
            " round(avg(value)::numeric, 9), min(value), max(value) FROM readings"
            " WHERE NOT reading_in_doubt(flags) GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        )
        return stored, await cur.fetchall()


@pytest.mark.plain_only(
    "plain mode's rollup table and its refresh: TimescaleDB keeps a continuous aggregate"
)
async def test_plain_rollups_merge_each_stored_batch_once_and_recompute_withdrawn_hours(
    pool: AsyncConnectionPool, database_url: str
) -> None:
    writer = BulkWriter(pool, StorageMode.PLAIN)
    hour = 3_600_000
    late = T0 - 5 * hour  # a backfilled hour, after the current one was rolled up
    await writer.write(batch(envelope("A", 1, 4, value=50.0), envelope("B", 1, 3, value=90.0)))
    await writer.write(batch(envelope("A", 2, 6, value=40.0), envelope("A", 1, 4, value=50.0)))
    async with db.connection(database_url, autocommit=True) as conn:
        assert await rollups.refresh_rollups(conn, StorageMode.PLAIN) == 2
    stored, truth = await rollups_and_truth(database_url)
    assert stored == truth
    assert [r[3] for r in stored] == [10, 3]  # the replayed A#1 counted once
    # More of the same hour, a backfilled hour, and A's readings of the backfilled hour
    # withdrawn again before the next refresh, which must then recompute it to nothing.
    await writer.write(batch(envelope("A", 3, 2, value=200.0), envelope("A", 4, 2, t0=late)))
    await writer.write(batch(envelope("B", 2, 2, value=10.0, t0=late)))
    async with db.connection(database_url) as conn, conn.transaction():
        await conn.execute(
            "DELETE FROM readings WHERE participant_id = 'P-A' AND time < to_timestamp(%s)",
            ((T0 - hour) / 1000,),
        )
        await rollups.invalidate_rollups(conn, ["P-A"], ["heart_rate"], [(late + 40_000) // hour])
    async with db.connection(database_url, autocommit=True) as conn:
        assert await rollups.refresh_rollups(conn, StorageMode.PLAIN) == 3
        assert await rollups.refresh_rollups(conn, StorageMode.PLAIN) == 0
    stored, truth = await rollups_and_truth(database_url)
    assert stored == truth
    assert [(r[0], r[3], r[5], r[6]) for r in stored] == [
        ("P-A", 12, 40.0, 201.0),
        ("P-B", 2, 10.0, 11.0),
        ("P-B", 3, 90.0, 92.0),
    ]
