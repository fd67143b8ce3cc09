"""Export jobs: submitted, run in the background, polled; access checked at both ends."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from consent.records import Actor
from storage import db, users
from storage.db import Conn
from storage.exports import ExportError, ExportKind, ExportNotPermitted, ExportRequest, jobs
from storage.exports.errors import JobNotFound, JobNotRunnable
from tests.exports.conftest import ADMIN, hr, names_in, now_ms, read_dataset, store
from tests.fixtures.trial import Trial

CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


async def account(conn: Conn, username: str, role: users.Role, sites: set[str]) -> Actor:
    user = await users.create_user(
        conn,
        actor="admin",
        username=username,
        display_name=username,
        role=role,
        password="correct horse battery",
        sites=sites,
        hasher=CHEAP_HASHER,
    )
    return Actor.of(user)


@pytest.fixture
async def conn(trial: Trial) -> AsyncIterator[Conn]:
    async with db.connection(trial.url, autocommit=True) as c:
        yield c


@pytest.fixture
async def monitor(conn: Conn) -> Actor:
    return await account(conn, "mon", users.Role.MONITOR, {"SITE-A"})


async def test_a_submitted_job_runs_in_the_background_and_reports_its_files(
    trial: Trial, conn: Conn, monitor: Actor, tmp_path: Path
) -> None:
    await store(trial.url, "P1", "hub-1", 1, [hr(now_ms() - 5000 + i, 70.0) for i in range(5)])
    job = await jobs.submit(conn, monitor, ExportRequest(ExportKind.PARQUET, "S1", "P1"))
    assert job.state is jobs.JobState.QUEUED
    assert (await jobs.status(conn, monitor, job.job_id)).state is jobs.JobState.QUEUED

    done = await jobs.run(trial.url, job.job_id, out_root=tmp_path)
    assert (done.state, done.rows_written, done.error) == (jobs.JobState.DONE, 5, None)
    assert done.output_dir == str(tmp_path / job.job_id)
    polled = await jobs.status(conn, monitor, job.job_id)
    assert polled == done
    assert polled.started_at is not None
    assert polled.finished_at is not None
    for f in polled.files:
        data = (tmp_path / job.job_id / f.path).read_bytes()
        assert f.sha256 == hashlib.sha256(data).hexdigest()
    assert read_dataset(tmp_path / job.job_id).num_rows == 5
    cur = await conn.execute(
        "SELECT action, detail ->> 'job_id' FROM audit_log WHERE action LIKE 'export.%'"
        " ORDER BY audit_id"
    )
    assert await cur.fetchall() == [
        ("export.submitted", job.job_id),
        ("export.started", job.job_id),
        ("export.completed", job.job_id),
    ]


async def test_a_submission_outside_the_actors_sites_is_refused_at_once(
    trial: Trial, conn: Conn
) -> None:
    other = await account(conn, "mon-b", users.Role.MONITOR, set())
    with pytest.raises(ExportNotPermitted):
        await jobs.submit(conn, other, ExportRequest(ExportKind.FHIR, "S1", "P1"))
    cur = await conn.execute("SELECT count(*) FROM export_jobs")
    assert await cur.fetchone() == (0,)
    cur = await conn.execute("SELECT actor, action FROM audit_log WHERE action LIKE 'export.%'")
    assert await cur.fetchall() == [("mon-b", "export.refused")]


async def test_status_is_for_the_requester_and_admins(
    trial: Trial, conn: Conn, monitor: Actor
) -> None:
    job = await jobs.submit(conn, monitor, ExportRequest(ExportKind.SDTM, "S1"))
    colleague = await account(conn, "mon-2", users.Role.MONITOR, {"SITE-A"})
    with pytest.raises(JobNotFound):
        await jobs.status(conn, colleague, job.job_id)
    assert (await jobs.status(conn, ADMIN, job.job_id)).job_id == job.job_id
    for bad in ("not-a-uuid", str(uuid.uuid4()), ""):
        with pytest.raises(JobNotFound):
            await jobs.status(conn, ADMIN, bad)


async def test_a_job_runs_once(trial: Trial, conn: Conn, monitor: Actor, tmp_path: Path) -> None:
    job = await jobs.submit(conn, monitor, ExportRequest(ExportKind.FHIR, "S1"))
    assert (await jobs.run(trial.url, job.job_id, out_root=tmp_path)).state is jobs.JobState.DONE
    with pytest.raises(JobNotRunnable):
        await jobs.run(trial.url, job.job_id, out_root=tmp_path)
    with pytest.raises(JobNotFound):
        await jobs.run(trial.url, str(uuid.uuid4()), out_root=tmp_path)


async def test_access_is_checked_again_when_the_job_runs(
    trial: Trial, conn: Conn, monitor: Actor, tmp_path: Path
) -> None:
    moved = await jobs.submit(conn, monitor, ExportRequest(ExportKind.PARQUET, "S1", "P1"))
    await conn.execute(
        "DELETE FROM user_sites WHERE user_id = (SELECT user_id FROM users WHERE username = 'mon')"
    )
    failed = await jobs.run(trial.url, moved.job_id, out_root=tmp_path)
    assert failed.state is jobs.JobState.FAILED
    assert failed.error is not None
    assert failed.error.startswith("ExportNotPermitted")

    other = await account(conn, "mon-3", users.Role.MONITOR, {"SITE-A"})
    gone = await jobs.submit(conn, other, ExportRequest(ExportKind.PARQUET, "S1"))
    await users.disable_user(conn, actor="admin", username="mon-3", reason="left the study")
    failed = await jobs.run(trial.url, gone.job_id, out_root=tmp_path)
    assert (failed.state, failed.error) == (
        jobs.JobState.FAILED,
        "the requesting account is gone or disabled",
    )
    assert names_in(tmp_path) == []


async def test_run_next_takes_the_oldest_queued_job(
    trial: Trial, conn: Conn, monitor: Actor, tmp_path: Path
) -> None:
    first = await jobs.submit(conn, monitor, ExportRequest(ExportKind.SDTM, "S1"))
    second = await jobs.submit(conn, monitor, ExportRequest(ExportKind.FHIR, "S1"))
    ran = [await jobs.run_next(trial.url, out_root=tmp_path) for _ in range(3)]
    assert [j.job_id if j else None for j in ran] == [first.job_id, second.job_id, None]
    assert names_in(tmp_path) == sorted([first.job_id, second.job_id])


async def test_jobs_whose_runner_died_are_marked_failed(
    trial: Trial, conn: Conn, monitor: Actor
) -> None:
    job = await jobs.submit(conn, monitor, ExportRequest(ExportKind.FHIR, "S1"))
    fresh = await jobs.submit(conn, monitor, ExportRequest(ExportKind.FHIR, "S1"))
    await conn.execute(
        "UPDATE export_jobs SET state = 'running', started_at = now() - interval '1 hour',"
        " heartbeat_at = now() - %s WHERE job_id = %s",
        (timedelta(minutes=10), job.job_id),
    )
    await conn.execute(
        "UPDATE export_jobs SET state = 'running', started_at = now(), heartbeat_at = now()"
        " WHERE job_id = %s",
        (fresh.job_id,),
    )
    assert await jobs.fail_abandoned(conn, stale_after=timedelta(minutes=5)) == 1
    assert (await jobs.status(conn, monitor, job.job_id)).state is jobs.JobState.FAILED
    assert (await jobs.status(conn, monitor, fresh.job_id)).state is jobs.JobState.RUNNING


async def test_an_invalid_request_is_refused_at_submission(conn: Conn, monitor: Actor) -> None:
    for request in (
        ExportRequest(ExportKind.FHIR, "NOPE"),
        ExportRequest(ExportKind.FHIR, "S1", "P404"),
        ExportRequest(ExportKind.FHIR, "S1", from_time=datetime(2026, 1, 1)),
    ):
        with pytest.raises(ExportError):
            await jobs.submit(conn, monitor, request)
    cur = await conn.execute("SELECT count(*) FROM export_jobs")
    assert await cur.fetchone() == (0,)
    cur = await conn.execute("SELECT count(*) FROM audit_log WHERE action = 'export.refused'")
    assert await cur.fetchone() == (3,)
