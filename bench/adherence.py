"""``trialstream bench adherence``: keeping adherence current, and the cohort's answer.

docs/adherence.md's targets: adherence for 1,000 participants x 90 days of 1 Hz data kept
current while ingestion runs at half its peak, its extra cost per batch as a ratio to
ingestion without it; and the cohort's answer (a site's participants x days) in under
200 ms at that size, median and p99. Against a scratch database on the given server:

1. A study of ``--participants`` participants, consented ``--days`` days ago, a schedule
   (heart rate 1 Hz worn 16 h a day, glucose four times a day) and their adherence days
   up to yesterday, as ``adherence.refresh`` would have left them (inserted directly: 90
   days of 1 Hz data is 7.8 billion readings, which no benchmark run stores); today's
   15-minute slots so far, which today's batches add to, go through the deltas and the
   refresh as a batch's would.
2. Ingestion: the bulk writer storing batches of envelopes (``--batch-readings`` readings,
   60 a participant, 1 Hz heart rate of today) with adherence kept (the writer as shipped)
   and without it (``storage.deltas.add`` with ``adherence=False``), alternating rounds of
   ``--rounds`` batches; then the refresh that merges what a with-adherence round added
   (``adherence.refresh``), timed and counted per batch. The ratio: (time per batch with,
   refresh share included) / (time per batch without). The refresh runs every 30 s in the
   gateway; a round's refresh time against 30 s of ingestion at half the peak says whether
   it keeps up.
3. The cohort's answer: ``adherence.cohort`` for every participant over the default 14 days
   and over the whole 92-day maximum, plus the JSON the API makes of it, ``--queries``
   times each; baseline, in the same run: the bare read of the same cells (mean adherence
   per participant and day straight from adherence_days, no schedule, no study period),
   the floor any answer pays.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any, TextIO

from bench.common import (
    SITE,
    STUDY,
    Progress,
    create_study,
    database_name,
    machine,
    scratch_database,
    server_version,
)
from ingest.model import AcceptedEnvelope, Batch, Reading
from storage import adherence, db, deltas, schedules
from storage.migrate import migrate, recorded_mode
from storage.schedules import Expectation, ScheduleKind
from storage.writer import BulkWriter

READINGS_PER_PARTICIPANT = 60  # a minute of 1 Hz heart rate per envelope
REFRESH_EVERY_S = 30.0  # the gateway's maintenance interval
DEFAULT_SPAN_DAYS = 14
MAX_SPAN_DAYS = 92

_SEED_DAYS = """
INSERT INTO adherence_days (participant_id, metric, day, readings, invalid, worn_minutes)
SELECT p.participant_id, m.metric, d::date,
       CASE m.metric WHEN 'heart_rate' THEN w * 60 ELSE 3 + (h %% 2) END,
       (h %% 7),
       CASE m.metric WHEN 'heart_rate' THEN w ELSE 3 + (h %% 2) END
FROM participants p
CROSS JOIN (VALUES ('heart_rate'), ('glucose')) AS m (metric)
CROSS JOIN generate_series(%(first)s::date, %(last)s::date, interval '1 day') AS d
CROSS JOIN LATERAL (SELECT abs(hashtext(p.participant_id || d::text)) AS h) hh
CROSS JOIN LATERAL (SELECT 600 + (hh.h %% 400) AS w) ww
"""
# Today so far, through the path batches take: one delta of every participant's slots, which
# the refresh merges and sums into today's day.
_SEED_TODAY = """
INSERT INTO adherence_deltas (participant_ids, metrics, slots, readings, invalid, minutes)
SELECT array_agg(p.participant_id), array_agg('heart_rate'::text), array_agg(s),
       array_agg(900), array_agg(0), array_agg(32767)
FROM participants p
CROSS JOIN generate_series(%(first)s::bigint, %(last)s::bigint) AS s
"""
_BARE_CELLS = """
SELECT participant_id, day, avg(least(1, worn_minutes / 960.0))::float8 AS adherence,
       count(*)::int AS metrics
