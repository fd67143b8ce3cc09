"""Helpers for export tests: actors, a second site, readings stored by the real bulk writer,
and readers for what the exports wrote."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.dataset as ds  # type: ignore[import-untyped]

from consent.records import Actor
from ingest.model import AcceptedEnvelope, Batch, Reading, SensorReport
from storage import db, registry
from storage.exports import parquet
from storage.users import Role
from storage.writer import BulkWriter
from tests.fixtures.postgres import database_mode
from tests.fixtures.trial import ALL_SCOPES, Hub, Trial

ADMIN = Actor("admin", Role.ADMIN)
MONITOR_A = Actor("monitor-a", Role.MONITOR, frozenset({"SITE-A"}))
CLINICIAN_A = Actor("clin-a", Role.CLINICIAN, frozenset({"SITE-A"}))
CLINICIAN_B = Actor("clin-b", Role.CLINICIAN, frozenset({"SITE-B"}))


def now_ms() -> int:
    return int(time.time() * 1000)


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


async def add_site_b_participant(trial: Trial, participant_id: str, device_id: str) -> Hub:
    """A participant at a second site of the same study (SITE-B), consented to all scopes."""
    async with db.connection(trial.url) as conn, conn.transaction():
        cur = await conn.execute("SELECT 1 FROM sites WHERE site_id = 'SITE-B'")
        if await cur.fetchone() is None:
            await registry.create_site(conn, "SITE-B", trial.study_id, "Site B")
    site_a = trial.site_id
    trial.site_id = "SITE-B"
    try:
        return await trial.add_participant(participant_id, device_id, scopes=ALL_SCOPES)
    finally:
        trial.site_id = site_a


async def consent_id_of(url: str, participant_id: str) -> int:
    async with db.connection(url) as conn:
        cur = await conn.execute(
            "SELECT max(consent_id) FROM consents WHERE participant_id = %s AND action = 'consent'",
            (participant_id,),
        )
        row = await cur.fetchone()
    assert row is not None
    assert row[0] is not None
    return int(row[0])


@dataclass(frozen=True)
class Stored:
    """Readings stored directly by the bulk writer (bypassing the gateway's consent gate)."""

    participant_id: str
    device_id: str
    seq: int
    readings: tuple[Reading, ...]
    consent_id: int | None


async def store(
    url: str,
    participant_id: str,
    device_id: str,
    seq: int,
    readings: Sequence[Reading],
    *,
    consent_id: int | None = None,
    received_ms: int | None = None,
    sent_ms: int | None = None,
    sensors: Sequence[SensorReport] = (),
) -> Stored:
    pool = await db.open_pool(url, min_size=1, max_size=1)
    try:
        env = AcceptedEnvelope(
            dev=device_id,
            seq=seq,
            participant_id=participant_id,
            sent_ms=sent_ms if sent_ms is not None else now_ms(),
            envelope_sha256=hashlib.sha256(f"{device_id}/{seq}".encode()).digest(),
            reading_count=len(readings),
            readings=tuple(readings),
            consent_ids=(consent_id,) * len(readings),
            sensors=tuple(sensors),
        )
        await BulkWriter(pool, database_mode(url)).write(
            Batch((env,), (), received_ms if received_ms is not None else now_ms())
        )
    finally:
        await pool.close()
    return Stored(participant_id, device_id, seq, tuple(readings), consent_id)


def hr(t_ms: int, value: float, *, metric: str = "heart_rate", sensor: str = "hr-1") -> Reading:
    from ingest.metrics import METRICS

    return Reading(t_ms, metric, value, METRICS[metric].unit, sensor)


def read_dataset(directory: Path) -> pa.Table:
    dataset = ds.dataset(
        directory,
        format="parquet",
        partitioning=ds.partitioning(parquet.PARTITIONING, flavor="hive"),
    )
    return dataset.to_table().sort_by([("participant_id", "ascending"), ("time", "ascending")])


def day_before_yesterday() -> datetime:
    return datetime.now(UTC) - timedelta(days=2)


def names_in(directory: Path) -> list[str]:
    """Names directly inside ``directory``, sorted (hidden ones too)."""
    return sorted(p.name for p in directory.iterdir())
