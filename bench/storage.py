"""``trialstream bench storage``: the bulk writer against a naive per-row INSERT.

Both run in the same process against a scratch database created (and dropped) on the given
server, so the ratio compares methods, not machines. The bulk writer stores envelopes of 100
readings in batches of 100, 1k and 10k readings (envelope dedupe + binary COPY + one
transaction per batch); the baseline INSERTs each reading on its own, committing each 1k.

Then, in plain mode, the hourly rollup refresh after each further batch of 5,000 readings
into hours that already hold ``--hour-readings`` readings each: merging what the batch
recorded (``rollup_deltas``) against recomputing the hours it touched from all their
readings (the batch's hours also marked in ``rollup_invalidations``, as a withdrawal marks
them), alternating, same data.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from typing import Any, TextIO

from bench.common import Progress, database_name, machine, scratch_database, server_version
from ingest.model import AcceptedEnvelope, Batch, Reading
from storage import db, rollups
from storage.migrate import StorageMode, migrate
from storage.partitions import ensure_partitions, partition_start_ms
from storage.writer import BulkWriter

READINGS_PER_ENVELOPE = 100
BATCH_SIZES = (100, 1_000, 10_000)
T0_MS = 1_795_000_000_000
BASELINE_COMMIT_EVERY = 1_000
ROLLUP_PARTICIPANTS = 50
ROLLUP_ROUNDS = 6  # refreshes timed per method


def _accepted(
    dev: str, seq: int, participant_id: str, sent_ms: int, readings: tuple[Reading, ...]
) -> AcceptedEnvelope:
    return AcceptedEnvelope(
        dev=dev,
        seq=seq,
        participant_id=participant_id,
        sent_ms=sent_ms,
        envelope_sha256=hashlib.sha256(f"{dev}{seq}".encode()).digest(),
        reading_count=len(readings),
        readings=readings,
        consent_ids=(None,) * len(readings),
    )


def _envelopes(dev: str, first_seq: int, n_readings: int) -> list[AcceptedEnvelope]:
    out = []
    for k in range(n_readings // READINGS_PER_ENVELOPE):
        seq = first_seq + k
        readings = tuple(
            Reading(
                T0_MS + (seq * READINGS_PER_ENVELOPE + i) * 1000,
                "heart_rate",
                60.0 + (i % 40),
                "/min",
                "hr-1",
            )
            for i in range(READINGS_PER_ENVELOPE)
        )
        out.append(_accepted(dev, seq, "P-bench", T0_MS, readings))
    return out


async def _bulk(url: str, batch_size: int, rows: int) -> float:
    pool = await db.open_pool(url, min_size=1, max_size=2)
    try:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT mode FROM schema_info")
            row = await cur.fetchone()
        writer = BulkWriter(pool, StorageMode(str(row[0])) if row else StorageMode.PLAIN)
        per_batch = batch_size // READINGS_PER_ENVELOPE
        envs = _envelopes(f"bulk-{batch_size}", 0, rows)
        batches = [
            Batch(tuple(envs[i : i + per_batch]), (), T0_MS) for i in range(0, len(envs), per_batch)
        ]
        await writer.write(batches[0])  # partitions and pool warm before timing
        t = time.perf_counter()
        for b in batches[1:]:
            await writer.write(b)
        elapsed = time.perf_counter() - t
        return (len(batches) - 1) * batch_size / elapsed
    finally:
        await pool.close()


async def _naive(url: str, rows: int) -> float:
    envs = _envelopes("naive", 0, rows)
    async with db.connection(url) as conn:
        t = time.perf_counter()
        n = 0
        for env in envs:
            for r in env.readings:
                await conn.execute(
                    "INSERT INTO readings (time, participant_id, metric, value, unit, device_id,"
                    " seq, sensor, received_at) VALUES"
                    " (to_timestamp(%s / 1000.0), %s, %s, %s, %s, %s, %s, %s, now())",
                    (
                        r.t_ms,
                        env.participant_id,
                        r.metric,
                        r.value,
                        r.unit,
                        env.dev,
                        env.seq,
                        r.sensor,
                    ),
                )
                n += 1
                if n % BASELINE_COMMIT_EVERY == 0:
                    await conn.commit()
        await conn.commit()
        return n / (time.perf_counter() - t)


# Whether readings_1h holds what the readings themselves give, hour by hour.
_ROLLUPS_AGREE = """
WITH rolled AS (
    SELECT participant_id, bucket, n, round(mean::numeric, 6), min, max
    FROM readings_1h WHERE participant_id = ANY(%(p)s)
), truth AS (
    SELECT participant_id, to_timestamp(floor(extract(epoch FROM time) / 3600) * 3600),
           count(*), round(avg(value)::numeric, 6), min(value), max(value)
    FROM readings WHERE participant_id = ANY(%(p)s) AND NOT reading_in_doubt(flags)
    GROUP BY 1, 2
)
SELECT NOT EXISTS (SELECT * FROM rolled EXCEPT SELECT * FROM truth)
   AND NOT EXISTS (SELECT * FROM truth EXCEPT SELECT * FROM rolled)
