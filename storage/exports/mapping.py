"""How each canonical metric appears outside: its FHIR category and name, and its CDISC SDTM
VS test. Codes and units come from ``ingest.metrics`` (one source: LOINC and UCUM); this
module adds only what the export formats need besides. docs/exports.md has the tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingest.metrics import METRICS, Metric

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
# Our own code for every metric, beside LOINC (and instead of it where no LOINC code is used).
METRIC_SYSTEM = "urn:trialstream:metric"


@dataclass(frozen=True, slots=True)
class VsTest:
    """A CDISC SDTM Vital Signs test (controlled terminology: VSTESTCD, VSTEST, units)."""

    testcd: str
    test: str
    unit: str


@dataclass(frozen=True, slots=True)
class ExportedMetric:
    metric: Metric
    # FHIR Observation.category (observation-category code) and Observation.code.text.
    category: str
    text: str
    # None: not a vital sign in SDTM terms (glucose belongs to LB, RR intervals and body
    # fat have no VS test), so it is left out of the VS dataset.
    vs: VsTest | None

    @property
    def name(self) -> str:
        return self.metric.name


def _m(name: str, category: str, text: str, vs: VsTest | None) -> ExportedMetric:
    return ExportedMetric(METRICS[name], category, text, vs)


EXPORTED: dict[str, ExportedMetric] = {
    e.name: e
    for e in (
        _m("heart_rate", "vital-signs", "Heart rate", VsTest("HR", "Heart Rate", "beats/min")),
        _m("pulse_rate", "vital-signs", "Pulse rate", VsTest("PULSE", "Pulse Rate", "beats/min")),
        _m("rr_interval", "exam", "RR interval", None),
        _m(
            "body_temperature",
            "vital-signs",
            "Body temperature",
            VsTest("TEMP", "Temperature", "C"),
        ),
        _m(
            "systolic_bp",
            "vital-signs",
            "Systolic blood pressure",
            VsTest("SYSBP", "Systolic Blood Pressure", "mmHg"),
        ),
        _m(
            "diastolic_bp",
            "vital-signs",
            "Diastolic blood pressure",
            VsTest("DIABP", "Diastolic Blood Pressure", "mmHg"),
        ),
        _m(
            "mean_bp",
            "vital-signs",
            "Mean arterial pressure",
            VsTest("MAP", "Mean Arterial Pressure", "mmHg"),
        ),
        _m(
            "spo2",
            "vital-signs",
            "Oxygen saturation (pulse oximetry)",
            VsTest("OXYSAT", "Oxygen Saturation", "%"),
        ),
        _m("glucose", "laboratory", "Blood glucose", None),
        _m("body_weight", "vital-signs", "Body weight", VsTest("WEIGHT", "Weight", "kg")),
        _m("body_fat", "exam", "Body fat percentage", None),
        # What the participant entered with a glucose test (Glucose Measurement Context).
        _m("carbohydrate_intake", "survey", "Carbohydrate intake", None),
        _m("exercise_duration", "activity", "Exercise duration", None),
        _m("exercise_intensity", "activity", "Exercise intensity", None),
        _m("medication_mass", "therapy", "Medication taken (mass)", None),
        _m("medication_volume", "therapy", "Medication taken (volume)", None),
        _m("hba1c", "laboratory", "Hemoglobin A1c", None),
    )
}

VS_METRICS = tuple(name for name, e in EXPORTED.items() if e.vs is not None)
