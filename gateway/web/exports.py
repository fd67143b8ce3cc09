"""Export jobs of the API: the background runner and where a finished job's files are.

One :class:`ExportRunner` per gateway process runs queued jobs one at a time
(``storage.exports.jobs.run_next``, which claims a job atomically, so several processes can
run runners side by side), writing under ``<data dir>/exports/<job id>``. It marks jobs
whose runner died as failed when it starts (``fail_abandoned``), then waits for work: a
submit in this process wakes it at once, and it looks for jobs submitted elsewhere every
``POLL_S``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path

import psycopg
from aiohttp import web
from psycopg_pool import PoolTimeout

from storage import db
from storage.errors import DatabaseUnavailable
from storage.exports import jobs
from storage.exports.output import WrittenFile

log = logging.getLogger(__name__)

# A queued job submitted through another gateway process starts within this long.
POLL_S = 5.0
# A running job beats after every chunk (10,000 rows, well under a second); a job silent
# this long has lost its runner.
STALE_AFTER = timedelta(minutes=5)
RETRY_CEILING_S = 30.0
_CONNECTION_ERRORS = (psycopg.OperationalError, DatabaseUnavailable, PoolTimeout)


class ExportRunner:
    """Runs the queue of export jobs, one job at a time, until cancelled."""

    def __init__(self, database_url: str, out_root: Path, read_url: str | None = None) -> None:
        self._url = database_url
        self._read_url = read_url
        self.out_root = out_root.resolve()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A job was submitted: look for it now instead of at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        delay = 1.0
        abandoned_checked = False
        while True:
            try:
                if not abandoned_checked:
                    async with db.connection(self._url, autocommit=True) as conn:
                        failed = await jobs.fail_abandoned(conn, stale_after=STALE_AFTER)
                    abandoned_checked = True
                    if failed:
                        log.warning("export jobs abandoned by a stopped runner count=%d", failed)
                self._wake.clear()
                job = await jobs.run_next(
                    self._url, out_root=self.out_root, read_url=self._read_url
                )
                delay = 1.0
                if job is not None:
                    log.info("export job finished job=%s state=%s", job.job_id, job.state)
                    continue
                try:
                    async with asyncio.timeout(POLL_S):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            except _CONNECTION_ERRORS as exc:
                log.warning(
                    "export runner: database unavailable retry_in_s=%.0f error=%s",
                    delay,
                    type(exc).__name__,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CEILING_S)
            except Exception:
                # The job itself is marked failed by run_next; this is the runner's own
                # failure (for example the queue's table unreadable): keep running, slower.
                log.exception("export runner: round failed retry_in_s=%.0f", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CEILING_S)

    def file_path(self, job_id: str, file: WrittenFile) -> Path | None:
        """The file of a finished job on this machine's disk, or None when it is not there
        (or its recorded path would lead outside the job's directory)."""
        directory = (self.out_root / job_id).resolve()
        path = (directory / file.path).resolve()
        if not (directory.is_relative_to(self.out_root) and path.is_relative_to(directory)):
            log.warning("export file outside its job's directory job=%s", job_id)
            return None
        return path if path.is_file() else None


EXPORT_RUNNER = web.AppKey("export_runner", ExportRunner)
