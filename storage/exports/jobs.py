"""Exports as background jobs: submitted by a request, run apart from it, polled for state.

- :func:`submit` checks the actor's right to the export now (a refusal is audited and
  raised, as for a direct export) and records a ``queued`` job, audited ``export.submitted``.
- :func:`run` claims a queued job (``queued`` -> ``running`` in one UPDATE, so two runners
  never run the same job) and runs the export as the requester *as they are now*: a user
  disabled, or moved off the site since submitting, no longer gets the data. The job ends
  ``done`` with its files and their hashes, or ``failed`` with the error.
  :func:`run_next` claims the oldest queued job instead (a worker loop calls it).
- :func:`status` shows a job to whoever submitted it, and to admins.
- :func:`fail_abandoned` ends jobs whose runner stopped beating (a process that died):
  call it when a runner starts.

Each job writes into ``out_root/<job id>``; while it runs its progress (rows written) and a
heartbeat are updated after every chunk.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from psycopg import sql

from consent.records import Actor
from storage import audit, db, users
from storage.db import Conn
from storage.errors import StorageError
from storage.exports.errors import ExportError, JobNotFound, JobNotRunnable
from storage.exports.export import OnProgress, export
from storage.exports.output import WrittenFile
from storage.exports.selection import ExportKind, ExportRequest, participants

log = logging.getLogger(__name__)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ExportJob:
    job_id: str
    request: ExportRequest
    requested_by: str
    state: JobState
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    rows_written: int
    output_dir: str | None
    files: tuple[WrittenFile, ...]
    error: str | None


_COLUMNS = sql.SQL(
    "job_id::text, kind, study_id, participant_id, from_time, to_time, requested_by,"
    " state, submitted_at, started_at, finished_at, rows_written, output_dir, files, error"
)


def _q(text: str) -> sql.Composed:
    """A statement with ``{columns}`` standing for the job's columns."""
    return sql.SQL(text).format(columns=_COLUMNS)


def _job(row: tuple[Any, ...]) -> ExportJob:
    (jid, kind, study, pid, lo, hi, by, state, sub, start, end, rows, out, files, err) = row
    return ExportJob(
        job_id=str(jid),
        request=ExportRequest(ExportKind(kind), str(study), pid, lo, hi),
        requested_by=str(by),
        state=JobState(state),
        submitted_at=sub,
        started_at=start,
        finished_at=end,
        rows_written=int(rows),
        output_dir=out,
        files=tuple(
            WrittenFile(str(f["path"]), str(f["sha256"]), int(f["bytes"]), int(f["rows"]))
            for f in (files or [])
        ),
        error=err,
    )


def _parse_id(job_id: str) -> str:
    try:
        return str(uuid.UUID(job_id))
    except ValueError as exc:
        raise JobNotFound(f"no export job {job_id!r}") from exc


async def submit(conn: Conn, actor: Actor, request: ExportRequest) -> ExportJob:
    """Queue an export for ``actor``; refused at once (and audited) if they may not have it."""
    refused: ExportError | None = None
    async with conn.transaction():
        try:
            await participants(conn, actor, request)
        except ExportError as exc:
            refused = exc
        else:
            cur = await conn.execute(
                _q(
                    "INSERT INTO export_jobs (kind, study_id, participant_id, from_time, to_time,"
                    " requested_by) VALUES (%s, %s, %s, %s, %s, %s) RETURNING {columns}"
                ),
                (
                    request.kind.value,
                    request.study_id,
                    request.participant_id,
                    request.from_time,
                    request.to_time,
                    actor.user,
                ),
            )
            row = await cur.fetchone()
            assert row is not None
            job = _job(row)
        detail: dict[str, object] = {
            "kind": request.kind.value,
            "study_id": request.study_id,
            "from": request.from_time,
            "to": request.to_time,
        }
        if request.participant_id is not None:
            detail["participant_id"] = request.participant_id
        if refused is None:
            detail["job_id"] = job.job_id
        await audit.append(
            conn,
            actor=actor.user,
            action="export.submitted" if refused is None else "export.refused",
            entity="study",
            entity_id=request.study_id,
            detail=detail,
            reason=None if refused is None else str(refused),
        )
    if refused is not None:
        raise refused
    log.info("export job submitted job=%s kind=%s actor=%s", job.job_id, request.kind, actor.user)
    return job


async def status(conn: Conn, actor: Actor, job_id: str) -> ExportJob:
    """The job, if ``actor`` submitted it or is an admin; else ``JobNotFound``."""
    cur = await conn.execute(
        _q("SELECT {columns} FROM export_jobs WHERE job_id = %s"), (_parse_id(job_id),)
    )
    row = await cur.fetchone()
    if row is None:
        raise JobNotFound(f"no export job {job_id!r}")
    job = _job(row)
    if job.requested_by != actor.user and actor.role is not users.Role.ADMIN:
        raise JobNotFound(f"no export job {job_id!r}")
    return job


