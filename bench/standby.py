"""``trialstream bench standby``: what the synchronous standby costs ingestion.

A PostgreSQL primary and its standby under Patroni with etcd (:mod:`gateway.patroni`), a
scratch database on them, a private Mosquitto, and the gateway's processes on the
multi-host URL (``target_session_attrs=read-write``). Measured with Patroni's synchronous
mode on (a commit returns once the standby has its WAL on disk) and off (the standby
follows asynchronously), in the order on, off, on, so that a drift over the run shows:

- commit latency: ``COMMITS`` single-row INSERTs, each its own transaction, p50 and p99;
- the gateway's publish -> receipt latency at a fixed rate (``bench ingest``'s latency run,
  10 readings per envelope), with the mean time of its batches' commit phase from its own
  histograms.

Each figure of the synchronous runs is also given as a ratio to the asynchronous run.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import psycopg

from bench.common import Progress, machine
from bench.gateway_process import quantile, receipt_latency
from bench.load import Publishers, create_trial, reset
from gateway.broker import MosquittoBroker
from gateway.patroni import PatroniCluster
from storage import db

DATABASE = "trialstream_bench_standby"
COMMITS = 1000
SIZE = 10
HUBS = 50
WORKERS = 2
RATE = 200.0  # envelopes/s: well inside what two workers store, so latency is not queueing


def commit_latency(url: str, commits: int) -> dict[str, float]:
    """Milliseconds per single-row INSERT committed on its own, p50 / p99 / mean."""
    times: list[float] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_commit (n bigint)")
        conn.execute("TRUNCATE bench_commit")
        for n in range(commits):
            t0 = time.perf_counter()
            conn.execute("INSERT INTO bench_commit VALUES (%s)", (n,))
            times.append((time.perf_counter() - t0) * 1000)
    return {
        "p50": round(quantile(times, 0.5), 3),
        "p99": round(quantile(times, 0.99), 3),
        "mean": round(statistics.fmean(times), 3),
    }


def _standby_names(url: str) -> str:
    """The primary's ``synchronous_standby_names``: empty when commits do not wait."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW synchronous_standby_names").fetchone()
    return str(row[0]) if row else ""


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


async def run(
    *,
    seconds: float = 20.0,
    rate: float = RATE,
    commits: int = COMMITS,
    hubs: int = HUBS,
    workers: int = WORKERS,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    say = Progress(progress)
    say("starting a Patroni pair (primary and synchronous standby) with etcd")
    cluster = PatroniCluster(2)
    await asyncio.to_thread(cluster.start)
    try:
        url = await db.create_database(cluster.dsn(), DATABASE)
        t0_ms = int((time.time() - 86_400) * 1000)
        trial = await create_trial(url, hubs, t0_ms - 86_400_000, 3 * 86_400_000)
        with tempfile.TemporaryDirectory(prefix="trialstream-bench-standby-") as tmp:
            workdir = Path(tmp)
            count = int(rate * seconds) + hubs
            say(f"sealing {count:,} envelopes of {SIZE} readings")
            pubs = Publishers(trial, SIZE, count, t0_ms)
            broker = MosquittoBroker(workdir / "mosquitto")
            broker.start()
            runs: list[dict[str, Any]] = []
            try:
                for synchronous in (True, False, True):
                    await asyncio.to_thread(cluster.set_synchronous, synchronous)
                    label = "synchronous" if synchronous else "asynchronous"
                    names = await asyncio.to_thread(_standby_names, url)
                    commit = await asyncio.to_thread(commit_latency, url, commits)
                    await asyncio.to_thread(reset, url)
                    at_rate = await asyncio.to_thread(
                        receipt_latency, url, broker, workdir, workers, pubs, rate, seconds
                    )
                    runs.append(
                        {
                            "mode": label,
                            "synchronous_standby_names": names,
                            "commit_ms": commit,
                            **at_rate,
                        }
                    )
                    say(
                        f"{label}: commit p50 {commit['p50']} ms p99 {commit['p99']} ms; "
                        f"receipt p50 {at_rate['latency_ms']['p50']} ms "
                        f"p99 {at_rate['latency_ms']['p99']} ms; "
                        f"{at_rate['receipts']}/{at_rate['envelopes']} receipted"
                    )
            finally:
                broker.kill()
                pubs.close()
    finally:
        await asyncio.to_thread(cluster.stop)
    base = runs[1]
    for r in (runs[0], runs[2]):
        r["ratio_to_asynchronous"] = {
            "commit_p50": _ratio(r["commit_ms"]["p50"], base["commit_ms"]["p50"]),
            "commit_p99": _ratio(r["commit_ms"]["p99"], base["commit_ms"]["p99"]),
            "receipt_p50": _ratio(r["latency_ms"]["p50"], base["latency_ms"]["p50"]),
            "receipt_p99": _ratio(r["latency_ms"]["p99"], base["latency_ms"]["p99"]),
        }
    return {
        "benchmark": "standby",
        "machine": machine(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "method": {
            "cluster": "Patroni 2 nodes + etcd on this machine (PostgreSQL 15), "
            "synchronous_mode toggled through Patroni's REST API",
            "commit": f"{commits} single-row INSERTs, autocommit",
            "receipts": f"publish -> receipt at {rate:g} envelopes/s of {SIZE} readings for "
            f"{seconds:g} s, {workers} gateway workers, private Mosquitto",
            "order": "synchronous, asynchronous, synchronous",
        },
        "runs": runs,
    }