"""


def _hour_batch(round_no: int, hour_ms: int) -> Batch:
    """One envelope of 100 readings for each rollup participant, inside the hour."""
    envs = []
    for p in range(ROLLUP_PARTICIPANTS):
        dev, seq = f"roll-{p}", round_no
        readings = tuple(
            Reading(
                hour_ms + (round_no * READINGS_PER_ENVELOPE + i) * 300 + p,
                "heart_rate",
                60.0 + ((i + p + round_no) % 40),
                "/min",
                "hr-1",
            )
            for i in range(READINGS_PER_ENVELOPE)
        )
        envs.append(_accepted(dev, seq, f"P-roll-{p}", hour_ms, readings))
    return Batch(tuple(envs), (), hour_ms)


async def _rollups(url: str, hour_readings: int, say: Progress) -> dict[str, Any]:
    """Median refresh time after a batch: merging its deltas against recomputing its hours."""
    hour_ms = T0_MS - T0_MS % rollups.HOUR_MS
    pids = [f"P-roll-{p}" for p in range(ROLLUP_PARTICIPANTS)]
    hour = hour_ms // rollups.HOUR_MS
    async with db.connection(url, autocommit=True) as conn:
        say(f"rollups: {ROLLUP_PARTICIPANTS} participant-hours of {hour_readings:,} readings")
        await ensure_partitions(conn, {partition_start_ms(hour_ms)})  # the prefill's
        await conn.execute(
            "INSERT INTO readings (time, participant_id, metric, value, unit, device_id, seq,"
            " sensor, received_at) SELECT to_timestamp((%(h)s + g / %(n)s * 3)::float8 / 1000),"
            " 'P-roll-' || (g %% %(n)s), 'heart_rate', 60 + g %% 40, '/min', 'prefill', g,"
            " 'hr-1', now() FROM generate_series(0, %(total)s - 1) g",
            {"h": hour_ms, "n": ROLLUP_PARTICIPANTS, "total": ROLLUP_PARTICIPANTS * hour_readings},
        )
        await conn.execute("ANALYZE readings")
        await rollups.invalidate_rollups(conn, pids, ["heart_rate"] * len(pids), [hour] * len(pids))
        await rollups.refresh_rollups(conn, StorageMode.PLAIN)
    pool = await db.open_pool(url, min_size=1, max_size=2)
    timings: dict[str, list[float]] = {"merge": [], "recompute": []}
    try:
        writer = BulkWriter(pool, StorageMode.PLAIN)
        for round_no in range(ROLLUP_ROUNDS * 2):
            method = ("merge", "recompute")[(round_no + round_no // 2) % 2]  # ABBA order
            await writer.write(_hour_batch(round_no, hour_ms))
            async with pool.connection() as conn:
                if method == "recompute":
                    async with conn.transaction():
                        await rollups.invalidate_rollups(
                            conn, pids, ["heart_rate"] * len(pids), [hour] * len(pids)
                        )
                t = time.perf_counter()
                await rollups.refresh_rollups(conn, StorageMode.PLAIN)
                timings[method].append((time.perf_counter() - t) * 1000)
        async with pool.connection() as conn:
            cur = await conn.execute(_ROLLUPS_AGREE, {"p": pids})
            row = await cur.fetchone()
    finally:
        await pool.close()
    merge, recompute = (statistics.median(timings[k]) for k in ("merge", "recompute"))
    say(
        f"rollups: refresh {merge:.1f} ms merging against {recompute:.1f} ms recomputing"
        f" ({recompute / merge:.0f}x)"
    )
    return {
        "participant_hours": ROLLUP_PARTICIPANTS,
        "readings_per_hour_before": hour_readings,
        "readings_per_batch": ROLLUP_PARTICIPANTS * READINGS_PER_ENVELOPE,
        "refreshes_per_method": ROLLUP_ROUNDS,
        "merge_ms_median": round(merge, 2),
        "baseline_recompute_ms_median": round(recompute, 2),
        "ratio_to_baseline": round(recompute / merge, 1),
        "rollups_agree_with_readings": bool(row and row[0]),
    }


async def run(
    server_url: str,
    *,
    rows: int = 50_000,
    hour_readings: int = 10_000,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    say = Progress(progress)
    rows = max(rows - rows % BATCH_SIZES[-1], BATCH_SIZES[-1] * 2)
    async with scratch_database(server_url, "trialstream_bench") as url:
        version = await server_version(url)
        async with db.connection(url, autocommit=True) as conn:
            report = await migrate(conn)
            if report.mode is StorageMode.PLAIN:
                span = (rows // READINGS_PER_ENVELOPE + 1) * READINGS_PER_ENVELOPE * 1000
                await ensure_partitions(
                    conn, {partition_start_ms(t) for t in range(T0_MS, T0_MS + span, 86_400_000)}
                )
        say(f"scratch database {database_name(url)} ready, mode {report.mode}")
        baseline_rows = max(rows // 5, BASELINE_COMMIT_EVERY)
        say(f"baseline: per-row INSERT of {baseline_rows} readings")
        baseline = await _naive(url, baseline_rows)
        say(f"baseline: {baseline:,.0f} rows/s")
        results = []
        for size in BATCH_SIZES:
            say(f"bulk writer: {rows} readings in batches of {size}")
            rate = await _bulk(url, size, rows)
            say(f"bulk writer @ {size}: {rate:,.0f} rows/s ({rate / baseline:.1f}x baseline)")
            results.append(
                {
                    "batch_size": size,
                    "rows_per_s": round(rate),
                    "ratio_to_baseline": round(rate / baseline, 2),
                }
            )
        rollups = (
            await _rollups(url, hour_readings, say) if report.mode is StorageMode.PLAIN else None
        )
    return {
        "benchmark": "storage",
        "machine": machine(),
        "postgresql": version,
        "mode": str(report.mode),
        "rows_per_configuration": rows,
        "readings_per_envelope": READINGS_PER_ENVELOPE,
        "baseline": {
            "method": "INSERT per reading, commit per 1k",
            "rows": baseline_rows,
            "rows_per_s": round(baseline),
        },
        "bulk": results,
        "rollup_refresh": rollups,
    }
