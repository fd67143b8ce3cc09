"""What every benchmark records beside its figures (the machine and the software), and
what most of them set up: a scratch database, a study with consented hubs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TextIO

import psutil  # type: ignore[import-untyped]
import psycopg
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from psycopg import conninfo

from ingest import keys
from ingest.metrics import METRICS
from storage import db, registry, status
from storage.migrate import StorageMode

STUDY = "BENCH"
SITE = "BENCH-SITE"
SCOPES = frozenset(m.scope for m in METRICS.values())
# The token the benchmarks' gateways accept on /metrics (TRIALSTREAM_METRICS_TOKEN).
METRICS_TOKEN = "bench-metrics-token"
METRICS_HEADERS = {"Authorization": f"Bearer {METRICS_TOKEN}"}


@contextlib.asynccontextmanager
async def scratch_database(server_url: str, prefix: str) -> AsyncIterator[str]:
    """An empty database ``<prefix>_<pid>`` on the server of ``server_url``, for one run of a
    benchmark; its URL. Dropped on the way out (ending its connections), error or not."""
    name = f"{prefix}_{os.getpid()}"
    url = await db.create_database(server_url, name)
    try:
        yield url
    finally:
        await db.drop_database(server_url, name)


def recorded_mode(url: str) -> StorageMode:
    """The storage mode recorded in the migrated database of ``url``: the one its gateways
    must run in (a gateway asking for another one refuses to start)."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT mode FROM schema_info").fetchone()
    if row is None:
        raise RuntimeError(f"{db.describe(url)} records no storage mode: migrate it first")
    return StorageMode(str(row[0]))


def database_name(url: str) -> str:
    """The database a URL names (for progress lines)."""
    return str(conninfo.conninfo_to_dict(url).get("dbname", ""))


async def server_version(url: str) -> str:
    """The PostgreSQL version of the server of ``url``, as results record it."""
    async with db.connection(url) as conn:
        return (await status.status(conn)).server_version


def machine() -> dict[str, Any]:
    """What ran the benchmark. Results are ratios to a baseline of the same run; the CPU's
    model and a fixed workload's time tell two machines apart when absolute figures (a
    share of one core) are compared across runs."""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "calibration_ms": calibration_ms(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def cpu_model() -> str | None:
    """The first processor's model name (Linux), or None."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()[:120]
    return None


def calibration_ms() -> float:
    """Milliseconds for a fixed single-threaded workload (Python arithmetic, a SHA-256 of
    1 MB, an ECDSA P-256 signature), best of five: a slower machine takes longer."""
    key = ec.generate_private_key(ec.SECP256R1())
    data = b"\x5a" * 1_000_000
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        total = 0
        for i in range(100_000):
            total += i * i % 7
        hashlib.sha256(data).digest()
        for _ in range(20):
            key.sign(data[:64], ec.ECDSA(hashes.SHA256()))
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 2)


class Progress:
    """One line per step on stderr, with the time since start: long work shows it is alive."""

    def __init__(self, out: TextIO | None) -> None:
        self._out = out
        self._t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self._out is not None:
            print(f"[{time.perf_counter() - self._t0:7.1f}s] {message}", file=self._out, flush=True)


def cpu_seconds(processes: Iterable[psutil.Process]) -> float:
    """User + system CPU time these processes have used so far (one that is gone counts 0)."""
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += float(times.user + times.system)
    return total


@dataclass(frozen=True, slots=True)
class BenchHub:
    """A simulated hub of a benchmark's scratch study. The key is kept as DER bytes so the
    hub pickles to publisher processes."""

    device_id: str
    participant_id: str
    key_der: bytes

    def key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_der_private_key(self.key_der, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key


async def create_study(conn: db.Conn, title: str, now: datetime) -> int:
    """The scratch study, its site and a consent document covering every scope; its id."""
    await registry.create_study(conn, STUDY, title)
    await registry.create_site(conn, SITE, STUDY, "Bench site")
    return await registry.create_consent_document(
        conn,
        STUDY,
        "ICF",
        "1.0",
        "Benchmark consent.",
        SCOPES,
        effective_at=now - timedelta(days=30),
    )


async def add_consented_hub(
    conn: db.Conn, document_id: int, participant_id: str, device_id: str, now: datetime
) -> BenchHub:
    """A participant enrolled three days ago, consented to every scope two days ago, with one
    hub of a fresh key."""
    key = keys.generate_private_key()
    await registry.enroll_consented(
        conn,
        registry.ConsentedHub(
            participant_id,
            STUDY,
            SITE,
            device_id,
            keys.public_key_to_der(key.public_key()),
            keys.fingerprint(key.public_key()),
            document_id,
            SCOPES,
            enrolled_at=now - timedelta(days=3),
            consent_at=now - timedelta(days=2),
            recorded_by="bench",
        ),
    )
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return BenchHub(device_id, participant_id, der)
