"""From the specifications' status layouts to the readings a hub seals: every status bit and
context value of every profile becomes a flag that the wire carries, that the registry
classes, and that reaches the Reading with the device's user where the profile has one."""

from __future__ import annotations

import pytest

from device_drivers.gatt import (
    blood_pressure,
    glucose,
    heart_rate,
    pulse_oximeter,
    registry,
    temperature,
    weight_scale,
)
from device_drivers.gatt.date_time import DateTime
from device_drivers.stamping import to_readings
from ingest.envelope import check_reading
from ingest.flags import FlagClass, class_of, is_registered
from ingest.model import Reading

WHEN = DateTime(2026, 3, 1, 8, 30, 0)
RECEIVED_MS = 1_772_353_800_000


def readings_of(char_id: int, data: bytes) -> list[Reading]:
    readings = to_readings(registry.decode_to_measurements(char_id, data), RECEIVED_MS, "w")
    for r in readings:
        check_reading(r)  # the wire carries it as it is
        assert r.flags == tuple(sorted(set(r.flags)))
        assert all(is_registered(f) for f in r.flags), r.flags
    return readings


def only_flags(readings: list[Reading]) -> set[tuple[str, ...]]:
    return {r.flags for r in readings}


def test_heart_rate_without_skin_contact_is_invalid() -> None:
    data = heart_rate.encode(heart_rate.HeartRateMeasurement(72, sensor_contact=False))
    (r,) = readings_of(0x2A37, data)
    assert r.flags == ("no_sensor_contact",)
    assert class_of("no_sensor_contact") is FlagClass.INVALID
    touching = heart_rate.encode(heart_rate.HeartRateMeasurement(72, sensor_contact=True))
    assert readings_of(0x2A37, touching)[0].flags == ()


@pytest.mark.parametrize(
    ("bit", "flag", "kind"),
    [
        (blood_pressure.MeasurementStatus.BODY_MOVEMENT, "body_movement", FlagClass.QUESTIONABLE),
        (blood_pressure.MeasurementStatus.CUFF_LOOSE, "cuff_loose", FlagClass.QUESTIONABLE),
        (blood_pressure.MeasurementStatus.IRREGULAR_PULSE, "irregular_pulse", FlagClass.INFO),
        (
            blood_pressure.MeasurementStatus.IMPROPER_POSITION,
            "improper_position",
            FlagClass.QUESTIONABLE,
        ),
        (0b01 << 3, "pulse_rate_above_range", FlagClass.INFO),
        (0b10 << 3, "pulse_rate_below_range", FlagClass.INFO),
    ],
)
def test_every_blood_pressure_status_bit(bit: int, flag: str, kind: FlagClass) -> None:
    m = blood_pressure.BloodPressureMeasurement(
        120.0, 80.0, 94.0, blood_pressure.PressureUnit.MMHG, WHEN, 72.0, 3, int(bit)
    )
    readings = readings_of(0x2A35, blood_pressure.encode(m))
    assert [r.metric for r in readings] == ["systolic_bp", "diastolic_bp", "mean_bp", "pulse_rate"]
    assert only_flags(readings) == {(flag,)}
    assert {r.user for r in readings} == {3}
    assert class_of(flag) is kind


PLX_MEASUREMENT = [(bit, str(bit.name).lower()) for bit in pulse_oximeter.PlxMeasurementStatus]
PLX_DEVICE = [(bit, str(bit.name).lower()) for bit in pulse_oximeter.DeviceSensorStatus]


@pytest.mark.parametrize(("bit", "flag"), PLX_MEASUREMENT, ids=[f for _, f in PLX_MEASUREMENT])
def test_every_plx_measurement_status_bit(bit: int, flag: str) -> None:
    m = pulse_oximeter.SpotCheckMeasurement(97.0, 64.0, WHEN, measurement_status=int(bit))
    readings = readings_of(0x2A5E, pulse_oximeter.encode_spot_check(m))
    assert only_flags(readings) == {(flag,)}


@pytest.mark.parametrize(("bit", "flag"), PLX_DEVICE, ids=[f for _, f in PLX_DEVICE])
def test_every_plx_device_and_sensor_status_bit(bit: int, flag: str) -> None:
    m = pulse_oximeter.ContinuousMeasurement(
        pulse_oximeter.SpO2PulseRate(97.0, 64.0), device_sensor_status=int(bit)
    )
    readings = readings_of(0x2A5F, pulse_oximeter.encode_continuous(m))
    assert only_flags(readings) == {(flag,)}


def test_the_plx_statements_that_put_a_reading_in_doubt() -> None:
    doubted = {f for _, f in PLX_MEASUREMENT + PLX_DEVICE if class_of(f) is not FlagClass.INFO}
    assert {"invalid_measurement", "questionable_measurement", "sensor_displaced"} <= doubted
    assert "fully_qualified" not in doubted
    assert "validated" not in doubted


GLUCOSE_STATUS = [(bit, str(bit.name).lower()) for bit in glucose.SensorStatus]


@pytest.mark.parametrize(("bit", "flag"), GLUCOSE_STATUS, ids=[f for _, f in GLUCOSE_STATUS])
def test_every_glucose_sensor_status_bit(bit: int, flag: str) -> None:
    m = glucose.GlucoseMeasurement(1, WHEN, None, glucose.GlucoseSample(0.00095), int(bit))
    (r,) = readings_of(0x2A18, glucose.encode(m))
    assert flag in r.flags
    assert {"sample_capillary_whole_blood", "location_finger"} <= set(r.flags)


@pytest.mark.parametrize("kind", [k for k in glucose.SampleType if k != 10])
@pytest.mark.parametrize("where", [w for w in glucose.SampleLocation if w != 4])
def test_every_glucose_sample_type_and_location(kind: int, where: int) -> None:
    sample = glucose.GlucoseSample(0.00095, glucose.GlucoseUnit.KG_PER_L, int(kind), int(where))
    (r,) = readings_of(0x2A18, glucose.encode(glucose.GlucoseMeasurement(1, WHEN, None, sample)))
    assert all(class_of(f) is FlagClass.INFO for f in r.flags)


@pytest.mark.parametrize("site", list(temperature.TemperatureType))
def test_every_temperature_type_is_a_site(site: int) -> None:
    m = temperature.TemperatureMeasurement(
        37.0, temperature.TemperatureUnit.CELSIUS, WHEN, int(site)
    )
    (r,) = readings_of(0x2A1C, temperature.encode(m))
    assert r.flags == (f"site_{temperature.TemperatureType(site).name.lower()}",)


def test_a_shared_scale_says_whose_weight_it_is() -> None:
    m = weight_scale.WeightMeasurement(70.0, weight_scale.UnitSystem.SI, WHEN, 4)
    (r,) = readings_of(0x2A9D, weight_scale.encode(m))
    assert (r.metric, r.user) == ("body_weight", 4)


def test_a_reserved_value_is_still_a_valid_flag() -> None:
    m = temperature.TemperatureMeasurement(37.0, temperature.TemperatureUnit.CELSIUS, None, 200)
    (r,) = readings_of(0x2A1C, temperature.encode(m))
    assert r.flags == ("site_reserved_200",)
