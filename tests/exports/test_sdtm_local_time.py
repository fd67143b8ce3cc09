"""SDTM in local time: daily summaries by the participant's local day across a daylight-saving
change and a move, per-reading VSDTC with the offset valid at each instant, DM, SUPPVS, and a
define.xml that describes exactly the datasets written."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyreadstat
import pytest

from ingest.model import Reading
from storage import db
from storage.exports import ExportKind, ExportRequest, export
from storage.time_zones import set_time_zone
from tests.exports.conftest import MONITOR_A, consent_id_of, ms, store
from tests.exports.sdtm_define import NS, check_define, read_csv
from tests.fixtures.trial import Trial


def utc(month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


# P4 lives in Berlin: consented at 23:00 and enrolled at 00:30 local time on March 21 (still
# March 20 in UTC); Central European Summer Time starts at 02:00 on March 29, 2026.
P4_CONSENT = utc(3, 20, 22)
P4_ENROLLED = utc(3, 20, 23, 30)
P4_READINGS = (
    Reading(ms(utc(3, 28, 23, 30)), "heart_rate", 60.0, "/min", "strap"),
    Reading(ms(utc(3, 29, 0, 30)), "heart_rate", 62.0, "/min", "strap"),
    Reading(ms(utc(3, 29, 1, 30)), "heart_rate", 64.0, "/min", "strap", ("no_sensor_contact",)),
    Reading(ms(utc(3, 29, 21, 30)), "heart_rate", 66.0, "/min", "strap"),
    Reading(ms(utc(3, 29, 22, 30)), "heart_rate", 68.0, "/min", "strap", ("irregular_pulse",)),
)
# P5 enrolls in New York (evening of February 28 local time; daylight-saving time starts
# there on March 8) and moves to Tokyo on March 10 at 00:00 UTC.
P5_ENROLLED = utc(3, 1, 3)
P5_MOVED = utc(3, 10, 0)
P5_READINGS = (
    Reading(ms(utc(3, 9, 3)), "systolic_bp", 120.0, "mm[Hg]", "cuff", (), 1),
    Reading(ms(utc(3, 9, 23)), "systolic_bp", 121.0, "mm[Hg]", "cuff"),
    Reading(ms(utc(3, 10, 2)), "systolic_bp", 122.0, "mm[Hg]", "cuff"),
    Reading(ms(utc(3, 10, 20)), "systolic_bp", 124.0, "mm[Hg]", "cuff"),
)


@pytest.fixture
async def travellers(trial: Trial) -> None:
    await trial.add_participant("P4", "hub-4", consent_at=P4_CONSENT, enrolled_at=P4_ENROLLED)
    await trial.add_participant("P5", "hub-5", consent_at=P5_ENROLLED, enrolled_at=P5_ENROLLED)
    async with db.connection(trial.url, autocommit=True) as conn:
        await set_time_zone(conn, "P4", "Europe/Berlin", P4_ENROLLED, actor="admin")
        await set_time_zone(conn, "P5", "America/New_York", P5_ENROLLED, actor="admin")
        await set_time_zone(conn, "P5", "Asia/Tokyo", P5_MOVED, actor="admin")
    for pid, hub, readings in (("P4", "hub-4", P4_READINGS), ("P5", "hub-5", P5_READINGS)):
        await store(
            trial.url, pid, hub, 1, readings, consent_id=await consent_id_of(trial.url, pid)
        )


@pytest.fixture
async def exported(trial: Trial, travellers: None, tmp_path: Path) -> Path:
    out = tmp_path / "sdtm"
    result = await export(trial.url, MONITOR_A, ExportRequest(ExportKind.SDTM, "S1"), out)
    assert result.participants == ("P1", "P4", "P5")
    # P4: 2 local days x 5 statistics + 5 readings; P5: 4 days x 5 + 4 readings.
    assert result.rows == 15 + 24
    return out


SHOWN = ("VSSEQ", "VSTESTCD", "VSSCAT", "VSORRES", "VSSTAT", "VSDRVFL", "VSDTC", "VSDY")


async def test_daily_records_are_by_local_day_and_study_days_from_local_enrollment(
    exported: Path,
) -> None:
    vs = read_csv(exported / "vs.csv")
    p4 = [tuple(r[n] for n in SHOWN) for r in vs if r["USUBJID"] == "S1-P4"]
    # Local March 29 runs from 23:00 UTC on the 28th to 22:00 UTC on the 29th (23 hours):
    # 60, 62 and 66 are counted, 64 (no sensor contact) is doubted; 68 is on March 30. The
    # local enrollment date is March 21 (day 1), so March 29 is day 9.
    d29 = ("2026-03-29", "9")
    d30 = ("2026-03-30", "10")
    assert p4[:10] == [
        ("1", "HR", "DAILY MEAN", "62.6667", "", "Y", *d29),
        ("2", "HR", "DAILY MINIMUM", "60", "", "Y", *d29),
        ("3", "HR", "DAILY MAXIMUM", "66", "", "Y", *d29),
        ("4", "HR", "DAILY COUNT", "3", "", "Y", *d29),
        ("5", "HR", "DAILY DOUBTFUL COUNT", "1", "", "Y", *d29),
        ("6", "HR", "DAILY MEAN", "68", "", "Y", *d30),
        ("7", "HR", "DAILY MINIMUM", "68", "", "Y", *d30),
        ("8", "HR", "DAILY MAXIMUM", "68", "", "Y", *d30),
        ("9", "HR", "DAILY COUNT", "1", "", "Y", *d30),
        ("10", "HR", "DAILY DOUBTFUL COUNT", "0", "", "Y", *d30),
    ]
    p5 = [(r["VSSCAT"], r["VSORRES"], r["VSDTC"], r["VSDY"]) for r in vs if r["USUBJID"] == "S1-P5"]
    # Enrolled on February 28 in New York (day 1); each reading on its own local day: in New
    # York (EDT) until the move, in Tokyo after it.
    assert [r for r in p5 if r[0] == "DAILY MEAN"] == [
        ("DAILY MEAN", "120", "2026-03-08", "9"),
        ("DAILY MEAN", "121", "2026-03-09", "10"),
        ("DAILY MEAN", "122", "2026-03-10", "11"),
        ("DAILY MEAN", "124", "2026-03-11", "12"),
    ]


async def test_reading_records_carry_the_local_time_and_offset_of_their_instant(
    exported: Path,
) -> None:
    vs = read_csv(exported / "vs.csv")
    p4 = [tuple(r[n] for n in SHOWN) for r in vs if r["USUBJID"] == "S1-P4"]
    assert p4[10:] == [
        ("11", "HR", "READING", "60", "", "", "2026-03-29T00:30:00+01:00", "9"),
        ("12", "HR", "READING", "62", "", "", "2026-03-29T01:30:00+01:00", "9"),
        # One hour later in UTC, after the change: 02:30 local never happened.
        ("13", "HR", "READING", "64", "", "", "2026-03-29T03:30:00+02:00", "9"),
        ("14", "HR", "READING", "66", "", "", "2026-03-29T23:30:00+02:00", "9"),
        ("15", "HR", "READING", "68", "", "", "2026-03-30T00:30:00+02:00", "10"),
    ]
    p5 = [(r["VSSEQ"], r["VSSTRESN"], r["VSDTC"]) for r in vs if r["VSSCAT"] == "READING"]
    assert p5[5:] == [
        ("21", "120.0", "2026-03-08T23:00:00-04:00"),
        ("22", "121.0", "2026-03-09T19:00:00-04:00"),
        ("23", "122.0", "2026-03-10T11:00:00+09:00"),
        ("24", "124.0", "2026-03-11T05:00:00+09:00"),
    ]
    assert {(r["VSORRESU"], r["VSSTRESU"]) for r in vs if r["VSSCAT"] == "READING"} == {
        ("beats/min", "beats/min"),
        ("mmHg", "mmHg"),
    }

    frame, meta = pyreadstat.read_xport(str(exported / "vs.xpt"))
    assert meta.table_name == "VS"
    by_key = {(r["USUBJID"], int(r["VSSEQ"])): r for r in frame.to_dict("records")}
    assert len(by_key) == len(vs)
    r13 = by_key[("S1-P4", 13)]
    assert (r13["VSDTC"], r13["VSSTRESN"], r13["VSSCAT"], r13["VSDY"]) == (
        "2026-03-29T03:30:00+02:00",
        64.0,
        "READING",
        9.0,
    )
    assert by_key[("S1-P4", 1)]["VSSTRESN"] == pytest.approx(188 / 3, rel=1e-12)


async def test_suppvs_holds_what_the_device_said_about_each_reading(exported: Path) -> None:
    supp = read_csv(exported / "suppvs.csv")
    assert [tuple(r.values()) for r in supp] == [
        ("S1", "VS", "S1-P4", "VSSEQ", "13", "VSDEVFL", "Device Flags", "no_sensor_contact",
         "COLLECTED", ""),
        ("S1", "VS", "S1-P4", "VSSEQ", "15", "VSDEVFL", "Device Flags", "irregular_pulse",
         "COLLECTED", ""),
        ("S1", "VS", "S1-P5", "VSSEQ", "21", "VSDEVUSR", "Device User Index", "1",
         "COLLECTED", ""),
    ]  # fmt: skip
    frame, meta = pyreadstat.read_xport(str(exported / "suppvs.xpt"))
    assert meta.table_name == "SUPPVS"
    assert [tuple(r.values()) for r in frame.to_dict("records")] == [
        tuple(r.values()) for r in supp
    ]
    assert tuple(frame.columns) == tuple(supp[0])


async def test_dm_has_one_record_per_exported_participant(exported: Path) -> None:
    dm = read_csv(exported / "dm.csv")
    assert [
        (r["USUBJID"], r["SUBJID"], r["RFSTDTC"], r["RFICDTC"], r["SITEID"])
        for r in dm
        if r["USUBJID"] != "S1-P1"
    ] == [
        ("S1-P4", "P4", "2026-03-21T00:30:00+01:00", "2026-03-20T23:00:00+01:00", "SITE-A"),
        ("S1-P5", "P5", "2026-02-28T22:00:00-05:00", "2026-02-28T22:00:00-05:00", "SITE-A"),
    ]
    assert [r["USUBJID"] for r in dm] == ["S1-P1", "S1-P4", "S1-P5"]
    assert {(r["STUDYID"], r["DOMAIN"]) for r in dm} == {("S1", "DM")}
    # No time zone set: UTC.
    assert dm[0]["RFSTDTC"].endswith("+00:00")
    frame, meta = pyreadstat.read_xport(str(exported / "dm.xpt"))
    assert (meta.table_name, tuple(frame.columns)) == ("DM", tuple(dm[0]))
    assert [tuple(r.values()) for r in frame.to_dict("records")] == [tuple(r.values()) for r in dm]


async def test_define_xml_describes_exactly_the_datasets_written(exported: Path) -> None:
    define = check_define(exported)
    mdv, items, codelists = define.mdv, define.items, define.codelists
    vs = read_csv(exported / "vs.csv")
    scat = {str(c.get("CodedValue")) for c in codelists["CL.VSSCAT"]}
    assert scat == {r["VSSCAT"] for r in vs}
    assert {str(c.get("CodedValue")) for c in codelists["CL.VSSTAT"]} == {"NOT DONE"}
    # VSORRES: derived for the daily statistics, collected for the readings.
    where = {
        w.get("OID"): {str(v.text) for v in w.iterfind("odm:RangeCheck/odm:CheckValue", NS)}
        for w in mdv.findall("def:WhereClauseDef", NS)
    }
    vlm = mdv.find("def:ValueListDef[@OID='VL.VS.VSORRES']", NS)
    assert vlm is not None
    split = {
        str(items[r.get("ItemOID")].find("def:Origin", NS).get("Type")): (  # type: ignore[union-attr]
            where[r.find("def:WhereClauseRef", NS).get("WhereClauseOID")],  # type: ignore[union-attr]
            r.get("MethodOID"),
        )
        for r in vlm.findall("odm:ItemRef", NS)
    }
    assert split == {
        "Derived": (
            {"DAILY MEAN", "DAILY MINIMUM", "DAILY MAXIMUM", "DAILY COUNT", "DAILY DOUBTFUL COUNT"},
            "MT.VS.DAILY",
        ),
        "eDT": ({"READING"}, None),
    }
