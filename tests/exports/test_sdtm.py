"""SDTM: daily summaries equal those computed here from the raw rows, in CSV and in XPT."""

from __future__ import annotations

import csv
import io
import random
import statistics
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyreadstat
import pytest

from storage import db
from storage.exports import ExportKind, ExportRequest, export
from storage.exports.sdtm import NAMES, result_text, study_day
from storage.exports.sdtm_vs import SUPPVS
from tests.exports.conftest import MONITOR_A, consent_id_of, hr, ms, store
from tests.fixtures.trial import Trial

START = datetime(2026, 2, 27, 20, 0, tzinfo=UTC)
ENROLLED = datetime(2026, 2, 25, 9, 0, tzinfo=UTC)
# CDISC VS tests and units for the metrics written here.
VS = {
    "heart_rate": ("HR", "Heart Rate", "beats/min", "8867-4"),
    "systolic_bp": ("SYSBP", "Systolic Blood Pressure", "mmHg", "8480-6"),
    "body_temperature": ("TEMP", "Temperature", "C", "8310-5"),
}
STATS = ("DAILY MEAN", "DAILY MINIMUM", "DAILY MAXIMUM", "DAILY COUNT", "DAILY DOUBTFUL COUNT")
COUNTS = ("DAILY COUNT", "DAILY DOUBTFUL COUNT")


@pytest.fixture
async def raw(trial: Trial) -> list[tuple[datetime, str, float]]:
    """Three days of readings of P3 (plus glucose, which is not a VS test)."""
    await trial.add_participant("P3", "hub-3", consent_at=ENROLLED, enrolled_at=ENROLLED)
    cid = await consent_id_of(trial.url, "P3")
    rng = random.Random(7)
    rows: list[tuple[datetime, str, float]] = []
    for i in range(300):
        t = START + timedelta(minutes=17 * i)
        metric = ("heart_rate", "systolic_bp", "body_temperature")[i % 3]
        base = {"heart_rate": 70.0, "systolic_bp": 120.0, "body_temperature": 36.7}[metric]
        rows.append((t, metric, round(base + rng.uniform(-9, 9), 1)))
    readings = [hr(ms(t), v, metric=m) for t, m, v in rows]
    readings.append(hr(ms(START), 101.0, metric="glucose"))
    for seq, start in enumerate(range(0, len(readings), 100), 1):
        await store(trial.url, "P3", "hub-3", seq, readings[start : start + 100], consent_id=cid)
    return rows


def expected_records(rows: list[tuple[datetime, str, float]]) -> list[dict[str, object]]:
    groups: dict[tuple[str, date], list[float]] = {}
    for t, metric, value in rows:
        groups.setdefault((metric, t.date()), []).append(value)
    out: list[dict[str, object]] = []
    for metric, day in sorted(groups):
        values = groups[(metric, day)]
        testcd, test, unit, loinc = VS[metric]
        # No reading here carries a flag: none is left out, none is counted as doubtful.
        stats = (statistics.fmean(values), min(values), max(values), len(values), 0)
        for stat, value in zip(STATS, stats, strict=True):
            out.append(
                {
                    "USUBJID": "S1-P3",
                    "VSTESTCD": testcd,
                    "VSTEST": test,
                    "VSSCAT": stat,
                    "VSSTRESN": float(value),
                    "VSSTRESU": "" if stat in COUNTS else unit,
                    "VSLOINC": loinc,
                    "VSDTC": day.isoformat(),
                    "VSDY": (day - ENROLLED.date()).days + 1,
                }
            )
    return out