FROM adherence_days
WHERE participant_id = ANY(%(ids)s) AND day BETWEEN %(first)s AND %(last)s
GROUP BY participant_id, day ORDER BY participant_id, day
"""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _seed(url: str, participants: int, days: int, say: Progress) -> list[str]:
    now = datetime.now(UTC)
    ids = [f"P{i:05d}" for i in range(participants)]
    async with db.connection(url) as conn:
        document = await create_study(conn, "Adherence benchmark", now - timedelta(days=days))
        await conn.execute(
            "INSERT INTO participants (participant_id, study_id, site_id, enrolled_at)"
            " SELECT unnest(%s::text[]), %s, %s, %s",
            (ids, STUDY, SITE, now - timedelta(days=days + 1)),
        )
        await conn.execute(
            "INSERT INTO consents (participant_id, document_id, action, scopes, signer_name,"
            " signed_at, meaning, document_sha256, recorded_by, effective_at)"
            " SELECT p, %s, 'consent', ARRAY['heart_rate', 'glucose'], p, %s, 'consent',"
            " '\\x00', 'bench', %s FROM unnest(%s::text[]) AS p",
            (document, now - timedelta(days=days), now - timedelta(days=days), ids),
        )
        for metric, expectation in (
            ("heart_rate", Expectation(ScheduleKind.CONTINUOUS, rate_hz=1.0, wear_hours=16)),
            ("glucose", Expectation(ScheduleKind.SPOT, per_day=4)),
        ):
            await schedules.set_schedule(
                conn,
                STUDY,
                metric,
                expectation,
                effective_from=date(2020, 1, 1),
                actor="bench",
            )
        today = now.date()
        await conn.execute(
            _SEED_DAYS,
            {"first": today - timedelta(days=days - 1), "last": today - timedelta(days=1)},
        )
        midnight = int(datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp())
        await conn.execute(
            _SEED_TODAY, {"first": midnight // 900, "last": int(now.timestamp()) // 900}
        )
        await conn.commit()
        await adherence.refresh(conn)
    async with db.connection(url, autocommit=True) as conn:
        await conn.execute("VACUUM ANALYZE adherence_days")
        await conn.execute("VACUUM ANALYZE adherence_slots")
    say(f"seeded {participants} participants x {days} days of adherence (2 metrics)")
    return ids


def _batch(ids: list[str], first: int, count: int, seq0: int, t_ms: int) -> Batch:
    envelopes = []
    for k in range(count):
        pid = ids[(first + k) % len(ids)]
        seq = seq0 + k
        readings = tuple(
            Reading(t_ms + i * 1000, "heart_rate", 70.0, "/min", "strap")
            for i in range(READINGS_PER_PARTICIPANT)
        )
        envelopes.append(
            AcceptedEnvelope(
                dev=f"hub-{pid}",
                seq=seq,
                participant_id=pid,
                sent_ms=t_ms + 60_000,
                envelope_sha256=hashlib.sha256(f"{pid}/{seq}".encode()).digest(),
                reading_count=len(readings),
                readings=readings,
                consent_ids=(None,) * len(readings),
            )
        )
    return Batch(tuple(envelopes), (), t_ms + 61_000)


async def _ingest(
    url: str, ids: list[str], batch_readings: int, rounds: int, say: Progress
) -> dict[str, Any]:
    per_batch = max(1, batch_readings // READINGS_PER_PARTICIPANT)
    pool = await db.open_pool(url, min_size=1, max_size=2)
    shipped = deltas.add
    timings: dict[str, list[float]] = {"with": [], "without": []}
    refreshes: list[float] = []
    try:
        async with pool.connection() as conn:
            mode = await recorded_mode(conn)
        assert mode is not None
        w = BulkWriter(pool, mode)
        # An hour ago, but never before today's midnight: the seeded days before today have
        # no slots behind them, and a refresh rebuilds a day it touches from its slots.
        wall_ms = int(time.time() * 1000)
        now_ms = max(wall_ms - 3_600_000, wall_ms // 86_400_000 * 86_400_000)
        seq = 0
        for r in range(rounds * 2):
            variant = "with" if r % 2 == 0 else "without"
            # Without: the writer's deltas as before adherence (rollups alone, plain mode).
            deltas.add = shipped if variant == "with" else partial(shipped, adherence=False)
            start = time.perf_counter()
            for b in range(10):
                await w.write(_batch(ids, seq, per_batch, seq, now_ms + (r * 10 + b) * 60_000))
                seq += per_batch
            timings[variant].append((time.perf_counter() - start) / 10)
            if variant == "with":
                async with pool.connection() as conn:
                    t0 = time.perf_counter()
                    await adherence.refresh(conn)
                    refreshes.append(time.perf_counter() - t0)
            ms = timings[variant][-1] * 1000
            say(f"ingest round {r + 1}/{rounds * 2} ({variant}): {ms:.1f} ms a batch")
    finally:
        deltas.add = shipped
        await pool.close()
    without = statistics.median(timings["without"])
    with_ = statistics.median(timings["with"])
    refresh_per_batch = statistics.median(refreshes) / 10
    peak_batches_s = 1 / without
    # At half the peak, 30 s of ingestion is this many batches; one refresh merges them.
    batches_per_refresh = peak_batches_s / 2 * REFRESH_EVERY_S
    return {
        "batch_readings": per_batch * READINGS_PER_PARTICIPANT,
        "batch_s_without": round(without, 5),
        "batch_s_with": round(with_, 5),
        "refresh_s_per_10_batches": round(statistics.median(refreshes), 5),
        "ratio_with_to_without": round((with_ + refresh_per_batch) / without, 3),
        "peak_readings_s_without": round(peak_batches_s * per_batch * READINGS_PER_PARTICIPANT),
        "refresh_s_at_half_peak_estimated": round(refresh_per_batch * batches_per_refresh, 3),
        "refresh_interval_s": REFRESH_EVERY_S,
    }


async def _cohort(url: str, ids: list[str], span_days: int, queries: int) -> dict[str, Any]:
    last = datetime.now(UTC).date()
    first = last - timedelta(days=span_days - 1)
    answer, bare = [], []
    cells = 0
    async with db.connection(url, autocommit=True) as conn:
        for _ in range(queries):
            t0 = time.perf_counter()
            got = await adherence.cohort(conn, ids, first, last)
            json.dumps(
                [
                    {"participant_id": c.participant_id, "day": c.day.isoformat(),
                     "adherence": c.adherence, "metrics_expected": c.metrics_expected,
                     "metrics_met": c.metrics_met}
                    for c in got
                ]
            )  # fmt: skip
            answer.append(time.perf_counter() - t0)
            cells = len(got)
            t0 = time.perf_counter()
            cur = await conn.execute(
                _BARE_CELLS, {"ids": ids, "first": first, "last": last}, prepare=False
            )
            await cur.fetchall()
            bare.append(time.perf_counter() - t0)
    return {
        "span_days": span_days,
        "cells": cells,
        "answer_ms_median": round(statistics.median(answer) * 1000, 1),
        "answer_ms_p99": round(_percentile(answer, 0.99) * 1000, 1),
        "bare_ms_median": round(statistics.median(bare) * 1000, 1),
        "ratio_median": round(statistics.median(answer) / statistics.median(bare), 2),
    }


async def run(
    server_url: str,
    *,
    participants: int = 1000,
    days: int = 90,
    batch_readings: int = 6000,
    rounds: int = 5,
    queries: int = 30,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    say = Progress(progress)
    async with scratch_database(server_url, "bench_adherence") as url:
        async with db.connection(url, autocommit=True) as conn:
            report = await migrate(conn)
        say(f"scratch database {database_name(url)} ({report.mode} mode)")
        ids = await _seed(url, participants, days, say)
        ingest = await _ingest(url, ids, batch_readings, rounds, say)
        say(f"ingest: {ingest['ratio_with_to_without']}x the time a batch without adherence")
        cohorts = []
        for span in (DEFAULT_SPAN_DAYS, MAX_SPAN_DAYS):
            cohorts.append(await _cohort(url, ids, min(span, days), queries))
            c = cohorts[-1]
            say(
                f"cohort {c['span_days']} days x {participants}: median {c['answer_ms_median']}"
                f" ms, p99 {c['answer_ms_p99']} ms (bare read {c['bare_ms_median']} ms)"
            )
        version = await server_version(url)
    return {
        "benchmark": "adherence",
        "machine": machine(),
        "postgresql": version,
        "mode": str(report.mode),
        "participants": participants,
        "days": days,
        "ingest": ingest,
        "cohort": cohorts,
        "targets": {"cohort_p99_ms": 200, "note": "ratios are against baselines of this run"},
    }