_CLAIM = _q("""
UPDATE export_jobs SET state = 'running', started_at = now(), heartbeat_at = now()
WHERE job_id = %s AND state = 'queued'
RETURNING {columns}
""")
_CLAIM_NEXT = _q("""
UPDATE export_jobs SET state = 'running', started_at = now(), heartbeat_at = now()
WHERE job_id = (
    SELECT job_id FROM export_jobs WHERE state = 'queued'
    ORDER BY submitted_at LIMIT 1 FOR UPDATE SKIP LOCKED
)
RETURNING {columns}
""")
_ACCOUNT = """
SELECT disabled_at IS NOT NULL FROM users WHERE username = %s
"""


async def run(url: str, job_id: str, *, out_root: Path, read_url: str | None = None) -> ExportJob:
    """Run one queued job to its end (its data read at ``read_url`` if given); returns it
    ``done`` or ``failed``."""
    async with db.connection(url, autocommit=True) as conn:
        cur = await conn.execute(_CLAIM, (_parse_id(job_id),))
        row = await cur.fetchone()
        if row is None:
            cur = await conn.execute(
                "SELECT state FROM export_jobs WHERE job_id = %s", (_parse_id(job_id),)
            )
            found = await cur.fetchone()
            if found is None:
                raise JobNotFound(f"no export job {job_id!r}")
            raise JobNotRunnable(f"export job {job_id} is {found[0]}, not queued")
        return await _execute(conn, url, _job(row), out_root, read_url)


async def run_next(url: str, *, out_root: Path, read_url: str | None = None) -> ExportJob | None:
    """Claim and run the oldest queued job (its data read at ``read_url`` if given); None
    when there is none."""
    async with db.connection(url, autocommit=True) as conn:
        cur = await conn.execute(_CLAIM_NEXT)
        row = await cur.fetchone()
        if row is None:
            return None
        return await _execute(conn, url, _job(row), out_root, read_url)


async def _requester(conn: Conn, username: str) -> Actor | None:
    user = await users.get_user(conn, username)
    if user is None:
        return None
    cur = await conn.execute(_ACCOUNT, (username,))
    row = await cur.fetchone()
    if row is None or row[0]:
        return None
    return Actor.of(user)


async def _execute(
    conn: Conn, url: str, job: ExportJob, out_root: Path, read_url: str | None
) -> ExportJob:
    async def beat(rows: int) -> None:
        await conn.execute(
            "UPDATE export_jobs SET rows_written = %s, heartbeat_at = now() WHERE job_id = %s",
            (rows, job.job_id),
        )

    on_progress: OnProgress = beat
    actor = await _requester(conn, job.requested_by)
    if actor is None:
        return await _finish_failed(conn, job, "the requesting account is gone or disabled")
    try:
        result = await export(
            url,
            actor,
            job.request,
            out_root / job.job_id,
            export_id=job.job_id,
            job_id=job.job_id,
            on_progress=on_progress,
            read_url=read_url,
        )
    except StorageError as exc:
        return await _finish_failed(conn, job, f"{type(exc).__name__}: {exc}")
    except BaseException as exc:
        await _finish_failed(conn, job, f"{type(exc).__name__}: {exc}")
        raise
    cur = await conn.execute(
        _q(
            "UPDATE export_jobs SET state = 'done', finished_at = now(), heartbeat_at = now(),"
            " rows_written = %s, output_dir = %s, files = %s::jsonb WHERE job_id = %s"
            " RETURNING {columns}"
        ),
        (
            result.rows,
            str(result.directory),
            json.dumps([f.as_json() for f in result.files]),
            job.job_id,
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    log.info("export job done job=%s rows=%d", job.job_id, result.rows)
    return _job(row)


async def _finish_failed(conn: Conn, job: ExportJob, error: str) -> ExportJob:
    cur = await conn.execute(
        _q(
            "UPDATE export_jobs SET state = 'failed', finished_at = now(), error = %s"
            " WHERE job_id = %s RETURNING {columns}"
        ),
        (error, job.job_id),
    )
    row = await cur.fetchone()
    assert row is not None
    log.warning("export job failed job=%s error=%s", job.job_id, error.split(":", 1)[0])
    return _job(row)


async def fail_abandoned(conn: Conn, *, stale_after: timedelta) -> int:
    """Mark running jobs without a heartbeat for ``stale_after`` as failed; returns how many."""
    cur = await conn.execute(
        "UPDATE export_jobs SET state = 'failed', finished_at = now(),"
        " error = 'abandoned: its runner stopped' WHERE state = 'running'"
        " AND heartbeat_at < now() - %s",
        (stale_after,),
    )
    return cur.rowcount