async def test_daily_summaries_equal_an_independent_computation(
    trial: Trial, raw: list[tuple[datetime, str, float]], tmp_path: Path
) -> None:
    out = tmp_path / "sdtm"
    result = await export(trial.url, MONITOR_A, ExportRequest(ExportKind.SDTM, "S1", "P3"), out)
    want = expected_records(raw)
    assert len({r["VSDTC"] for r in want}) == 5  # the readings span five UTC days
    # The daily records, and one per reading (glucose is not a VS test).
    assert result.rows == len(want) + len(raw)
    assert sorted(p.name for p in out.iterdir()) == [
        "define.xml",
        "di.csv",
        "di.xpt",
        "dm.csv",
        "dm.xpt",
        "suppvs.csv",
        "suppvs.xpt",
        "vs.csv",
        "vs.xpt",
    ]

    reader = csv.DictReader(io.StringIO((out / "vs.csv").read_text(encoding="utf-8")))
    everything = list(reader)
    assert tuple(reader.fieldnames or ()) == NAMES
    # Sequence numbers: 1..n within the subject, over daily and reading records.
    assert [int(g["VSSEQ"]) for g in everything] == list(range(1, len(everything) + 1))
    got = [g for g in everything if g["VSDRVFL"] == "Y"]
    readings = [g for g in everything if g["VSSCAT"] == "READING"]
    assert len(got) + len(readings) == len(everything)
    # Without a time zone a participant is on UTC: readings by test, then time.
    assert [(g["VSTESTCD"], g["VSDTC"], float(g["VSSTRESN"])) for g in readings] == [
        (VS[m][0], t.strftime("%Y-%m-%dT%H:%M:%S+00:00"), v)
        for t, m, v in sorted(raw, key=lambda r: (r[1], r[0]))
    ]
    assert {(g["VSDRVFL"], g["VSSTAT"]) for g in readings} == {("", "")}
    key = lambda r: (r["VSTESTCD"], r["VSDTC"], STATS.index(str(r["VSSCAT"])))  # noqa: E731
    got.sort(key=key)
    want.sort(key=key)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (
            g["STUDYID"],
            g["DOMAIN"],
            g["VSCAT"],
            g["VSDRVFL"],
            g["VSSTAT"],
            g["VSREASND"],
        ) == ("S1", "VS", "WEARABLE", "Y", "", "")
        for name in ("USUBJID", "VSTESTCD", "VSTEST", "VSSCAT", "VSSTRESU", "VSLOINC", "VSDTC"):
            assert g[name] == w[name], name
        assert float(g["VSSTRESN"]) == pytest.approx(w["VSSTRESN"], rel=1e-12)
        assert int(g["VSDY"]) == w["VSDY"]
        assert g["VSORRESU"] == g["VSSTRESU"]
        assert g["VSORRES"] == g["VSSTRESC"] == result_text(float(g["VSSTRESN"]))

    frame, meta = pyreadstat.read_xport(str(out / "vs.xpt"))
    assert meta.table_name == "VS"
    assert tuple(frame.columns) == NAMES
    assert dict(zip(meta.column_names, meta.column_labels, strict=True))["VSSTRESN"] == (
        "Numeric Result/Finding in Standard Units"
    )
    xpt = sorted(frame.to_dict("records"), key=lambda r: int(r["VSSEQ"]))
    by_seq = {int(g["VSSEQ"]): g for g in everything}
    assert len(xpt) == len(everything)
    for r in xpt:
        g = by_seq[int(r["VSSEQ"])]
        assert (r["USUBJID"], r["VSTESTCD"], r["VSSCAT"], r["VSDTC"]) == (
            g["USUBJID"],
            g["VSTESTCD"],
            g["VSSCAT"],
            g["VSDTC"],
        )
        assert r["VSSTRESN"] == pytest.approx(float(g["VSSTRESN"]), rel=1e-12)


async def test_the_window_cuts_whole_days_only_by_reading_time(
    trial: Trial, raw: list[tuple[datetime, str, float]], tmp_path: Path
) -> None:
    lo = datetime(2026, 2, 28, 6, 0, tzinfo=UTC)
    hi = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
    out = tmp_path / "cut"
    await export(
        trial.url,
        MONITOR_A,
        ExportRequest(ExportKind.SDTM, "S1", "P3", from_time=lo, to_time=hi),
        out,
    )
    want = expected_records([r for r in raw if lo <= r[0] < hi])
    rows = csv.DictReader(io.StringIO((out / "vs.csv").read_text(encoding="utf-8")))
    got = [r for r in rows if r["VSDRVFL"] == "Y"]
    assert {r["VSDTC"] for r in got} == {"2026-02-28"}
    counts = {r["VSTESTCD"]: int(r["VSORRES"]) for r in got if r["VSSCAT"] == "DAILY COUNT"}
    assert counts == {
        str(w["VSTESTCD"]): int(str(w["VSSTRESN"]).split(".")[0])
        for w in want
        if w["VSSCAT"] == "DAILY COUNT"
    }


async def test_no_readings_gives_a_header_only_dataset(trial: Trial, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    result = await export(trial.url, MONITOR_A, ExportRequest(ExportKind.SDTM, "S1"), out)
    assert result.rows == 0
    assert (out / "vs.csv").read_text().splitlines() == [",".join(NAMES)]
    assert (out / "suppvs.csv").read_text().splitlines() == [",".join(SUPPVS.names)]
    frame, _ = pyreadstat.read_xport(str(out / "vs.xpt"))
    assert len(frame) == 0
    async with db.connection(trial.url) as conn:
        cur = await conn.execute("SELECT count(*) FROM readings")
        assert await cur.fetchone() == (0,)


def test_study_day_has_no_day_zero_and_results_have_no_trailing_zeros() -> None:
    ref = date(2026, 3, 10)
    assert [study_day(ref + timedelta(days=d), ref) for d in (-2, -1, 0, 1)] == [-2, -1, 1, 2]
    assert [result_text(v) for v in (72.0, 72.25, 72.333333, -0.00001, 1e6)] == [
        "72",
        "72.25",
        "72.3333",
        "0",
        "1000000",
    ]
