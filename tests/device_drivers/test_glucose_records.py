"""A glucose record's key and its context, from the specification's layouts: the context's
statements flag the glucose reading and its values become readings of their own, all under
the record's key, so the gateway stores each once."""

from __future__ import annotations

from device_drivers.gatt import glucose
from device_drivers.gatt.date_time import DateTime
from device_drivers.glucose_records import record_key, with_context
from ingest.envelope import check_reading
from ingest.flags import FlagClass, class_of, is_registered
from ingest.metrics import METRICS
from ingest.model import Reading

WHEN = DateTime(2026, 3, 1, 7, 45, 0)


def measured(sequence: int = 42) -> Reading:
    m = glucose.GlucoseMeasurement(sequence, WHEN, 0, glucose.GlucoseSample(0.00112), None, True)
    return Reading(
        1_772_351_100_000,
        "glucose",
        112.0,
        "mg/dL",
        "meter",
        ("location_finger",),
        None,
        record_key(m),
    )


def test_a_record_key_is_its_number_and_time() -> None:
    m = glucose.GlucoseMeasurement(42, WHEN, 0, glucose.GlucoseSample(0.00112))
    assert record_key(m) == "g:42:1772351100000"
    unknown = glucose.GlucoseMeasurement(42, DateTime(0, 0, 0, 0, 0, 0))
    assert record_key(unknown) == "g:42:-"


def test_a_full_context_flags_the_reading_and_adds_its_values() -> None:
    context = glucose.decode_context(
        glucose.encode_context(
            glucose.GlucoseContext(
                42,
                carbohydrate=glucose.Carbohydrate(glucose.CarbohydrateId.BREAKFAST, 0.045),
                meal=glucose.Meal.POSTPRANDIAL,
                tester=glucose.Tester.SELF,
                health=glucose.Health.UNDER_STRESS,
                exercise=glucose.Exercise(1800, 60),
                medication=glucose.Medication(glucose.MedicationId.RAPID_ACTING_INSULIN, 0.0000035),
                hba1c_percent=6.8,
            )
        )
    )
    reading = measured()
    linked = with_context([reading], context)
    assert linked[0] == reading._replace(
        flags=(
            "carbs_breakfast",
            "exercise",
            "health_under_stress",
            "insulin_rapid_acting",
            "location_finger",
            "meal_postprandial",
            "tester_self",
        )
    )
    assert [(r.metric, r.value, r.unit) for r in linked[1:]] == [
        ("carbohydrate_intake", 45.0, "g"),
        ("exercise_duration", 1800.0, "s"),
        ("exercise_intensity", 60.0, "%"),
        ("medication_mass", 3.5, "mg"),
        ("hba1c", 6.8, "%"),
    ]
    for r in linked:
        check_reading(r)
        assert (r.t_ms, r.sensor, r.record) == (reading.t_ms, "meter", "g:42:1772351100000")
        assert METRICS[r.metric].unit == r.unit
        assert all(is_registered(f) and class_of(f) is FlagClass.INFO for f in r.flags)


def test_insulin_by_volume_and_an_exercise_overrun() -> None:
    context = glucose.GlucoseContext(
        42,
        exercise=glucose.Exercise(0xFFFF, 80),
        medication=glucose.Medication(
            glucose.MedicationId.LONG_ACTING_INSULIN, 0.0002, glucose.MedicationUnit.LITERS
        ),
        tester=glucose.Tester.NOT_AVAILABLE,
        health=glucose.Health.NOT_AVAILABLE,
    )
    linked = with_context([measured()], context)
    assert linked[0].flags == ("exercise", "insulin_long_acting", "location_finger")
    # 65535 s means "longer than the field holds": no duration, only the intensity.
    assert [(r.metric, r.value) for r in linked[1:]] == [
        ("exercise_intensity", 80.0),
        ("medication_volume", 0.2),
    ]


def test_reserved_context_values_are_still_valid_flags() -> None:
    context = glucose.GlucoseContext(42, meal=9, medication=glucose.Medication(9, 0.000001))
    (reading, dose) = with_context([measured()], context)
    assert {"meal_reserved_9", "medication_reserved_9"} <= set(reading.flags)
    check_reading(reading)
    assert dose.metric == "medication_mass"
