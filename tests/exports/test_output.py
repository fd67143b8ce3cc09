"""An export interrupted half-way leaves no file under a final name, and says so."""

from __future__ import annotations

import errno
import io
from pathlib import Path
from typing import BinaryIO

import pytest

from storage import db
from storage.exports import ExportKind, ExportRequest, ExportWriteFailed, export
from storage.exports.output import OutputDir
from tests.exports.conftest import MONITOR_A, consent_id_of, hr, names_in, now_ms, store
from tests.fixtures.trial import Trial


class DiskFills(io.FileIO):
    """A real file on which the disk runs out after ``budget`` bytes (shared by all files)."""

    def __init__(self, path: Path, budget: list[int]) -> None:
        super().__init__(path, "xb")
        self._budget = budget

    def write(self, data: object) -> int:
        size = len(memoryview(data))  # type: ignore[arg-type]
        if size > self._budget[0]:
            raise OSError(errno.ENOSPC, "No space left on device (test)")
        self._budget[0] -= size
        return super().write(data)  # type: ignore[arg-type]


def filling_disk(budget: int) -> tuple[list[int], object]:
    left = [budget]

    def open_file(path: Path) -> BinaryIO:
        return DiskFills(path, left)

    return left, open_file


@pytest.fixture
async def many_readings(trial: Trial) -> int:
    cid = await consent_id_of(trial.url, "P1")
    t0 = now_ms() - 3_600_000
    n = 0
    for seq in range(1, 5):
        readings = [hr(t0 + (seq * 1000 + i) * 100, 60.0 + i % 30) for i in range(1000)]
        await store(trial.url, "P1", "hub-1", seq, readings, consent_id=cid)
        n += len(readings)
    return n


# Budgets the full exports exceed, after some chunks were written (SDTM: its CSV is written
# when complete, so the disk fills on its one write).
@pytest.mark.parametrize(
    ("kind", "budget"),
    [(ExportKind.PARQUET, 20_000), (ExportKind.FHIR, 1_000_000), (ExportKind.SDTM, 100)],
)
async def test_a_sink_failing_midway_leaves_nothing_named_as_done(
    trial: Trial, many_readings: int, tmp_path: Path, kind: ExportKind, budget: int
) -> None:
    left, open_file = filling_disk(budget)
    out = tmp_path / "out"
    with pytest.raises(ExportWriteFailed):
        await export(
            trial.url,
            MONITOR_A,
            ExportRequest(kind, "S1"),
            out,
            open_file=open_file,  # type: ignore[arg-type]
            chunk_rows=500,
        )
    if kind is not ExportKind.SDTM:
        assert left[0] < budget  # it did write part of the output before failing
    assert not out.exists()
    assert names_in(tmp_path) == []  # the temporary directory went too
    async with db.connection(trial.url) as conn:
        cur = await conn.execute(
            "SELECT action, detail ->> 'error' FROM audit_log ORDER BY audit_id"
        )
        actions = await cur.fetchall()
    assert actions == [("export.started", None), ("export.failed", "OSError")]


async def test_the_same_export_with_room_to_spare_succeeds(
    trial: Trial, many_readings: int, tmp_path: Path
) -> None:
    left, open_file = filling_disk(50_000_000)
    result = await export(
        trial.url,
        MONITOR_A,
        ExportRequest(ExportKind.FHIR, "S1"),
        tmp_path / "out",
        open_file=open_file,  # type: ignore[arg-type]
        chunk_rows=500,
    )
    assert result.rows == many_readings
    assert names_in(tmp_path) == ["out"]
    assert left[0] < 50_000_000


def test_until_commit_files_exist_only_under_the_temporary_name(tmp_path: Path) -> None:
    out = OutputDir(tmp_path / "final")
    with out.open("a.ndjson") as f:
        f.write(b"{}\n")
    out.count("a.ndjson", 1)
    assert names_in(tmp_path) == [out.temp.name]
    assert out.temp.name.startswith(".final.partial-")
    [written] = out.commit()
    assert names_in(tmp_path) == ["final"]
    assert (written.path, written.rows, written.bytes) == ("a.ndjson", 1, 3)
    assert (tmp_path / "final" / "a.ndjson").read_bytes() == b"{}\n"
