"""Helpers for alert tests: envelopes as the pipeline accepts them, a settable clock, and the
real bulk writer with the alert engine as its in-transaction hook."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
from psycopg_pool import AsyncConnectionPool

from gateway.alerts import AlertEngine
from ingest.model import AcceptedEnvelope, Batch, Reading
from storage import db
from storage.migrate import StorageMode
from storage.writer import BulkWriter
from tests.fixtures.trial import Trial

S = 1000


@dataclass
class Clock:
    now_ms: int

    def __call__(self) -> float:
        return self.now_ms / 1000


def base_ms() -> int:
    """A whole second an hour ago: readings are recent, so their partitions exist."""
    return (int(time.time()) - 3600) * S


def envelope(
    participant_id: str,
    dev: str,
    seq: int,
    readings: Sequence[tuple[int, float]],
    *,
    metric: str = "heart_rate",
    unit: str = "/min",
) -> AcceptedEnvelope:
    rs = tuple(Reading(t, metric, v, unit, "strap") for t, v in readings)
    return AcceptedEnvelope(
        dev=dev,
        seq=seq,
        participant_id=participant_id,
        sent_ms=max((t for t, _ in readings), default=0),
        envelope_sha256=hashlib.sha256(f"{dev}/{seq}/{readings!r}".encode()).digest(),
        reading_count=len(rs),
        readings=rs,
        consent_ids=(None,) * len(rs),
    )


@dataclass
class Ingest:
    """Stores envelopes through the real writer with the engine hooked in."""

    writer: BulkWriter
    engine: AlertEngine
    clock: Clock
    seq: int = 0

    async def __call__(
        self,
        readings: Sequence[tuple[int, float]],
        *,
        participant: str = "P1",
        dev: str = "hub-1",
        metric: str = "heart_rate",
        unit: str = "/min",
    ) -> None:
        self.seq += 1
        env = envelope(participant, dev, self.seq, readings, metric=metric, unit=unit)
        await self.writer.write(Batch((env,), (), self.clock.now_ms), also=self.engine)


@pytest.fixture
def clock() -> Clock:
    return Clock(int(time.time() * 1000))


@pytest.fixture
async def alert_pool(trial: Trial) -> AsyncIterator[AsyncConnectionPool]:
    p = await db.open_pool(trial.url, min_size=1, max_size=4)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
def ingest(alert_pool: AsyncConnectionPool, clock: Clock, storage_mode: StorageMode) -> Ingest:
    return Ingest(BulkWriter(alert_pool, storage_mode), AlertEngine(clock=clock), clock)
