"""`trialstream export` end to end, and the metric mapping's completeness."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from gateway.cli import main
from gateway.commands.operator import PASSWORD_FILE_ENV
from ingest.metrics import METRICS
from storage import db, users
from storage.exports.mapping import EXPORTED, VS_METRICS
from tests.exports.conftest import hr, names_in, now_ms, store
from tests.fixtures.signers import CHEAP_HASHER, PASSWORD, password_file
from tests.fixtures.trial import Trial


def test_every_metric_has_an_export_mapping() -> None:
    assert set(EXPORTED) == set(METRICS)
    assert all(EXPORTED[m].metric is METRICS[m] for m in METRICS)
    assert set(VS_METRICS) == set(METRICS) - {
        "rr_interval",
        "glucose",
        "body_fat",
        "carbohydrate_intake",
        "exercise_duration",
        "exercise_intensity",
        "medication_mass",
        "medication_volume",
        "hba1c",
    }


async def test_export_commands_write_and_report_files(
    trial: Trial,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    async with db.connection(trial.url) as conn:
        await users.create_user(
            conn,
            actor="admin",
            username="mon",
            display_name="Monitor",
            role=users.Role.MONITOR,
            password=PASSWORD,
            sites={"SITE-A"},
            hasher=CHEAP_HASHER,
        )
        await conn.commit()
    await store(trial.url, "P1", "hub-1", 1, [hr(now_ms() - 1000, 70.0)])
    secret = password_file(tmp_path_factory.mktemp("operator"))
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(secret))
    base = ["export"]
    for kind in ("parquet", "fhir", "sdtm"):
        argv = [*base, kind, "--database-url", trial.url, "--as", "mon", "--study", "S1"]
        code = await asyncio.to_thread(main, [*argv, "--out", str(tmp_path / kind), "--quiet"])
        assert code == 0
    out = capsys.readouterr().out
    assert "exported 1 readings of 1 participant(s)" in out
    assert "sha256 " in out
    assert names_in(tmp_path) == ["fhir", "parquet", "sdtm"]

    refused = [
        *base,
        "fhir",
        "--database-url",
        trial.url,
        "--as",
        "nobody",
        "--study",
        "S1",
        "--out",
        str(tmp_path / "x"),
    ]
    assert await asyncio.to_thread(main, refused) == 2
    assert "authentication failed for 'nobody'" in capsys.readouterr().err
    bad_time = [*refused[:-2], "--from", "2026-01-01T00:00", "--out", str(tmp_path / "y")]
    with pytest.raises(SystemExit):
        await asyncio.to_thread(main, bad_time)
    assert names_in(tmp_path) == ["fhir", "parquet", "sdtm"]


async def test_run_jobs_runs_the_queue(
    trial: Trial, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from consent.records import Actor
    from storage.exports import ExportKind, ExportRequest, jobs

    async with db.connection(trial.url, autocommit=True) as conn:
        user = await users.create_user(
            conn,
            actor="admin",
            username="mon",
            display_name="Monitor",
            role=users.Role.MONITOR,
            password="correct horse battery",
            sites={"SITE-A"},
            hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1),
        )
        job = await jobs.submit(conn, Actor.of(user), ExportRequest(ExportKind.SDTM, "S1"))
    argv = ["export", "run-jobs", "--database-url", trial.url, "--out-root", str(tmp_path)]
    assert await asyncio.to_thread(main, argv) == 0
    assert f"job {job.job_id}: done" in capsys.readouterr().out
    assert names_in(tmp_path) == [job.job_id]
    assert await asyncio.to_thread(main, argv) == 0
    assert "no queued export jobs" in capsys.readouterr().out
