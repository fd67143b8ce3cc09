"""SDTM device provenance (SDTMIG-MD): a DI dataset with one device per wearable description
the readings were taken under, and each VS reading record's SPDEVID naming the one valid at
its time; a strap replaced under the same sensor name is two devices."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyreadstat
import pytest

from ingest.model import Reading, SensorReport
from storage import db
from storage.exports import ExportKind, ExportRequest, export
from storage.exports.sdtm_di import DI
from tests.exports.conftest import MONITOR_A, consent_id_of, ms, store
from tests.exports.sdtm_define import NS, check_define, read_csv
from tests.fixtures.trial import Trial

ENROLLED = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
STRAP_A = SensorReport("hr-strap", "Acme", "HRM-2", "S1", "1.0", "rev-B", 90)
# Another strap: it serves no manufacturer or hardware revision, and must not inherit A's.
STRAP_B = SensorReport("hr-strap", None, "HRM-3", "S2", "2.0", None, 100)


def at(hour: int, minute: int) -> datetime:
    return datetime(2026, 3, 2, hour, minute, tzinfo=UTC)


def beat(t: datetime, value: float) -> Reading:
    return Reading(ms(t), "heart_rate", value, "/min", "hr-strap")


# B is reported in the envelope sealed at 09:00: readings before it are A's, even the one
# that travels with B's report.
SWAP = at(9, 0)


@pytest.fixture
async def swapped(trial: Trial) -> dict[str, str]:
    """P3's strap A, then strap B under the same name, and a thermometer that never
    described itself. Returns the SPDEVID of each strap by serial number."""
    await trial.add_participant("P3", "hub-3", consent_at=ENROLLED, enrolled_at=ENROLLED)
    cid = await consent_id_of(trial.url, "P3")
    thermo = Reading(ms(at(8, 2)), "body_temperature", 36.8, "Cel", "thermo")
    envelopes = (
        (at(8, 10), (beat(at(8, 0), 60.0), thermo, beat(at(8, 5), 61.0)), (STRAP_A,)),
        (SWAP, (beat(at(8, 30), 62.0),), (STRAP_B,)),
        (at(10, 0), (beat(at(9, 10), 70.0), beat(at(9, 20), 71.0)), ()),
    )
    for seq, (sealed, readings, sensors) in enumerate(envelopes, 1):
        await store(
            trial.url,
            "P3",
            "hub-3",
            seq,
            readings,
            consent_id=cid,
            sent_ms=ms(sealed),
            sensors=sensors,
        )
    async with db.connection(trial.url) as conn:
        cur = await conn.execute(
            "SELECT serial, description_id FROM sensor_descriptions"
            " WHERE device_id = 'hub-3' ORDER BY description_id"
        )
        ids = await cur.fetchall()
    assert [serial for serial, _ in ids] == ["S1", "S2"]
    return {serial: f"SENSOR-{description_id}" for serial, description_id in ids}


async def test_each_reading_names_the_strap_of_its_own_time(
    trial: Trial, swapped: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "sdtm"
    result = await export(trial.url, MONITOR_A, ExportRequest(ExportKind.SDTM, "S1", "P3"), out)
    # One local day of each test: 2 x 5 statistics, and 6 readings.
    assert result.rows == 16
    a, b = swapped["S1"], swapped["S2"]
    vs = read_csv(out / "vs.csv")
    assert [
        (r["VSSEQ"], r["VSTESTCD"], r["VSSCAT"], r["VSORRES"], r["VSDTC"], r["SPDEVID"])
        for r in vs
        if r["VSSCAT"] == "READING"
    ] == [
        # The thermometer never described itself: no device.
        ("11", "TEMP", "READING", "36.8", "2026-03-02T08:02:00+00:00", ""),
        ("12", "HR", "READING", "60", "2026-03-02T08:00:00+00:00", a),
        ("13", "HR", "READING", "61", "2026-03-02T08:05:00+00:00", a),
        ("14", "HR", "READING", "62", "2026-03-02T08:30:00+00:00", a),
        ("15", "HR", "READING", "70", "2026-03-02T09:10:00+00:00", b),
        ("16", "HR", "READING", "71", "2026-03-02T09:20:00+00:00", b),
    ]
    # A daily statistic may summarise readings of several devices: it names none.
    assert {r["SPDEVID"] for r in vs if r["VSSCAT"] != "READING"} == {""}
    assert len([r for r in vs if r["VSSCAT"] != "READING"]) == 10

    di = read_csv(out / "di.csv")
    assert list(di[0]) == list(DI.names)
    assert [tuple(r.values()) for r in di] == [
        ("S1", "DI", a, "1", "DEVTYPE", "Device Type", "HEART RATE MONITOR"),
        ("S1", "DI", a, "1", "MANUF", "Manufacturer", "Acme"),
        ("S1", "DI", a, "1", "MODEL", "Model Number", "HRM-2"),
        ("S1", "DI", a, "1", "SERIAL", "Serial Number", "S1"),
        ("S1", "DI", a, "1", "FIRMVER", "Firmware Version", "1.0"),
        ("S1", "DI", a, "1", "HARDVER", "Hardware Version", "rev-B"),
        # B reported no manufacturer and no hardware revision: no rows for them.
        ("S1", "DI", b, "1", "DEVTYPE", "Device Type", "HEART RATE MONITOR"),
        ("S1", "DI", b, "1", "MODEL", "Model Number", "HRM-3"),
        ("S1", "DI", b, "1", "SERIAL", "Serial Number", "S2"),
        ("S1", "DI", b, "1", "FIRMVER", "Firmware Version", "2.0"),
    ]

    frame, meta = pyreadstat.read_xport(str(out / "di.xpt"))
    assert (meta.table_name, meta.file_label) == ("DI", "Device Identifiers")
    assert list(frame.columns) == list(DI.names)
    assert meta.readstat_variable_types["DISEQ"] == "double"
    assert [
        (r["SPDEVID"], r["DISEQ"], r["DIPARMCD"], r["DIVAL"]) for r in frame.to_dict("records")
    ] == [(r["SPDEVID"], 1.0, r["DIPARMCD"], r["DIVAL"]) for r in di]
    vs_frame, vs_meta = pyreadstat.read_xport(str(out / "vs.xpt"))
    labels = dict(zip(vs_meta.column_names, vs_meta.column_labels, strict=True))
    assert labels["SPDEVID"] == "Sponsor Device Identifier"
    assert [(int(r["VSSEQ"]), r["SPDEVID"]) for r in vs_frame.to_dict("records")] == [
        (int(r["VSSEQ"]), r["SPDEVID"]) for r in vs
    ]


async def test_define_xml_describes_di_and_spdevid(
    trial: Trial, swapped: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "sdtm"
    await export(trial.url, MONITOR_A, ExportRequest(ExportKind.SDTM, "S1", "P3"), out)
    define = check_define(out)
    group = define.groups["DI"]
    assert (
        group.get("Domain"),
        group.get("IsReferenceData"),
        group.get("Repeating"),
        group.get(f"{{{NS['def']}}}Class"),
    ) == ("DI", "Yes", "No", "STUDY REFERENCE")
    refs = {
        str(define.items[r.get("ItemOID")].get("Name")): r for r in group.findall("odm:ItemRef", NS)
    }
    assert {n for n, r in refs.items() if r.get("Mandatory") == "Yes"} == set(DI.names)
    assert {n: r.get("KeySequence") for n, r in refs.items() if r.get("KeySequence")} == {
        "STUDYID": "1",
        "SPDEVID": "2",
        "DIPARMCD": "3",
    }
    codes = define.codelists["CL.DIPARMCD"]
    extended = f"{{{NS['def']}}}ExtendedValue"
    assert [
        (
            c.get("CodedValue"),
            c.findtext("odm:Decode/odm:TranslatedText", namespaces=NS),
            c.get(extended),
        )
        for c in codes
    ] == [
        ("DEVTYPE", "Device Type", None),
        ("MANUF", "Manufacturer", None),
        ("MODEL", "Model Number", None),
        ("SERIAL", "Serial Number", None),
        ("FIRMVER", "Firmware Version", "Yes"),
        ("HARDVER", "Hardware Version", "Yes"),
    ]
    origin = define.items["IT.DI.DIVAL"].find("def:Origin", NS)
    assert origin is not None
    assert origin.get("Type") == "eDT"
    # VS's SPDEVID: optional, derived from the description valid at the reading's time.
    vs_ref = define.groups["VS"].find("odm:ItemRef[@ItemOID='IT.VS.SPDEVID']", NS)
    assert vs_ref is not None
    assert (vs_ref.get("Mandatory"), vs_ref.get("MethodOID")) == ("No", "MT.VS.SPDEVID")
    assert define.items["IT.VS.SPDEVID"].get("Length") == str(len(swapped["S1"]))


async def test_di_lists_only_the_devices_of_the_exported_readings(
    trial: Trial, swapped: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "late"
    request = ExportRequest(ExportKind.SDTM, "S1", "P3", from_time=SWAP)
    await export(trial.url, MONITOR_A, request, out)
    di = read_csv(out / "di.csv")
    assert {r["SPDEVID"] for r in di} == {swapped["S2"]}
    out = tmp_path / "early"
    # Only the thermometer's reading: no device is known, DI has its header only.
    request = ExportRequest(ExportKind.SDTM, "S1", "P3", from_time=at(8, 1), to_time=at(8, 3))
    await export(trial.url, MONITOR_A, request, out)
    vs = read_csv(out / "vs.csv")
    assert [(r["VSTESTCD"], r["SPDEVID"]) for r in vs if r["VSSCAT"] == "READING"] == [("TEMP", "")]
    assert (out / "di.csv").read_text().splitlines() == [",".join(DI.names)]
    frame, _ = pyreadstat.read_xport(str(out / "di.xpt"))
    assert len(frame) == 0
    check_define(out)
