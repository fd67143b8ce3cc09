"""The gateway's per-batch read of devices and consent (real PostgreSQL): what it returns,
that it is one round trip, and that it leaves no transaction or consent lock behind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import pq

from consent import records
from consent.gate import ConsentSnapshot
from gateway.directory import Directory
from storage import db, registry
from storage.db import Conn
from tests.fixtures.pgtrace import protocol_trace, waits
from tests.fixtures.trial import Trial


@pytest.fixture
async def conn(trial: Trial) -> AsyncIterator[Conn]:
    async with db.connection(trial.url) as c:
        yield c


async def test_a_batch_read_gives_its_devices_and_their_owners_consent_only(
    trial: Trial, conn: Conn
) -> None:
    await trial.add_participant("P2", "hub-2", scopes=frozenset({"heart_rate"}))
    await trial.add_participant("P3", "hub-3", scopes=frozenset())
    await trial.add_participant("P4", "hub-4")  # not in the batch

    devices, consent = await Directory().read(conn, ["hub-1", "hub-2", "hub-3", "hub-unknown"])

    assert sorted(devices) == ["hub-1", "hub-2", "hub-3"]
    assert {d: r.participant_id for d, r in devices.items()} == {
        "hub-1": "P1",
        "hub-2": "P2",
        "hub-3": "P3",
    }
    assert not any(r.revoked for r in devices.values())
    # The same snapshot as reading the owners' consent by participant id.
    async with conn.transaction():
        by_participant = await records.snapshot(conn, ["P1", "P2", "P3"])
    now_ms = int(time.time() * 1000)
    for pid in ("P1", "P2", "P3", "P4"):
        assert consent.state_at(pid, now_ms) == by_participant.state_at(pid, now_ms)
    assert consent.watermark == by_participant.watermark
    p2 = consent.state_at("P2", now_ms)
    assert p2 is not None
    assert p2.scopes == frozenset({"heart_rate"})
    assert consent.state_at("P3", now_ms) is None  # enrolled, never consented
    assert consent.state_at("P4", now_ms) is None  # consented, but no device in the batch


async def test_a_batch_read_is_one_round_trip_and_releases_the_consent_lock(
    trial: Trial, conn: Conn
) -> None:
    directory = Directory()
    await directory.read(conn, ["hub-1"])  # parse and cache the key first
    with protocol_trace(conn) as messages:
        devices, _ = await directory.read(conn, ["hub-1"])
    assert "hub-1" in devices
    # The devices, the lock and the two consent statements, then one Sync; the server's
    # answers all come after it: the client waited once.
    sent = [m for side, m in messages if side == "F"]
    assert sent.count("Execute") == 4, sent
    assert sent.count("Sync") == 1, sent
    assert "Query" not in sent, sent
    assert waits(messages) == 1, messages
    # Left as found: no transaction open, autocommit off, and a consent change (the
    # exclusive lock) is not held up.
    assert conn.info.transaction_status is pq.TransactionStatus.IDLE
    assert conn.autocommit is False
    async with db.connection(trial.url, autocommit=True) as other:
        cur = await other.execute("SELECT pg_try_advisory_lock(%s)", (records.CONSENT_LOCK_KEY,))
        assert await cur.fetchone() == (True,)


async def test_a_batch_read_waits_for_a_consent_change_being_written_and_sees_it(
    trial: Trial, conn: Conn
) -> None:
    """The read takes the shared consent lock before it reads consent: a change holding the
    exclusive lock is either complete in what the batch is judged on or not yet effective."""
    directory = Directory()
    now = datetime.now(UTC)
    async with db.connection(trial.url) as writer:
        await writer.execute("SELECT pg_advisory_xact_lock(%s)", (records.CONSENT_LOCK_KEY,))
        await registry.record_consent(  # a narrower consent, signed again
            writer,
            "P1",
            trial.document_id,
            "consent",
            ["spo2"],
            effective_at=now - timedelta(minutes=1),
            recorded_by="test",
            signer_name="Participant P1",
            meaning="consent",
        )
        reading = asyncio.create_task(directory.read(conn, ["hub-1"]))
        await asyncio.sleep(0.5)
        assert not reading.done()  # waiting for the lock
        await writer.commit()
    _, consent = await asyncio.wait_for(reading, 10)
    state = consent.state_at("P1", int(now.timestamp() * 1000))
    assert state is not None
    assert state.scopes == frozenset({"spo2"})


async def test_a_batch_read_leaves_an_autocommit_connection_in_autocommit(trial: Trial) -> None:
    async with db.connection(trial.url, autocommit=True) as conn:
        devices, _ = await Directory().read(conn, ["hub-1"])
        assert "hub-1" in devices
        assert conn.autocommit is True


async def test_a_failed_batch_read_raises_and_leaves_the_connection_usable(
    trial: Trial, conn: Conn
) -> None:
    await conn.execute("ALTER TABLE devices RENAME TO devices_away")
    await conn.commit()
    try:
        with pytest.raises(psycopg.errors.UndefinedTable):
            await Directory().read(conn, ["hub-1"])
        assert conn.info.transaction_status is pq.TransactionStatus.IDLE
        assert conn.autocommit is False
    finally:
        await conn.execute("ALTER TABLE devices_away RENAME TO devices")
        await conn.commit()
    devices, _ = await Directory().read(conn, ["hub-1"])
    assert "hub-1" in devices


async def test_an_empty_batch_reads_nothing(trial: Trial, conn: Conn) -> None:
    devices, consent = await Directory().read(conn, [])
    assert devices == {}
    assert consent.watermark == ConsentSnapshot().watermark
    assert conn.info.transaction_status is pq.TransactionStatus.IDLE


async def test_a_snapshot_is_asked_for_participants_or_devices(conn: Conn) -> None:
    with pytest.raises(TypeError):
        await records.send_snapshot(conn)
    with pytest.raises(TypeError):
        await records.send_snapshot(conn, participants=["P1"], devices=["hub-1"])
