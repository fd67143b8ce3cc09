"""``trialstream bench export``: readings/s and peak memory of the streaming exports.

A scratch database (created and dropped on the given server) is filled by COPY with N
readings of 50 participants at 1 Hz, 100 per envelope, each participant's hub reporting one
wearable. Each measured configuration runs in a fresh child process, so its peak resident
memory (``ru_maxrss``) is its own:

- ``parquet`` / ``fhir``: :func:`storage.exports.export` of the whole study, as an admin
  (consent windows, provenance joins, streaming COPY, temp-name-then-rename, audit);
- baseline ``naive``: the same rows by one ``SELECT`` and ``fetchall()``, then one
  ``pyarrow.Table`` written to one Parquet file, the way a first version would do it, on a
  smaller count (its memory grows with the rows: at 5 million it needs gigabytes), and
  the streaming Parquet export of those same rows, for the ratio at equal counts.

Target: each streaming export under 300 MB peak at 5 million readings.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from bench.common import Progress, machine, scratch_database, server_version
from consent.records import Actor
from storage import db, registry
from storage.migrate import ModeRequest, StorageMode, migrate
from storage.partitions import ensure_partitions, partition_start_ms
from storage.users import Role

PARTICIPANTS = 50
READINGS_PER_ENVELOPE = 100
# Readings written per COPY data chunk while generating.
GENERATE_CHUNK = 200_000
T0 = datetime(2026, 1, 5, tzinfo=UTC)
TARGET_MB = 300
ADMIN = Actor("bench", Role.ADMIN)


def _peak_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _setup(url: str, rows: int, say: Progress) -> None:
    async with db.connection(url, autocommit=True) as conn:
        report = await migrate(conn, ModeRequest.PLAIN)
        per = rows // PARTICIPANTS
        span_ms = per * 1000
        t0_ms = int(T0.timestamp() * 1000)
        if report.mode is StorageMode.PLAIN:
            await ensure_partitions(
                conn,
                {partition_start_ms(t) for t in range(t0_ms, t0_ms + span_ms + 1, 86_400_000)}
                | {partition_start_ms(t0_ms + span_ms)},
            )
        async with conn.transaction():
            await registry.create_study(conn, "BENCH", "Export benchmark")
            await registry.create_site(conn, "SITE-1", "BENCH", "Site 1")
            doc = await registry.create_consent_document(
                conn,
                "BENCH",
                "ICF",
                "1.0",
                "benchmark",
                ["heart_rate", "spo2"],
                effective_at=T0 - timedelta(days=30),
            )
            for p in range(PARTICIPANTS):
                pid, dev = f"P{p:03d}", f"hub-{p:03d}"
                await registry.create_participant(
                    conn, pid, "BENCH", "SITE-1", enrolled_at=T0 - timedelta(days=10)
                )
                await registry.add_device(conn, dev, pid, b"\x00", f"fp-{p}")
                await registry.record_consent(
                    conn,
                    pid,
                    doc,
                    "consent",
                    ["heart_rate", "spo2"],
                    effective_at=T0 - timedelta(days=5),
                    recorded_by="bench",
                    signer_name=pid,
                    meaning="consent",
                )
                await conn.execute(
                    "INSERT INTO sensors (device_id, sensor, manufacturer, model, serial, firmware)"
                    " VALUES (%s, 'strap', 'Acme', 'HRM-9', %s, '4.1.7')",
                    (dev, f"SN-{p:05d}"),
                )
                # What the exports join readings to: the description valid at their time.
                await conn.execute(
                    "INSERT INTO sensor_descriptions (device_id, sensor, reported_at,"
                    " manufacturer, model, serial, firmware)"
                    " VALUES (%s, 'strap', %s, 'Acme', 'HRM-9', %s, '4.1.7')",
                    (dev, T0 - timedelta(days=5), f"SN-{p:05d}"),
                )
        cur = await conn.execute("SELECT participant_id, consent_id FROM consents")
        consent_of = {str(p): int(c) for p, c in await cur.fetchall()}
        say(f"generating {rows:,} readings by COPY")
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO envelopes (device_id, seq, participant_id, sent_at, received_at,"
                " envelope_sha256, reading_count, stored_count, refused_count)"
                " SELECT format('hub-%%s', lpad(p::text, 3, '0')), s, format('P%%s', lpad(p::text,"
                " 3, '0')), %s + s * interval '100 s', %s + s * interval '100 s' + interval '2 s',"
                " sha256(format('%%s/%%s', p, s)::bytea), 100, 100, 0"
                " FROM generate_series(0, %s) p, generate_series(0, %s) s",
                (T0, T0, PARTICIPANTS - 1, per // READINGS_PER_ENVELOPE),
            )
            async with (
                conn.cursor() as cur,
                cur.copy(
                    "COPY readings (time, participant_id, metric, value, unit, device_id, seq,"
                    " sensor, received_at, consent_id) FROM STDIN"
                ) as copy,
            ):
                buffer = io.StringIO()
                written = 0
                for p in range(PARTICIPANTS):
                    pid, dev, cid = f"P{p:03d}", f"hub-{p:03d}", consent_of[f"P{p:03d}"]
                    for i in range(per):
                        t = T0 + timedelta(seconds=i)
                        seq = i // READINGS_PER_ENVELOPE
                        received = T0 + timedelta(seconds=seq * 100 + 2)
                        metric, unit, value = (
                            ("spo2", "%", 95 + i % 5)
                            if i % 10 == 0
                            else ("heart_rate", "/min", 60 + i % 40)
                        )
                        buffer.write(
                            f"{t.isoformat()}\t{pid}\t{metric}\t{value}.0\t{unit}\t{dev}\t{seq}"
                            f"\tstrap\t{received.isoformat()}\t{cid}\n"
                        )
                        written += 1
                        if written % GENERATE_CHUNK == 0:
                            await copy.write(buffer.getvalue())
                            buffer = io.StringIO()
                await copy.write(buffer.getvalue())
        await conn.execute("ANALYZE")


async def _phase(url: str, phase: str, out: Path) -> dict[str, Any]:
    """One measured configuration, in this (child) process: ``KIND`` or ``KIND@SECONDS``
    (only readings of the first SECONDS of each participant's data)."""
    from storage.exports import ExportKind, ExportRequest, export

    kind, _, seconds = phase.partition("@")
    to_time = T0 + timedelta(seconds=int(seconds)) if seconds else None
    t = time.perf_counter()
    if kind == "naive":
        assert to_time is not None
        rows, size = await _naive(url, out, to_time)
    else:
        request = ExportRequest(ExportKind(kind), "BENCH", to_time=to_time)
        result = await export(url, ADMIN, request, out)
        rows, size = result.rows, sum(f.bytes for f in result.files)
    elapsed = time.perf_counter() - t
    return {
        "rows": rows,
        "seconds": round(elapsed, 2),
        "rows_per_s": round(rows / elapsed),
        "bytes_written": size,
        "peak_rss_mb": round(_peak_mb(), 1),
    }


async def _naive(url: str, out: Path, to_time: datetime) -> tuple[int, int]:
    import pyarrow as pa  # type: ignore[import-untyped]

    async with db.connection(url) as conn:
        cur = await conn.execute(
            "SELECT r.participant_id, r.time, r.metric, r.value, r.unit, r.device_id, r.seq,"
            " e.envelope_sha256, e.sent_at, r.received_at, r.sensor, s.manufacturer, s.model,"
            " s.serial, s.firmware, s.hardware, r.consent_id, d.version, d.title"
            " FROM readings r"
            " LEFT JOIN envelopes e ON e.device_id = r.device_id AND e.seq = r.seq"
            " LEFT JOIN sensor_history s ON s.device_id = r.device_id AND s.sensor = r.sensor"
            " AND r.time >= s.valid_from AND r.time < s.valid_to"
            " LEFT JOIN consents k ON k.consent_id = r.consent_id"
            " LEFT JOIN consent_documents d ON d.document_id = k.document_id"
            " WHERE r.time < %s ORDER BY r.participant_id, r.time",
            (to_time,),
        )
        names = [c.name for c in cur.description or ()]
        rows = await cur.fetchall()
    table = pa.Table.from_pydict(
        {name: list(col) for name, col in zip(names, zip(*rows, strict=True), strict=True)}
    )
    return len(rows), _write_one(table, out)


def _write_one(table: Any, out: Path) -> int:
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    out.mkdir(parents=True)
    pq.write_table(table, out / "all.parquet", compression="zstd")
    return (out / "all.parquet").stat().st_size


async def _child(url: str, phase: str, out: Path, say: Progress) -> dict[str, Any]:
    say(f"{phase}: running in a child process")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.export",
        "--url",
        url,
        "--phase",
        phase,
        "--out",
        str(out),
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark phase {phase} failed with exit status {proc.returncode}")
    figures: dict[str, Any] = json.loads(stdout)
    say(
        f"{phase}: {figures['rows']:,} rows, {figures['rows_per_s']:,} rows/s, "
        f"peak {figures['peak_rss_mb']} MB"
    )
    return figures


async def run(
    server_url: str,
    *,
    rows: int = 5_000_000,
    baseline_rows: int = 1_000_000,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    say = Progress(progress)
    rows = max(rows - rows % (PARTICIPANTS * READINGS_PER_ENVELOPE), 10_000)
    baseline_rows = min(baseline_rows, rows)
    async with scratch_database(server_url, "trialstream_bench_export") as url:
        version = await server_version(url)
        await _setup(url, rows, say)
        say("scratch database ready")
        window = baseline_rows // PARTICIPANTS
        with tempfile.TemporaryDirectory(
            prefix="trialstream-bench-export-", ignore_cleanup_errors=True
        ) as tmp:
            work = Path(tmp)
            results = {
                "parquet": await _child(url, "parquet", work / "parquet", say),
                "fhir": await _child(url, "fhir", work / "fhir", say),
                "baseline_naive_parquet": await _child(url, f"naive@{window}", work / "naive", say),
                # The streaming export of the baseline's rows: memory at equal row counts.
                "parquet_at_baseline_rows": await _child(
                    url, f"parquet@{window}", work / "parquet-small", say
                ),
            }
    base = results["baseline_naive_parquet"]
    small = results["parquet_at_baseline_rows"]
    return {
        "benchmark": "export",
        "machine": machine(),
        "postgresql": version,
        "readings": rows,
        "participants": PARTICIPANTS,
        "target_peak_rss_mb": TARGET_MB,
        "results": results,
        "baseline": {
            "method": "SELECT + fetchall(), one pyarrow Table, one Parquet file",
            "rows": base["rows"],
        },
        "peak_rss_ratio_naive_to_streaming_at_baseline_rows": round(
            base["peak_rss_mb"] / small["peak_rss_mb"], 2
        ),
        "met_target": all(results[k]["peak_rss_mb"] < TARGET_MB for k in ("parquet", "fhir")),
    }


def _main() -> None:
    parser = argparse.ArgumentParser(description="one phase of the export benchmark")
    parser.add_argument("--url", required=True)
    parser.add_argument("--phase", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_phase(args.url, args.phase, args.out))))


if __name__ == "__main__":
    _main()
