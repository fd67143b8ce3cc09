"""Adherence as Parquet and CSV: the same rows the API gives, of the actor's sites only,
audited with each file's hash like every export."""

from __future__ import annotations

import csv
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq  # type: ignore[import-untyped]

from storage import adherence, db, schedules
from storage.exports import ExportKind, ExportRequest, export
from storage.exports.adherence_files import COLUMNS, SCHEMA, SCHEMA_NAME
from storage.schedules import Expectation, ScheduleKind
from tests.alerts.test_engine import rows
from tests.exports.conftest import CLINICIAN_B, MONITOR_A, add_site_b_participant, hr, store
from tests.fixtures.trial import Trial

START = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)


async def seeded(trial: Trial) -> None:
    """P1 (site A) wore the strap 90 minutes yesterday; P9 (site B) 30 minutes."""
    await add_site_b_participant(trial, "P9", "hub-9")
    async with db.connection(trial.url) as conn:
        await schedules.set_schedule(
            conn,
            "S1",
            "heart_rate",
            Expectation(ScheduleKind.CONTINUOUS, rate_hz=1.0, wear_hours=12),
            effective_from=date(2026, 1, 1),
            actor="ada",
        )
        await conn.commit()
    at = int(START.timestamp() * 1000) + 10 * 3_600_000
    await store(trial.url, "P1", "hub-1", 1, [hr(at + i * 60_000, 70) for i in range(90)])
    await store(trial.url, "P9", "hub-9", 1, [hr(at + i * 60_000, 70) for i in range(30)])
    async with db.connection(trial.url) as conn:
        await adherence.refresh(conn)


async def test_the_files_hold_the_days_the_api_gives_and_only_the_actors_sites(
    trial: Trial, tmp_path: Path
) -> None:
    await seeded(trial)
    request = ExportRequest(ExportKind.ADHERENCE, "S1", None, START, START + timedelta(days=1))
    result = await export(trial.url, MONITOR_A, request, tmp_path / "out")
    async with db.connection(trial.url) as conn:
        expected = await adherence.days(conn, ["P1"], START.date(), START.date())
    assert result.participants == ("P1",)
    assert [f.path for f in result.files] == ["adherence.csv", "adherence.parquet"]

    table = pq.read_table(tmp_path / "out" / "adherence.parquet")
    assert table.schema.equals(SCHEMA, check_metadata=False)
    assert table.schema.metadata[b"schema"] == SCHEMA_NAME
    got = table.to_pylist()
    assert [(r["participant_id"], r["day"], r["metric"], r["worn_minutes"]) for r in got] == [
        ("P1", START.date(), "heart_rate", 90)
    ]
    assert got[0]["adherence"] == expected[0].adherence

    with (tmp_path / "out" / "adherence.csv").open(newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f))
    assert tuple(lines[0]) == COLUMNS
    assert lines[1][:3] == ["P1", START.date().isoformat(), "heart_rate"]
    assert lines[1][COLUMNS.index("worn_minutes")] == "90"
    assert len(lines) == 2

    (completed,) = await rows(
        trial.url, "SELECT detail FROM audit_log WHERE action = 'export.completed'"
    )
    detail = completed[0] if isinstance(completed[0], dict) else json.loads(completed[0])
    assert detail["kind"] == "adherence"
    assert sorted(f["path"] for f in detail["files"]) == ["adherence.csv", "adherence.parquet"]


async def test_another_sites_clinician_gets_their_own_participant_only(
    trial: Trial, tmp_path: Path
) -> None:
    await seeded(trial)
    request = ExportRequest(ExportKind.ADHERENCE, "S1", None, START, START + timedelta(days=1))
    result = await export(trial.url, CLINICIAN_B, request, tmp_path / "out")
    assert result.participants == ("P9",)
    table = pq.read_table(tmp_path / "out" / "adherence.parquet").to_pylist()
    assert [(r["participant_id"], r["worn_minutes"]) for r in table] == [("P9", 30)]
