"""The canonical metrics: the unit each is stored in, its LOINC code, and its consent scope.

Drivers convert to these units on the hub; the gateway refuses any other unit rather than
guess (reason ``wrong_unit``). A metric's scope is what a consent document must cover.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    unit: str
    scope: str
    loinc: str | None
    # Physiologically possible bounds: outside them a value is a sensor or driver fault
    # (reason implausible_value), not a clinical finding. Alert thresholds are far inside.
    low: float
    high: float


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("heart_rate", "/min", "heart_rate", "8867-4", 0, 400),
        Metric("rr_interval", "ms", "heart_rate", None, 0, 10_000),
        Metric("pulse_rate", "/min", "heart_rate", "8889-8", 0, 400),
        Metric("body_temperature", "Cel", "temperature", "8310-5", 10, 50),
        Metric("systolic_bp", "mm[Hg]", "blood_pressure", "8480-6", 0, 400),
        Metric("diastolic_bp", "mm[Hg]", "blood_pressure", "8462-4", 0, 400),
        Metric("mean_bp", "mm[Hg]", "blood_pressure", "8478-0", 0, 400),
        Metric("spo2", "%", "spo2", "59408-5", 0, 100),
        Metric("glucose", "mg/dL", "glucose", "2339-0", 0, 2000),
        Metric("body_weight", "kg", "weight", "29463-7", 0, 700),
        Metric("body_fat", "%", "weight", "41982-0", 0, 100),
        # Glucose Measurement Context: what the participant entered with a test.
        Metric("carbohydrate_intake", "g", "glucose", None, 0, 1000),
        Metric("exercise_duration", "s", "glucose", None, 0, 65534),
        Metric("exercise_intensity", "%", "glucose", None, 0, 100),
        Metric("medication_mass", "mg", "glucose", None, 0, 10_000),
        Metric("medication_volume", "mL", "glucose", None, 0, 1000),
        Metric("hba1c", "%", "glucose", "4548-4", 2, 25),
    )
}
