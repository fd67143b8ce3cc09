"""Exports and the pages' data endpoints reading from the standby
(TRIALSTREAM_READ_DATABASE_URL): the data comes from the read URL while access checks' audit
rows, sessions and job state stay on the primary. Shown by pausing the standby's replay:
readings committed on the primary afterwards are in an answer that reads the primary and
not in one that reads the standby."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from gateway.broker import MosquittoBroker
from gateway.patroni import PatroniCluster
from gateway.settings import Settings
from storage import db, users
from storage.exports import ExportKind, ExportRequest, jobs
from tests.exports.conftest import consent_id_of, hr, now_ms, store
from tests.exports.test_jobs import account
from tests.fixtures.gateway import gateway_settings, running_gateway
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until
from tests.web.conftest import Web, add_people

pytestmark = pytest.mark.slow


def standby_url(cluster: PatroniCluster, dbname: str) -> str:
    primary = cluster.primary()
    (standby,) = [n for n in cluster.nodes if n is not primary]
    return (
        f"host=127.0.0.1 port={standby.pg_port} user=postgres dbname={dbname}"
        " target_session_attrs=standby connect_timeout=2"
    )


@contextlib.contextmanager
def replay_paused(
    cluster: PatroniCluster, read_url: str, readings: int, primary_url: str
) -> Iterator[None]:
    """Once the standby has ``readings`` readings, its replay held until the block ends.

    Patroni resumes a replica's paused replay at its next HA loop unless it is in
    maintenance mode, which the block holds. ``pg_wal_replay_pause`` only asks: the standby
    stops before the next WAL record it applies, or one record later. The primary writes
    records (a transaction id each) until the standby says it is paused, so that no record
    written in the block is applied."""
    cluster.set_maintenance(True)
    try:
        with _replay_held(read_url, readings, primary_url):
            yield
    finally:
        cluster.set_maintenance(False)


@contextlib.contextmanager
def _replay_held(read_url: str, readings: int, primary_url: str) -> Iterator[None]:
    with psycopg.connect(read_url, autocommit=True) as standby:
        for _ in range(100):
            row = standby.execute("SELECT count(*) FROM readings").fetchone()
            if row == (readings,):
                break
            time.sleep(0.1)
        assert row == (readings,)
        standby.execute("SELECT pg_wal_replay_pause()")
        try:
            with psycopg.connect(primary_url, autocommit=True) as primary:
                for _ in range(100):
                    state = standby.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()
                    if state == ("paused",):
                        break
                    primary.execute("SELECT pg_current_xact_id()")
                    time.sleep(0.05)
                assert state == ("paused",), state
            yield
        finally:
            standby.execute("SELECT pg_wal_replay_resume()")


def test_the_read_url_is_a_setting() -> None:
    url = "host=127.0.0.1 port=5433 dbname=trial target_session_attrs=standby"
    assert Settings.from_env({"TRIALSTREAM_READ_DATABASE_URL": url}).read_database_url == url
    assert Settings.from_env({}).read_database_url is None


async def test_an_export_job_reads_its_data_from_the_standby(
    patroni: PatroniCluster, trial_on_patroni: Trial, tmp_path: Path
) -> None:
    url = trial_on_patroni.url
    read_url = standby_url(patroni, "trial")
    consent = await consent_id_of(url, "P1")
    t = now_ms() - 60_000
    await store(url, "P1", "hub-1", 1, [hr(t + i, 70.0) for i in range(5)], consent_id=consent)
    with replay_paused(patroni, read_url, 5, url):
        await store(
            url, "P1", "hub-1", 2, [hr(t + 10 + i, 71.0) for i in range(7)], consent_id=consent
        )
        request = ExportRequest(ExportKind.PARQUET, "S1", "P1")
        async with db.connection(url, autocommit=True) as conn:
            monitor = await account(conn, "mon", users.Role.MONITOR, {"SITE-A"})
            on_standby = await jobs.submit(conn, monitor, request)
            on_primary = await jobs.submit(conn, monitor, request)
        done = await jobs.run(url, on_standby.job_id, out_root=tmp_path, read_url=read_url)
        assert (done.state, done.rows_written) == (jobs.JobState.DONE, 5)
        done = await jobs.run(url, on_primary.job_id, out_root=tmp_path)
        assert (done.state, done.rows_written) == (jobs.JobState.DONE, 12)
    # The jobs' state and the audit trail are the primary's.
    with psycopg.connect(url) as primary:
        row = primary.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'export.completed'"
        ).fetchone()
        assert row == (2,)
        assert primary.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)


async def test_the_pages_data_endpoints_read_from_the_standby(
    patroni: PatroniCluster, trial_on_patroni: Trial, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    trial = trial_on_patroni
    read_url = standby_url(patroni, "trial")
    consent = await consent_id_of(trial.url, "P1")
    t = now_ms() - 60_000
    await store(
        trial.url, "P1", "hub-1", 1, [hr(t + i, 70.0) for i in range(5)], consent_id=consent
    )
    await add_people(trial)
    settings = replace(
        gateway_settings(trial.url, mosquitto, tmp_path / "gateway"), read_database_url=read_url
    )
    async with running_gateway(settings) as gateway:
        site = Web(trial, gateway)
        path = "/api/v1/participants/P1/readings?minutes=30&metric=heart_rate"

        async def points() -> int:
            resp = await site.call("clinician", "GET", path)
            assert resp.status == 200, await resp.text()
            return len((await resp.json())["readings"])

        with replay_paused(patroni, read_url, 5, trial.url):
            await store(
                trial.url,
                "P1",
                "hub-1",
                2,
                [hr(t + 10 + i, 71.0) for i in range(7)],
                consent_id=consent,
            )
            assert await points() == 5

        async def all_there() -> bool:
            return await points() == 12

        await wait_until(all_there, "the standby replays the rest")
    # The reads' audit records were written on the primary.
    with psycopg.connect(trial.url) as primary:
        row = primary.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'data.read' AND actor = 'clinician'"
        ).fetchone()
        assert row is not None
        assert row[0] >= 2
