"""Review sign-offs and period locks, as the writer meets them (docs/review.md)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from datetime import UTC, datetime, timedelta

import pytest
from psycopg_pool import AsyncConnectionPool

from consent import records
from ingest.model import AcceptedEnvelope, Batch, Reading
from storage import db, locks, review
from storage.errors import UnknownStudy
from storage.locks import LateDataPolicy, LockError
from storage.migrate import StorageMode
from storage.review import ReviewError, Signer
from storage.timeconv import to_ms
from storage.users import Role
from storage.writer import BulkWriter
from tests.alerts.test_engine import rows
from tests.fixtures.signers import withdraw
from tests.fixtures.trial import Trial

DAY = datetime(2026, 3, 10, tzinfo=UTC)
MONITOR = Signer("mona", "Mona Monitor", "monitor")
_seq = itertools.count(1)


def at(hours: float) -> int:
    return to_ms(DAY + timedelta(hours=hours))


async def store(pool: AsyncConnectionPool, mode: StorageMode, *hours: float) -> int:
    """One envelope of P1's heart rate at the given hours of DAY; its seq."""
    seq = next(_seq)
    readings = tuple(Reading(at(h), "heart_rate", 60.0 + h, "/min", "strap") for h in hours)
    env = AcceptedEnvelope(
        dev="hub-1",
        seq=seq,
        participant_id="P1",
        sent_ms=at(30),
        envelope_sha256=hashlib.sha256(f"rl/{seq}".encode()).digest(),
        reading_count=len(readings),
        readings=readings,
        consent_ids=(None,) * len(readings),
    )
    await BulkWriter(pool, mode).write(Batch((env,), (), at(31)))
    return seq


async def lock_day(url: str, policy: LateDataPolicy = LateDataPolicy.REFUSE) -> int:
    async with db.connection(url, autocommit=True) as conn:
        await locks.set_late_data_policy(conn, "S1", policy, actor="ada")
        return await locks.lock_period(
            conn, "S1", DAY, DAY + timedelta(days=1), "database lock for the interim", actor="ada"
        )


