"""What the device said about a reading reaches every export: Parquet's device columns, the
FHIR Observation's extensions, interpretation and body site, and SDTM daily statistics that
leave out and count the readings the device put in doubt (NOT DONE when it doubted them all).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyreadstat
import pytest
from fhir.resources.R4B.observation import Observation

from gateway.broker import MosquittoBroker
from ingest.envelope import seal
from ingest.model import Payload, Reading, SensorReport
from ingest.pipeline import up_topic
from ingest.receipts import RECEIPT_ACCEPTED, open_receipt
from storage.exports import ExportKind, ExportRequest, export
from storage.exports.fhir import body_site
from storage.exports.parquet import device_quality
from storage.exports.sdtm import NAMES
from tests.exports.conftest import MONITOR_A, consent_id_of, ms, now_ms, read_dataset, store
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.mqtt import MqttProbe
from tests.fixtures.trial import Trial

ENROLLED = datetime(2026, 2, 25, 9, 0, tzinfo=UTC)
FLAG_URL = "https://trialstream.org/fhir/StructureDefinition/device-flag"
USER_URL = "https://trialstream.org/fhir/StructureDefinition/device-user"
QUALITY_SYSTEM = "https://trialstream.org/fhir/CodeSystem/device-quality"
REASON = "DEVICE MARKED INVALID OR QUESTIONABLE"


def at(day: int, hour: int, minute: int = 0) -> int:
    return ms(datetime(2026, 3, day, hour, minute, tzinfo=UTC))


# (time, metric, value, unit, sensor, flags, device user): March 2 has a plain heart rate,
# one with an info flag, one the device marked invalid and one it marked questionable, a
# temperature taken in the armpit and a blood pressure of user 2 of a shared cuff; on
# March 3 the device doubted every heart rate.
READINGS = (
    Reading(at(2, 8, 0), "heart_rate", 70.0, "/min", "strap"),
    Reading(at(2, 8, 1), "heart_rate", 80.0, "/min", "strap", ("irregular_pulse",)),
    Reading(at(2, 8, 2), "heart_rate", 250.0, "/min", "strap", ("no_sensor_contact",)),
    Reading(at(2, 8, 3), "heart_rate", 30.0, "/min", "strap", ("poor_signal",)),
    Reading(at(2, 9), "body_temperature", 36.9, "Cel", "thermo", ("site_armpit",)),
    Reading(at(2, 10), "systolic_bp", 121.0, "mm[Hg]", "cuff", (), 2),
    Reading(at(3, 8, 0), "heart_rate", 20.0, "/min", "strap", ("invalid_measurement",)),
    Reading(
        at(3, 8, 1),
        "heart_rate",
        210.0,
        "/min",
        "strap",
        ("body_movement", "questionable_measurement"),
    ),
)


@pytest.fixture
async def flagged(trial: Trial) -> None:
    await trial.add_participant("P3", "hub-3", consent_at=ENROLLED, enrolled_at=ENROLLED)
    cid = await consent_id_of(trial.url, "P3")
    await store(trial.url, "P3", "hub-3", 1, READINGS, consent_id=cid)


async def test_parquet_has_the_flags_their_worst_class_and_the_device_user(
    trial: Trial, flagged: None, tmp_path: Path
) -> None:
    out = tmp_path / "parquet"
    result = await export(trial.url, MONITOR_A, ExportRequest(ExportKind.PARQUET, "S1", "P3"), out)
    assert result.rows == len(READINGS)
    table = read_dataset(out)
    got = table.select(["value", "device_flags", "device_quality", "device_user"]).to_pylist()
    assert got == [
        {"value": 70.0, "device_flags": None, "device_quality": None, "device_user": None},
        {
            "value": 80.0,
            "device_flags": ["irregular_pulse"],
            "device_quality": "info",
            "device_user": None,
        },
        {
            "value": 250.0,
            "device_flags": ["no_sensor_contact"],
            "device_quality": "invalid",
            "device_user": None,
        },
        {
            "value": 30.0,
            "device_flags": ["poor_signal"],
            "device_quality": "questionable",
            "device_user": None,
        },
        {
            "value": 36.9,
            "device_flags": ["site_armpit"],
            "device_quality": "info",
            "device_user": None,
        },
        {"value": 121.0, "device_flags": None, "device_quality": None, "device_user": 2},
        {
            "value": 20.0,
            "device_flags": ["invalid_measurement"],
            "device_quality": "invalid",
            "device_user": None,
        },
        {
            "value": 210.0,
            "device_flags": ["body_movement", "questionable_measurement"],
            "device_quality": "questionable",
            "device_user": None,
        },
    ]
    flags_type = table.schema.field("device_flags").type
    assert pa.types.is_list(flags_type)
    assert flags_type.value_type == pa.string()
    assert table.schema.field("device_quality").type == pa.string()
    assert table.schema.field("device_user").type == pa.int16()


def test_quality_is_the_worst_class_and_an_unknown_code_is_info() -> None:
    assert device_quality(None) is None
    assert device_quality(["site_armpit", "cuff_loose", "no_sensor_contact"]) == "invalid"
    assert device_quality(["irregular_pulse", "cuff_loose"]) == "questionable"
    assert device_quality(["a_code_from_a_newer_hub"]) == "info"


def by_value(path: Path) -> dict[float, dict[str, Any]]:
    observations = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {o["valueQuantity"]["value"]: o for o in observations}


async def test_fhir_observations_carry_extensions_interpretation_and_body_site(
    trial: Trial, flagged: None, tmp_path: Path
) -> None:
    out = tmp_path / "fhir"
    await export(trial.url, MONITOR_A, ExportRequest(ExportKind.FHIR, "S1", "P3"), out)
    obs = by_value(out / "Observation.ndjson")
    assert sorted(obs) == sorted(r.value for r in READINGS)
    for o in obs.values():
        Observation.model_validate(o)
        # The value is kept and the status stays final whatever the device said.
        assert o["status"] == "final"
        assert "dataAbsentReason" not in o

    statement = ("extension", "interpretation", "bodySite")
    assert [k for k in statement if k in obs[70.0]] == []
    assert [k for k in statement if k in obs[80.0]] == ["extension"]
    assert obs[80.0]["extension"] == [{"url": FLAG_URL, "valueCode": "irregular_pulse"}]

    assert obs[250.0]["extension"] == [{"url": FLAG_URL, "valueCode": "no_sensor_contact"}]
    assert obs[250.0]["interpretation"] == [
        {
            "coding": [
                {
                    "system": QUALITY_SYSTEM,
                    "code": "invalid",
                    "display": "Device marked the measurement invalid",
                }
            ],
            "text": "Device marked the measurement invalid: no_sensor_contact",
        }
    ]
    assert obs[30.0]["interpretation"] == [
        {
            "coding": [
                {
                    "system": QUALITY_SYSTEM,
                    "code": "questionable",
                    "display": "Device marked the measurement questionable",
                }
            ],
            "text": "Device marked the measurement questionable: poor_signal",
        }
    ]
    assert obs[210.0]["extension"] == [
        {"url": FLAG_URL, "valueCode": "body_movement"},
        {"url": FLAG_URL, "valueCode": "questionable_measurement"},
    ]
    assert obs[210.0]["interpretation"][0]["text"] == (
        "Device marked the measurement questionable: body_movement, questionable_measurement"
    )

    assert [k for k in statement if k in obs[36.9]] == ["extension", "bodySite"]
    assert obs[36.9]["bodySite"] == {"text": "armpit"}

    assert [k for k in statement if k in obs[121.0]] == ["extension"]
    assert obs[121.0]["extension"] == [{"url": USER_URL, "valueInteger": 2}]


def test_body_site_comes_from_site_and_location_flags_only() -> None:
    assert body_site(["site_armpit"]) == "armpit"
    assert body_site(["site_gastrointestinal_tract"]) == "gastrointestinal tract"
    assert body_site(["location_finger", "sample_capillary_whole_blood"]) == "finger"
    # Not a place on the body: a control solution, a value the profile reserves, a sample.
    assert body_site(["location_control_solution", "control_solution"]) is None
    assert body_site(["site_reserved_12", "location_reserved_7"]) is None
    assert body_site(["sample_capillary_plasma", "irregular_pulse"]) is None


async def test_sdtm_statistics_leave_out_and_count_what_the_device_doubted(
    trial: Trial, flagged: None, tmp_path: Path
) -> None:
    out = tmp_path / "sdtm"
    result = await export(trial.url, MONITOR_A, ExportRequest(ExportKind.SDTM, "S1", "P3"), out)
    # 20 daily records, then one per reading (8).
    assert result.rows == 28
    reader = csv.DictReader(io.StringIO((out / "vs.csv").read_text(encoding="utf-8")))
    assert tuple(reader.fieldnames or ()) == NAMES
    rows = list(reader)
    shown = ("VSSEQ", "VSTESTCD", "VSSCAT", "VSORRES", "VSORRESU", "VSSTRESN", "VSSTAT")
    got = [(*(r[n] for n in shown), r["VSREASND"], r["VSDTC"], r["VSDY"]) for r in rows[:20]]
    d2 = ("2026-03-02", "6")
    d3 = ("2026-03-03", "7")
    assert got == [
        ("1", "TEMP", "DAILY MEAN", "36.9", "C", "36.9", "", "", *d2),
        ("2", "TEMP", "DAILY MINIMUM", "36.9", "C", "36.9", "", "", *d2),
        ("3", "TEMP", "DAILY MAXIMUM", "36.9", "C", "36.9", "", "", *d2),
        ("4", "TEMP", "DAILY COUNT", "1", "", "1.0", "", "", *d2),
        ("5", "TEMP", "DAILY DOUBTFUL COUNT", "0", "", "0.0", "", "", *d2),
        # 250 (invalid) and 30 (questionable) are left out; 80 (info only) is not.
        ("6", "HR", "DAILY MEAN", "75", "beats/min", "75.0", "", "", *d2),
        ("7", "HR", "DAILY MINIMUM", "70", "beats/min", "70.0", "", "", *d2),
        ("8", "HR", "DAILY MAXIMUM", "80", "beats/min", "80.0", "", "", *d2),
        ("9", "HR", "DAILY COUNT", "2", "", "2.0", "", "", *d2),
        ("10", "HR", "DAILY DOUBTFUL COUNT", "2", "", "2.0", "", "", *d2),
        # Every heart rate of March 3 was doubted: no result, and why.
        ("11", "HR", "DAILY MEAN", "", "", "", "NOT DONE", REASON, *d3),
        ("12", "HR", "DAILY MINIMUM", "", "", "", "NOT DONE", REASON, *d3),
        ("13", "HR", "DAILY MAXIMUM", "", "", "", "NOT DONE", REASON, *d3),
        ("14", "HR", "DAILY COUNT", "0", "", "0.0", "", "", *d3),
        ("15", "HR", "DAILY DOUBTFUL COUNT", "2", "", "2.0", "", "", *d3),
        ("16", "SYSBP", "DAILY MEAN", "121", "mmHg", "121.0", "", "", *d2),
        ("17", "SYSBP", "DAILY MINIMUM", "121", "mmHg", "121.0", "", "", *d2),
        ("18", "SYSBP", "DAILY MAXIMUM", "121", "mmHg", "121.0", "", "", *d2),
        ("19", "SYSBP", "DAILY COUNT", "1", "", "1.0", "", "", *d2),
        ("20", "SYSBP", "DAILY DOUBTFUL COUNT", "0", "", "0.0", "", "", *d2),
    ]

    # Every reading keeps its result, doubted or not: the device's word is in SUPPVS.
    shown = ("VSSEQ", "VSTESTCD", "VSSCAT", "VSORRES", "VSSTAT", "VSDRVFL", "VSDTC", "VSDY")
    assert [tuple(r[n] for n in shown) for r in rows[20:]] == [
        ("21", "TEMP", "READING", "36.9", "", "", "2026-03-02T09:00:00+00:00", "6"),
        ("22", "HR", "READING", "70", "", "", "2026-03-02T08:00:00+00:00", "6"),
        ("23", "HR", "READING", "80", "", "", "2026-03-02T08:01:00+00:00", "6"),
        ("24", "HR", "READING", "250", "", "", "2026-03-02T08:02:00+00:00", "6"),
        ("25", "HR", "READING", "30", "", "", "2026-03-02T08:03:00+00:00", "6"),
        ("26", "HR", "READING", "20", "", "", "2026-03-03T08:00:00+00:00", "7"),
        ("27", "HR", "READING", "210", "", "", "2026-03-03T08:01:00+00:00", "7"),
        ("28", "SYSBP", "READING", "121", "", "", "2026-03-02T10:00:00+00:00", "6"),
    ]
    supp = list(csv.DictReader(io.StringIO((out / "suppvs.csv").read_text(encoding="utf-8"))))
    assert {(r["STUDYID"], r["RDOMAIN"], r["USUBJID"], r["IDVAR"]) for r in supp} == {
        ("S1", "VS", "S1-P3", "VSSEQ")
    }
    assert {(r["QORIG"], r["QEVAL"]) for r in supp} == {("COLLECTED", "")}
    assert [(r["IDVARVAL"], r["QNAM"], r["QLABEL"], r["QVAL"]) for r in supp] == [
        ("21", "VSDEVFL", "Device Flags", "site_armpit"),
        ("23", "VSDEVFL", "Device Flags", "irregular_pulse"),
        ("24", "VSDEVFL", "Device Flags", "no_sensor_contact"),
        ("25", "VSDEVFL", "Device Flags", "poor_signal"),
        ("26", "VSDEVFL", "Device Flags", "invalid_measurement"),
        ("27", "VSDEVFL", "Device Flags", "body_movement questionable_measurement"),
        ("28", "VSDEVUSR", "Device User Index", "2"),
    ]

    frame, meta = pyreadstat.read_xport(str(out / "vs.xpt"))
    assert tuple(frame.columns) == NAMES
    labels = dict(zip(meta.column_names, meta.column_labels, strict=True))
    assert (labels["VSSTAT"], labels["VSREASND"]) == ("Completion Status", "Reason Not Performed")
    records = sorted(frame.to_dict("records"), key=lambda r: int(r["VSSEQ"]))
    assert len(records) == 28
    not_done = [r for r in records if r["VSSTAT"] == "NOT DONE"]
    assert [(int(r["VSSEQ"]), r["VSREASND"], r["VSORRES"]) for r in not_done] == [
        (11, REASON, ""),
        (12, REASON, ""),
        (13, REASON, ""),
    ]
    assert all(math.isnan(r["VSSTRESN"]) for r in not_done)
    assert [r["VSSTRESN"] for r in records[5:10]] == [75.0, 70.0, 80.0, 2.0, 2.0]
    assert {r["VSSTAT"] for r in records if r not in not_done} == {""}


@pytest.fixture
async def probe(mosquitto: MosquittoBroker, gateway: RunningGateway) -> AsyncIterator[MqttProbe]:
    p = MqttProbe(mosquitto, "device-flags-probe")
    p.subscribe("dct/v1/+/down")
    yield p
    p.close()


async def test_flags_sent_through_the_gateway_reach_the_parquet_export(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe, tmp_path: Path
) -> None:
    t = now_ms() - 60_000
    cuff = SensorReport("cuff", "Acme", "BP-7", "SN1", "1.0", None, 80, paired_user=1)
    payload = Payload(
        "hub-1",
        1,
        t + 5000,
        (
            Reading(
                t, "systolic_bp", 131.0, "mm[Hg]", "cuff", ("cuff_loose", "irregular_pulse"), 1
            ),
            Reading(t + 1000, "spo2", 97.0, "%", "oxi"),
        ),
        sensors=(cuff,),
    )
    probe.publish(up_topic("hub-1"), seal(payload, trial.hubs["hub-1"].key))
    _, raw = await probe.next()
    receipt = open_receipt(raw, gateway.receipt_public_key)
    assert (receipt.status, receipt.stored) == (RECEIPT_ACCEPTED, 2)

    out = tmp_path / "parquet"
    await export(trial.url, MONITOR_A, ExportRequest(ExportKind.PARQUET, "S1", "P1"), out)
    table = read_dataset(out)
    assert table.select(
        ["metric", "device_flags", "device_quality", "device_user"]
    ).to_pylist() == [
        {
            "metric": "systolic_bp",
            "device_flags": ["cuff_loose", "irregular_pulse"],
            "device_quality": "questionable",
            "device_user": 1,
        },
        {"metric": "spo2", "device_flags": None, "device_quality": None, "device_user": None},
    ]
