"""FHIR: NDJSON per resource type that validates against the R4 models of fhir.resources
(its R4B package: FHIR 4.3, whose Observation, Patient and Device are R4's), with LOINC codes
and UCUM units as DESIGN.md lists them, and references that resolve inside the export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fhir.resources.R4B import __fhir_version__
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient

from ingest.model import SensorReport
from storage.exports import ExportKind, ExportRequest, export
from tests.exports.conftest import MONITOR_A, consent_id_of, hr, now_ms, store
from tests.fixtures.trial import Trial

# metric -> (LOINC, UCUM code), copied from DESIGN.md "Metrics and units", not from the code.
DESIGN_TABLE = {
    "heart_rate": ("8867-4", "/min"),
    "body_temperature": ("8310-5", "Cel"),
    "systolic_bp": ("8480-6", "mm[Hg]"),
    "diastolic_bp": ("8462-4", "mm[Hg]"),
    "mean_bp": ("8478-0", "mm[Hg]"),
    "pulse_rate": ("8889-8", "/min"),
    "spo2": ("59408-5", "%"),
    "glucose": ("2339-0", "mg/dL"),
    "body_weight": ("29463-7", "kg"),
    "body_fat": ("41982-0", "%"),
}
VALUES = {
    "heart_rate": 72.0,
    "body_temperature": 36.8,
    "systolic_bp": 121.0,
    "diastolic_bp": 79.0,
    "mean_bp": 93.0,
    "pulse_rate": 70.0,
    "spo2": 97.0,
    "glucose": 104.0,
    "body_weight": 71.3,
    "body_fat": 21.5,
    "rr_interval": 830.0,
}


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_resources_validate_as_r4_and_carry_loinc_and_ucum(
    trial: Trial, tmp_path: Path
) -> None:
    assert __fhir_version__.startswith("4.")
    t0 = now_ms() - 600_000
    cid = await consent_id_of(trial.url, "P1")
    await store(
        trial.url,
        "P1",
        "hub-1",
        1,
        [hr(t0 + i * 1000, v, metric=m, sensor="multi") for i, (m, v) in enumerate(VALUES.items())],
        consent_id=cid,
        sensors=[SensorReport("multi", "Acme", "M-1", "SN-9", "2.0.1", "B")],
    )
    out = tmp_path / "fhir"
    result = await export(trial.url, MONITOR_A, ExportRequest(ExportKind.FHIR, "S1"), out)
    assert result.rows == len(VALUES)
    assert sorted(p.name for p in out.iterdir()) == [
        "Device.ndjson",
        "Observation.ndjson",
        "Patient.ndjson",
        "manifest.json",
    ]

    # Every resource validates against the R4 models; the checks below read the JSON itself.
    observations = lines(out / "Observation.ndjson")
    patients = lines(out / "Patient.ndjson")
    devices = lines(out / "Device.ndjson")
    for model, resources in ((Observation, observations), (Patient, patients), (Device, devices)):
        for resource in resources:
            model.model_validate(resource)
    assert len(observations) == len(VALUES)
    assert len({o["id"] for o in observations}) == len(VALUES)

    def codes(o: dict[str, Any], system: str) -> list[str]:
        return [c["code"] for c in o["code"]["coding"] if c["system"] == system]

    by_metric = {codes(o, "urn:trialstream:metric")[0]: o for o in observations}
    assert set(by_metric) == set(VALUES)
    for metric, (loinc, ucum) in DESIGN_TABLE.items():
        o = by_metric[metric]
        assert codes(o, "http://loinc.org") == [loinc]
        assert o["valueQuantity"] == {
            "value": VALUES[metric],
            "unit": ucum,
            "system": "http://unitsofmeasure.org",
            "code": ucum,
        }
        assert o["status"] == "final"
    # No LOINC code is used for RR intervals (DESIGN.md: verify one first): ours only.
    rr = by_metric["rr_interval"]
    assert [c["system"] for c in rr["code"]["coding"]] == ["urn:trialstream:metric"]
    assert (rr["valueQuantity"]["code"], rr["valueQuantity"]["value"]) == ("ms", 830.0)

    def category(metric: str) -> list[str]:
        return [c["code"] for cat in by_metric[metric]["category"] for c in cat["coding"]]

    assert category("heart_rate") == ["vital-signs"]
    assert category("glucose") == ["laboratory"]
    assert by_metric["heart_rate"]["effectiveDateTime"].endswith("Z")

    # The pseudonymous Patient: an identifier and the PSEUDED label, nothing about the person.
    assert len(patients) == 1
    patient = patients[0]
    assert set(patient) == {"resourceType", "id", "meta", "identifier"}
    assert patient["identifier"][0]["value"] == "P1"
    assert patient["meta"]["security"][0]["code"] == "PSEUDED"

    # References resolve inside the export: subject -> Patient, device -> wearable -> hub.
    patient_ref = f"Patient/{patient['id']}"
    assert {o["subject"]["reference"] for o in observations} == {patient_ref}
    wearable_refs = {o["device"]["reference"] for o in observations}
    assert len(wearable_refs) == 1
    wearable = next(d for d in devices if f"Device/{d['id']}" in wearable_refs)
    hub = next(d for d in devices if d["id"] != wearable["id"])
    assert len(devices) == 2
    assert wearable["parent"]["reference"] == f"Device/{hub['id']}"
    assert (wearable["manufacturer"], wearable["modelNumber"], wearable["serialNumber"]) == (
        "Acme",
        "M-1",
        "SN-9",
    )
    assert [(v["type"]["text"], v["value"]) for v in wearable["version"]] == [
        ("firmware", "2.0.1"),
        ("hardware", "B"),
    ]
    assert hub["identifier"][0]["value"] == "hub-1"
    assert wearable["patient"]["reference"] == hub["patient"]["reference"] == patient_ref

    manifest = json.loads((out / "manifest.json").read_text())
    assert {o["type"]: o["count"] for o in manifest["output"]} == {
        "Patient": 1,
        "Device": 2,
        "Observation": len(VALUES),
    }
    assert manifest["request"] == "trialstream export fhir --study S1"


async def test_same_reading_gets_the_same_ids_in_every_export(trial: Trial, tmp_path: Path) -> None:
    await store(trial.url, "P1", "hub-1", 1, [hr(now_ms() - 5000, 70.0)])
    ids = []
    for name in ("a", "b"):
        await export(trial.url, MONITOR_A, ExportRequest(ExportKind.FHIR, "S1"), tmp_path / name)
        ids.append([o["id"] for o in lines(tmp_path / name / "Observation.ndjson")])
    assert ids[0] == ids[1]
    assert len(ids[0]) == 1


async def test_a_sensor_never_described_gives_a_device_without_model(
    trial: Trial, tmp_path: Path
) -> None:
    await store(trial.url, "P1", "hub-1", 1, [hr(now_ms() - 5000, 70.0, sensor="anon")])
    out = tmp_path / "anon"
    await export(trial.url, MONITOR_A, ExportRequest(ExportKind.FHIR, "S1"), out)
    devices = lines(out / "Device.ndjson")
    for d in devices:
        Device.model_validate(d)
    wearable = next(d for d in devices if "parent" in d)
    assert not {"modelNumber", "serialNumber", "version", "manufacturer"} & set(wearable)
    assert wearable["deviceName"] == [{"name": "anon", "type": "user-friendly-name"}]
