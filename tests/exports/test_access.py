"""Who may export what, bad requests, and the audit trail of every export."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from consent.records import Actor
from storage import audit, db
from storage.exports import (
    ExportKind,
    ExportNotPermitted,
    ExportRequest,
    InvalidExportRequest,
    OutputExists,
    UnknownParticipant,
    UnknownStudy,
    export,
)
from storage.users import Role
from tests.exports.conftest import (
    ADMIN,
    CLINICIAN_A,
    CLINICIAN_B,
    add_site_b_participant,
    hr,
    names_in,
    now_ms,
    read_dataset,
    store,
)
from tests.fixtures.trial import Trial


async def audit_rows(url: str) -> list[tuple[str, str, dict[str, object], str | None]]:
    async with db.connection(url) as conn:
        cur = await conn.execute(
            "SELECT actor, action, detail, reason FROM audit_log"
            " WHERE action LIKE 'export.%' ORDER BY audit_id"
        )
        return [(str(a), str(b), dict(c), d) for a, b, c, d in await cur.fetchall()]


@pytest.fixture
async def two_sites(trial: Trial) -> Trial:
    await add_site_b_participant(trial, "PB", "hub-b")
    t = now_ms() - 60_000
    await store(trial.url, "P1", "hub-1", 1, [hr(t, 70.0)])
    await store(trial.url, "PB", "hub-b", 1, [hr(t, 80.0)])
    return trial


async def test_a_clinician_cannot_export_another_sites_participant(
    two_sites: Trial, tmp_path: Path
) -> None:
    out = tmp_path / "refused"
    with pytest.raises(ExportNotPermitted):
        await export(two_sites.url, CLINICIAN_B, ExportRequest(ExportKind.PARQUET, "S1", "P1"), out)
    assert not out.exists()
    assert names_in(tmp_path) == []
    [(actor, action, detail, reason)] = await audit_rows(two_sites.url)
    assert (actor, action, detail["participant_id"]) == ("clin-b", "export.refused", "P1")
    assert reason is not None


async def test_a_study_export_holds_only_the_actors_sites(two_sites: Trial, tmp_path: Path) -> None:
    for actor, expected in ((CLINICIAN_B, ["PB"]), (CLINICIAN_A, ["P1"]), (ADMIN, ["P1", "PB"])):
        out = tmp_path / actor.user
        for kind in ExportKind:
            result = await export(two_sites.url, actor, ExportRequest(kind, "S1"), out / kind)
            assert list(result.participants) == expected
        table = read_dataset(out / "parquet")
        assert sorted(set(table.column("participant_id").to_pylist())) == expected
        fhir_lines = (out / "fhir" / "Patient.ndjson").read_text().splitlines()
        assert len(fhir_lines) == len(expected)


@pytest.mark.parametrize(
    "actor",
    [
        Actor("p1", Role.PARTICIPANT, participant_id="P1"),
        Actor("nobody", Role.MONITOR, frozenset()),
        Actor("elsewhere", Role.MONITOR, frozenset({"SITE-Z"})),
        # Site coordinators may not read reading values, so may not export them either.
        Actor("coord", Role.SITE_COORDINATOR, frozenset({"SITE-A"})),
    ],
    ids=["participant", "monitor-without-sites", "monitor-of-another-study", "coordinator"],
)
async def test_actors_without_a_site_of_the_study_are_refused(
    trial: Trial, tmp_path: Path, actor: Actor
) -> None:
    with pytest.raises(ExportNotPermitted):
        await export(trial.url, actor, ExportRequest(ExportKind.FHIR, "S1"), tmp_path / "x")
    assert names_in(tmp_path) == []


async def test_unknown_study_and_participant(trial: Trial, tmp_path: Path) -> None:
    with pytest.raises(UnknownStudy):
        await export(trial.url, ADMIN, ExportRequest(ExportKind.SDTM, "NOPE"), tmp_path / "a")
    with pytest.raises(UnknownParticipant):
        await export(trial.url, ADMIN, ExportRequest(ExportKind.SDTM, "S1", "P404"), tmp_path / "b")
    assert [a[1] for a in await audit_rows(trial.url)] == ["export.refused"] * 2


@pytest.mark.parametrize(
    "request_",
    [
        ExportRequest(ExportKind.PARQUET, ""),
        ExportRequest(ExportKind.PARQUET, "S1", ""),
        ExportRequest(ExportKind.PARQUET, "S1", from_time=datetime(2026, 1, 1)),
        ExportRequest(ExportKind.PARQUET, "S1", to_time=datetime(2026, 1, 1)),
        ExportRequest(
            ExportKind.PARQUET,
            "S1",
            from_time=datetime(2026, 1, 2, tzinfo=UTC),
            to_time=datetime(2026, 1, 1, tzinfo=UTC),
        ),
        ExportRequest(
            ExportKind.PARQUET,
            "S1",
            from_time=datetime(2026, 1, 1, tzinfo=UTC),
            to_time=datetime(2026, 1, 1, tzinfo=UTC),
        ),
    ],
    ids=["no-study", "empty-participant", "naive-from", "naive-to", "reversed", "empty-window"],
)
async def test_bad_requests_are_refused(
    trial: Trial, tmp_path: Path, request_: ExportRequest
) -> None:
    with pytest.raises(InvalidExportRequest):
        await export(trial.url, ADMIN, request_, tmp_path / "x")
    assert names_in(tmp_path) == []


async def test_a_non_empty_output_directory_is_never_overwritten(
    trial: Trial, tmp_path: Path
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExists):
        await export(trial.url, ADMIN, ExportRequest(ExportKind.FHIR, "S1"), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExists):
        await export(trial.url, ADMIN, ExportRequest(ExportKind.FHIR, "S1"), tmp_path / "file")
    # An empty directory is fine: the export takes its place.
    empty = tmp_path / "empty"
    empty.mkdir()
    await export(trial.url, ADMIN, ExportRequest(ExportKind.FHIR, "S1"), empty)
    assert (empty / "manifest.json").exists()


async def test_every_export_is_audited_with_the_hash_of_each_file(
    two_sites: Trial, tmp_path: Path
) -> None:
    out = tmp_path / "audited"
    result = await export(
        two_sites.url, CLINICIAN_A, ExportRequest(ExportKind.FHIR, "S1", "P1"), out
    )
    rows = await audit_rows(two_sites.url)
    assert [(a, b) for a, b, _, _ in rows] == [
        ("clin-a", "export.started"),
        ("clin-a", "export.completed"),
    ]
    started, completed = rows[0][2], rows[1][2]
    assert started["export_id"] == completed["export_id"] == result.export_id
    assert (started["kind"], started["participant_id"], started["participants"]) == (
        "fhir",
        "P1",
        ["P1"],
    )
    files = completed["files"]
    assert isinstance(files, list)
    assert sorted(f["path"] for f in files) == sorted(p.name for p in out.iterdir())
    for f in files:
        data = (out / f["path"]).read_bytes()
        assert f["sha256"] == hashlib.sha256(data).hexdigest()
        assert f["bytes"] == len(data)
    assert completed["rows"] == 1
    async with db.connection(two_sites.url) as conn:
        assert (await audit.verify(conn)).ok
        history = await audit.participant_history(conn, "P1")
    assert {"export.started", "export.completed"} <= {r.action for r in history}