async def test_a_sign_off_counts_the_period_and_later_data_outdates_it(
    trial: Trial, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    await store(pool, storage_mode, 1, 2, 3)
    async with db.connection(trial.url, autocommit=True) as conn:
        signoff = await review.sign_off(
            conn, "P1", DAY, DAY + timedelta(days=1), "Reviewed, no concerns", signer=MONITOR
        )
    outside = await store(pool, storage_mode, 25)  # the next day: not the signed period
    async with db.connection(trial.url) as conn:
        (signed,) = await review.signoffs(conn, "P1")
    assert (signed.signoff_id, signed.readings, signed.outdated_at) == (signoff, 3, None)
    late = await store(pool, storage_mode, 4, 5, 26)
    async with db.connection(trial.url) as conn:
        (signed,) = await review.signoffs(conn, "P1")
        changed = await review.changes(conn, [signoff])
    assert signed.outdated_at is not None
    assert [(c.seq, c.readings, c.first_time, c.last_time) for c in changed[signoff]] == [
        (late, 2, DAY + timedelta(hours=4), DAY + timedelta(hours=5))
    ]
    assert outside != late
    assert await rows(
        trial.url, "SELECT actor, detail->>'readings' FROM audit_log WHERE action = 'review.sign'"
    ) == [("mona", "3")]


@pytest.mark.parametrize(
    ("meaning", "hours", "says"),
    [("  ", 24, "meaning"), ("x" * 201, 24, "meaning"), ("ok", -1, "ends before")],
)
async def test_a_sign_off_that_cannot_be_is_refused(
    trial: Trial, meaning: str, hours: int, says: str
) -> None:
    async with db.connection(trial.url, autocommit=True) as conn:
        with pytest.raises(ReviewError, match=says):
            await review.sign_off(
                conn, "P1", DAY, DAY + timedelta(hours=hours), meaning, signer=MONITOR
            )
    assert await rows(trial.url, "SELECT count(*) FROM review_signoffs") == [(0,)]


async def test_a_locked_period_refuses_late_readings_with_a_row_saying_why(
    trial: Trial, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    await lock_day(trial.url)
    seq = await store(pool, storage_mode, 2, 3, 25)
    assert await rows(trial.url, "SELECT count(*) FROM readings WHERE device_id = 'hub-1'") == [
        (1,)
    ]
    assert await rows(
        trial.url,
        "SELECT reason, detail, reading_count, first_time, last_time FROM rejections"
        " WHERE device_id = 'hub-1'",
    ) == [
        (
            "period_locked",
            locks.LOCKED_DETAIL,
            2,
            DAY + timedelta(hours=2),
            DAY + timedelta(hours=3),
        )
    ]
    assert await rows(
        trial.url,
        f"SELECT reading_count, stored_count, refused_count FROM envelopes WHERE seq = {seq}",
    ) == [(3, 1, 2)]


async def test_held_readings_wait_for_the_unlock_and_are_stored_then(
    trial: Trial, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    async with db.connection(trial.url, autocommit=True) as conn:
        signoff = await review.sign_off(
            conn, "P1", DAY, DAY + timedelta(days=1), "Reviewed", signer=MONITOR
        )
    lock_id = await lock_day(trial.url, LateDataPolicy.HOLD)
    seq = await store(pool, storage_mode, 2, 3)
    assert await rows(trial.url, "SELECT count(*) FROM readings") == [(0,)]
    assert await rows(trial.url, "SELECT reason, detail FROM rejections") == [
        ("period_locked", locks.HELD_DETAIL)
    ]
    async with db.connection(trial.url) as conn:
        (held,) = await locks.locks(conn, "S1")
        assert (held.lock_id, held.held, held.unlocked_at) == (lock_id, 2, None)
        # Held, not stored: the sign-off still stands.
        (signed,) = await review.signoffs(conn, "P1")
        assert signed.outdated_at is None
    async with db.connection(trial.url, autocommit=True) as conn:
        released = await locks.unlock(
            conn, lock_id, "query answered: data accepted", actor="ada", mode=storage_mode
        )
        with pytest.raises(LockError, match="no lock"):
            await locks.unlock(conn, lock_id, "again", actor="ada", mode=storage_mode)
    assert [(r.seq, r.reading.t_ms) for r in released] == [(seq, at(2)), (seq, at(3))]
    assert await rows(trial.url, "SELECT value FROM readings ORDER BY time") == [(62.0,), (63.0,)]
    async with db.connection(trial.url) as conn:
        (signed,) = await review.signoffs(conn, "P1")
        changed = await review.changes(conn, [signoff])
    assert signed.outdated_at is not None
    assert [(c.seq, c.readings) for c in changed[signoff]] == [(seq, 2)]
    assert await rows(trial.url, "SELECT count(*) FROM adherence_deltas") == [(1,)]
    assert await rows(
        trial.url,
        "SELECT action, detail->>'lock_id', reason FROM audit_log"
        " WHERE starts_with(action, 'period.') ORDER BY audit_id",
    ) == [
        ("period.lock", str(lock_id), "database lock for the interim"),
        ("period.unlock", str(lock_id), "query answered: data accepted"),
    ]
    # After the unlock, late data for the period is stored as it arrives.
    await store(pool, storage_mode, 4)
    assert await rows(trial.url, "SELECT count(*) FROM readings") == [(3,)]


async def test_a_lock_in_progress_holds_back_batches_until_it_commits(
    trial: Trial, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    """A batch that checks while a lock is being made waits for it, then sees it."""
    # The lock's transaction, not committed yet while the batch arrives.
    async with db.connection(trial.url, autocommit=True) as conn, conn.transaction():
        await locks.lock_period(conn, "S1", DAY, DAY + timedelta(days=1), "lock", actor="ada")
        writing = asyncio.ensure_future(store(pool, storage_mode, 2))
        await asyncio.sleep(0.5)
        assert not writing.done()
    await asyncio.wait_for(writing, 10)
    assert await rows(trial.url, "SELECT count(*) FROM readings") == [(0,)]
    assert await rows(trial.url, "SELECT reason FROM rejections") == [("period_locked",)]


@pytest.mark.parametrize(
    ("study", "hours", "reason", "error"),
    [
        ("S1", 24, " ", LockError),
        ("S1", 24, "x" * 501, LockError),
        ("S1", 0, "empty period", LockError),
        ("NOPE", 24, "no such study", UnknownStudy),
    ],
)
async def test_a_lock_that_cannot_be_is_refused(
    trial: Trial, study: str, hours: int, reason: str, error: type[Exception]
) -> None:
    async with db.connection(trial.url, autocommit=True) as conn:
        with pytest.raises(error):
            await locks.lock_period(
                conn, study, DAY, DAY + timedelta(hours=hours), reason, actor="ada"
            )
    assert await rows(trial.url, "SELECT count(*) FROM period_locks") == [(0,)]


async def test_withdrawal_under_the_delete_policy_deletes_held_readings_too(
    trial: Trial, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    await lock_day(trial.url, LateDataPolicy.HOLD)
    await store(pool, storage_mode, 2, 3)
    async with db.connection(trial.url, autocommit=True) as conn:
        await conn.execute("UPDATE studies SET withdrawal_policy = 'delete'")
        actor = records.Actor("cora", Role.SITE_COORDINATOR, frozenset({"SITE-A"}))
        part = await withdraw(conn, actor, participant_id="P1", initiated_by=records.Initiator.SITE)
    assert part.readings_deleted == 2
    assert await rows(trial.url, "SELECT count(*) FROM held_readings") == [(0,)]
