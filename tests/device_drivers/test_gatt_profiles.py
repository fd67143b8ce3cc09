"""Known vectors for every profile except heart rate (see test_gatt_heart_rate.py).

Unless a comment names another source, each payload is derived by hand from the field
layout of the Bluetooth SIG service specification named in the test's docstring (the same
layout is quoted in each module's docstring): little-endian integers, IEEE 11073 SFLOAT /
FLOAT, 7-byte Date Time. The bytes are annotated field by field.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from device_drivers.gatt import (
    battery,
    blood_pressure,
    body_composition,
    current_time,
    date_time,
    device_information,
    glucose,
    pulse_oximeter,
    temperature,
    weight_scale,
)
from device_drivers.gatt.base import Measurement
from device_drivers.gatt.date_time import DateTime
from device_drivers.gatt.errors import EncodeError, GattError, MalformedPayload
from device_drivers.gatt.ieee11073 import SpecialValue


def hx(text: str) -> bytes:
    return bytes.fromhex(text)


def malformed(decode: object, payload: str) -> MalformedPayload:
    assert callable(decode)
    with pytest.raises(MalformedPayload) as caught:
        decode(hx(payload))
    return caught.value


# Date Time (GATT Specification Supplement, "Date Time"): year u16, month..seconds u8.


def test_date_time_decode() -> None:
    # 07E8 = 2024, 01, 0F = 15, 08:1E:2D = 08:30:45
    value = date_time.decode(hx("E8 07 01 0F 08 1E 2D"))
    assert value == DateTime(2024, 1, 15, 8, 30, 45)
    assert value.to_datetime() == datetime(2024, 1, 15, 8, 30, 45, tzinfo=UTC)
    assert date_time.encode(value) == hx("E8 07 01 0F 08 1E 2D")
    assert date_time.measurements(value) == []


@pytest.mark.parametrize(
    "fields",
    [
        (0, 1, 15, 8, 30, 45),  # year unknown
        (2024, 0, 15, 8, 30, 45),  # month unknown
        (2024, 1, 0, 8, 30, 45),  # day unknown
        (0, 0, 0, 0, 0, 0),  # all unknown
        (2024, 13, 1, 0, 0, 0),  # no month 13
        (2023, 2, 29, 0, 0, 0),  # not a leap year
        (2024, 1, 1, 24, 0, 0),  # hour 24
        (2024, 1, 1, 0, 60, 0),
        (2024, 1, 1, 0, 0, 60),
        (1581, 1, 1, 0, 0, 0),  # before the spec's 1582
        (10000, 1, 1, 0, 0, 0),
        (0xFFFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF),
    ],
)
def test_date_time_unknown_or_impossible_gives_no_time(fields: tuple[int, ...]) -> None:
    assert DateTime(*fields).to_datetime() is None


def test_date_time_short() -> None:
    error = malformed(date_time.decode, "E8 07 01")
    assert (error.characteristic, error.offset) == ("0x2A08", 0)


def test_date_time_from_datetime_converts_to_utc() -> None:
    moment = datetime(2024, 1, 15, 10, 30, 45, 999_999, tzinfo=timezone(timedelta(hours=2)))
    assert DateTime.from_datetime(moment) == DateTime(2024, 1, 15, 8, 30, 45)
    with pytest.raises(EncodeError):
        DateTime.from_datetime(datetime(2024, 1, 15))
    with pytest.raises(EncodeError):
        date_time.encode(DateTime(70000, 1, 1, 0, 0, 0))


# Health Thermometer Service 1.0: Temperature Measurement 0x2A1C / Intermediate 0x2A1E.


def test_temperature_celsius() -> None:
    # flags 00; FLOAT 0xFF00016F = 367e-1 = 36.7
    m = temperature.decode(hx("00 6F 01 00 FF"))
    assert m == temperature.TemperatureMeasurement(36.7, temperature.TemperatureUnit.CELSIUS)
    assert temperature.measurements(m) == [Measurement("body_temperature", 36.7, "Cel")]


def test_temperature_fahrenheit_timestamp_type() -> None:
    # flags 07 (F, time stamp, type); FLOAT 0xFF0003DA = 986e-1 = 98.6 F;
    # 2024-01-15 08:30:45; type 06 = mouth
    payload = hx("07 DA 03 00 FF E8 07 01 0F 08 1E 2D 06")
    m = temperature.decode(payload)
    assert m == temperature.TemperatureMeasurement(
        98.6,
        temperature.TemperatureUnit.FAHRENHEIT,
        DateTime(2024, 1, 15, 8, 30, 45),
        temperature.TemperatureType.MOUTH,
    )
    assert temperature.encode(m) == payload
    assert temperature.measurements(m) == [
        Measurement(
            "body_temperature",
            37.0,
            "Cel",
            datetime(2024, 1, 15, 8, 30, 45, tzinfo=UTC),
            ("site_mouth",),
        )
    ]


def test_temperature_reserved_type_and_unknown_time() -> None:
    # flags 06; 36.7; year/month/day 0 (unknown); type 0x20 (reserved)
    m = temperature.decode(hx("06 6F 01 00 FF 00 00 00 00 0C 00 00 20"))
    assert m.temperature_type == 0x20
    (reading,) = temperature.measurements(m)
    assert reading.time is None
    assert reading.flags == ("site_reserved_32",)


@pytest.mark.parametrize("nan", ["FF FF 7F 00", "00 00 80 00", "FE FF 7F 00", "02 00 80 00"])
def test_temperature_special_value_is_no_reading(nan: str) -> None:
    m = temperature.decode(hx("00 " + nan))
    assert isinstance(m.temperature, SpecialValue)
    assert temperature.measurements(m) == []


def test_intermediate_temperature() -> None:
    m = temperature.decode_intermediate(hx("04 6F 01 00 FF 03"))
    assert m == temperature.IntermediateTemperature(
        36.7, temperature.TemperatureUnit.CELSIUS, None, temperature.TemperatureType.EAR
    )
    assert temperature.intermediate_measurements(m) == [
        Measurement("body_temperature", 36.7, "Cel", None, ("intermediate", "site_ear"))
    ]
    error = malformed(temperature.decode_intermediate, "02 6F 01 00 FF E8 07")
    assert (error.characteristic, error.offset) == ("0x2A1E", 5)
    assert str(error) == "0x2A1E payload too short at offset 5: need 5 more bytes"


# Blood Pressure Service 1.0: Blood Pressure Measurement 0x2A35 / Intermediate Cuff 0x2A36.

_BP_FULL = (
    "1E"  # flags: time stamp, pulse rate, user id, measurement status (mmHg)
    " 78 00 50 00 5E 00"  # 120 / 80 / 94 mmHg (SFLOAT, exponent 0)
    " E8 07 03 0F 0A 1E 00"  # 2024-03-15 10:30:00
    " 48 00"  # pulse 72
    " 01"  # user 1
    " 02 00"  # status: cuff fit too loose
)


def test_blood_pressure_full() -> None:
    m = blood_pressure.decode(hx(_BP_FULL))
    assert m == blood_pressure.BloodPressureMeasurement(
        120.0,
        80.0,
        94.0,
        blood_pressure.PressureUnit.MMHG,
        DateTime(2024, 3, 15, 10, 30, 0),
        72.0,
        1,
        0x0002,
    )
    assert blood_pressure.encode(m) == hx(_BP_FULL)
    when = datetime(2024, 3, 15, 10, 30, tzinfo=UTC)
    assert blood_pressure.measurements(m) == [
        Measurement("systolic_bp", 120.0, "mm[Hg]", when, ("cuff_loose",), user=1),
        Measurement("diastolic_bp", 80.0, "mm[Hg]", when, ("cuff_loose",), user=1),
        Measurement("mean_bp", 94.0, "mm[Hg]", when, ("cuff_loose",), user=1),
        Measurement("pulse_rate", 72.0, "/min", when, ("cuff_loose",), user=1),
    ]


def test_blood_pressure_kpa_converted() -> None:
    # flags 01 (kPa); 0xF0A0 = 160e-1 = 16.0; 0xF06B = 10.7; 0xF07D = 12.5
    m = blood_pressure.decode(hx("01 A0 F0 6B F0 7D F0"))
    assert (m.systolic, m.diastolic, m.mean_arterial_pressure) == (16.0, 10.7, 12.5)
    values = {r.metric: r.value for r in blood_pressure.measurements(m)}
    # 1 mmHg = 133.322387415 Pa
    assert values == {
        "systolic_bp": pytest.approx(120.009, abs=1e-3),
        "diastolic_bp": pytest.approx(80.256, abs=1e-3),
        "mean_bp": pytest.approx(93.757, abs=1e-3),
    }


def test_blood_pressure_special_value_dropped() -> None:
    # systolic NRes (0x0800), diastolic 80, MAP NaN (0x07FF)
    m = blood_pressure.decode(hx("00 00 08 50 00 FF 07"))
    assert m.systolic is SpecialValue.NRES
    assert m.mean_arterial_pressure is SpecialValue.NAN
    assert [r.metric for r in blood_pressure.measurements(m)] == ["diastolic_bp"]


@pytest.mark.parametrize(
    ("status", "flags"),
    [
        (0x0000, ()),
        (0x0001, ("body_movement",)),
        (0x0004, ("irregular_pulse",)),
        (0x0008, ("pulse_rate_above_range",)),
        (0x0010, ("pulse_rate_below_range",)),
        (0x0018, ("pulse_rate_range_reserved",)),
        (0x0020, ("improper_position",)),
        (0xFFC0, ()),  # reserved bits 6-15 ignored
        (
            0x003F,
            (
                "body_movement",
                "cuff_loose",
                "improper_position",
                "irregular_pulse",
                "pulse_rate_range_reserved",
            ),
        ),
    ],
)
def test_blood_pressure_status_flags(status: int, flags: tuple[str, ...]) -> None:
    assert blood_pressure.status_flags(status) == flags


def test_blood_pressure_short() -> None:
    error = malformed(blood_pressure.decode, "1E 78 00 50 00 5E 00 E8 07")
    assert (error.characteristic, error.offset) == ("0x2A35", 7)
    assert error.detail == "need 5 more bytes"


def test_intermediate_cuff_pressure() -> None:
    # flags 04 (pulse); cuff 140 mmHg; diastolic and MAP NaN (unused); pulse 72
    payload = hx("04 8C 00 FF 07 FF 07 48 00")
    m = blood_pressure.decode_intermediate(payload)
    assert m == blood_pressure.IntermediateCuffPressure(
        140.0, blood_pressure.PressureUnit.MMHG, None, 72.0, None, None
    )
    assert blood_pressure.encode_intermediate(m) == payload
    assert blood_pressure.intermediate_measurements(m) == [
        Measurement("pulse_rate", 72.0, "/min", None, ("intermediate",))
    ]
    assert (
        blood_pressure.intermediate_measurements(
            blood_pressure.decode_intermediate(hx("00 8C 00 FF 07 FF 07"))
        )
        == []
    )
    assert malformed(blood_pressure.decode_intermediate, "00 8C").characteristic == "0x2A36"


# Pulse Oximeter Service 1.0: PLX Spot-check 0x2A5E / PLX Continuous 0x2A5F.


def test_plx_spot_check_minimal() -> None:
    m = pulse_oximeter.decode_spot_check(hx("00 62 00 48 00"))  # SpO2 98 %, PR 72
    assert m == pulse_oximeter.SpotCheckMeasurement(98.0, 72.0)
    assert pulse_oximeter.spot_check_measurements(m) == [
        Measurement("spo2", 98.0, "%"),
        Measurement("pulse_rate", 72.0, "/min"),
    ]


def test_plx_spot_check_all_fields() -> None:
    payload = hx(
        "0F"  # flags: timestamp, measurement status, device status, PAI
        " 61 00 4B 00"  # SpO2 97, PR 75
        " E8 07 06 01 0C 00 00"  # 2024-06-01 12:00:00
        " 20 00"  # measurement status bit 5: measurement ongoing
        " 20 00 00"  # device and sensor status bit 5: low perfusion
        " 0A F0"  # PAI 10e-1 = 1.0
    )
    m = pulse_oximeter.decode_spot_check(payload)
    assert m == pulse_oximeter.SpotCheckMeasurement(
        97.0, 75.0, DateTime(2024, 6, 1, 12, 0, 0), 0x0020, 0x000020, 1.0, False
    )
    # The encoder writes PAI 1.0 as 1e0 (exponent nearest zero), not 10e-1.
    assert pulse_oximeter.encode_spot_check(m) == payload[:-2] + hx("01 00")
    when = datetime(2024, 6, 1, 12, tzinfo=UTC)
    flags = ("measurement_ongoing", "low_perfusion")
    assert pulse_oximeter.spot_check_measurements(m) == [
        Measurement("spo2", 97.0, "%", when, flags),
        Measurement("pulse_rate", 75.0, "/min", when, flags),
    ]


def test_plx_spot_check_clock_not_set() -> None:
    m = pulse_oximeter.decode_spot_check(hx("11 62 00 48 00 E8 07 06 01 0C 00 00"))
    assert m.device_clock_not_set
    readings = pulse_oximeter.spot_check_measurements(m)
    assert [r.time for r in readings] == [None, None]
    assert all(r.flags == ("device_clock_not_set",) for r in readings)


def test_plx_continuous() -> None:
    payload = hx(
        "1F"  # flags: fast, slow, measurement status, device status, PAI
        " 62 00 48 00"  # normal: 98 %, 72
        " 61 00 49 00"  # fast: 97 %, 73
        " 63 00 47 00"  # slow: 99 %, 71
        " 00 01"  # bit 8: fully qualified
        " 00 80 00"  # bit 15: sensor disconnected
        " 0A F0"  # PAI 1.0
    )
    m = pulse_oximeter.decode_continuous(payload)
    pair = pulse_oximeter.SpO2PulseRate
    assert m == pulse_oximeter.ContinuousMeasurement(
        pair(98.0, 72.0), pair(97.0, 73.0), pair(99.0, 71.0), 0x0100, 0x008000, 1.0
    )
    assert pulse_oximeter.encode_continuous(m) == payload[:-2] + hx("01 00")
    flags = ("fully_qualified", "sensor_disconnected")
    assert pulse_oximeter.continuous_measurements(m) == [
        Measurement("spo2", 98.0, "%", None, flags),
        Measurement("pulse_rate", 72.0, "/min", None, flags),
    ]


def test_plx_special_values_dropped() -> None:
    m = pulse_oximeter.decode_continuous(hx("00 FF 07 48 00"))  # SpO2 NaN
    assert [r.metric for r in pulse_oximeter.continuous_measurements(m)] == ["pulse_rate"]
    m2 = pulse_oximeter.decode_spot_check(hx("00 62 00 00 08"))  # PR NRes
    assert [r.metric for r in pulse_oximeter.spot_check_measurements(m2)] == ["spo2"]


def test_plx_short() -> None:
    error = malformed(pulse_oximeter.decode_continuous, "04 62 00 48 00 00")
    assert (error.characteristic, error.offset) == ("0x2A5F", 5)
    error = malformed(pulse_oximeter.decode_spot_check, "04 62 00 48 00 00 00")
    assert (error.characteristic, error.offset, error.detail) == ("0x2A5E", 5, "need 1 more byte")


# Glucose Service 1.0: Glucose Measurement 0x2A18 / Glucose Measurement Context 0x2A34.

_GLUCOSE_KG = (
    "03"  # flags: time offset, concentration/type/location (kg/L)
    " 01 00"  # sequence 1
    " E8 07 01 02 07 1E 00"  # base time 2024-01-02 07:30:00
    " 05 00"  # offset +5 min
    " 64 B0"  # SFLOAT 0xB064 = 100e-5 kg/L
    " 11"  # type 1 capillary whole blood, location 1 finger
)


def test_glucose_kg_per_l() -> None:
    m = glucose.decode(hx(_GLUCOSE_KG))
    assert m == glucose.GlucoseMeasurement(
        1,
        DateTime(2024, 1, 2, 7, 30, 0),
        5,
        glucose.GlucoseSample(
            0.001,
            glucose.GlucoseUnit.KG_PER_L,
            glucose.SampleType.CAPILLARY_WHOLE_BLOOD,
            glucose.SampleLocation.FINGER,
        ),
        None,
        False,
    )
    # The encoder writes 0.001 as 1e-3 (0xD001), the same value as the device's 100e-5.
    assert glucose.encode(m) == hx(_GLUCOSE_KG)[:-3] + hx("01 D0 11")
    assert glucose.decode(glucose.encode(m)) == m
    # 1e-3 kg/L = 100 mg/dL, at base time + 5 min
    assert glucose.measurements(m) == [
        Measurement(
            "glucose",
            100.0,
            "mg/dL",
            datetime(2024, 1, 2, 7, 35, tzinfo=UTC),
            ("sample_capillary_whole_blood", "location_finger"),
        )
    ]


def test_glucose_mol_per_l_and_annunciation() -> None:
    # flags 0E: sample, mol/L, sensor status; seq 2; 0xC037 = 55e-4 mol/L (5.5 mmol/L);
    # type 2 capillary plasma / location 2 AST; status bit 0 battery low
    m = glucose.decode(hx("0E 02 00 E8 07 01 02 07 1E 00 37 C0 22 01 00"))
    assert m.sample is not None
    assert m.sample.unit is glucose.GlucoseUnit.MOL_PER_L
    (reading,) = glucose.measurements(m)
    # 5.5 mmol/L x 180.156 g/mol = 990.858 mg/L = 99.0858 mg/dL
    assert reading.value == pytest.approx(99.0858, abs=1e-9)
    assert reading.time == datetime(2024, 1, 2, 7, 30, tzinfo=UTC)
    assert reading.flags == (
        "sample_capillary_plasma",
        "location_alternate_site_test",
        "device_battery_low",
    )


def test_glucose_without_sample_and_unknown_time() -> None:
    m = glucose.decode(hx("10 03 00 E8 07 01 02 07 1E 00"))  # context follows, no sample
    assert m.context_follows
    assert glucose.measurements(m) == []
    # base time year 0 (unknown): the reading has no time
    m2 = glucose.decode(hx("02 04 00 00 00 00 00 00 00 00 64 B0 11"))
    (reading,) = glucose.measurements(m2)
    assert reading.time is None
    assert reading.value == 100.0


def test_glucose_control_solution_and_special() -> None:
    # type 10 control solution, location 4 control solution
    m = glucose.decode(hx("02 05 00 E8 07 01 02 07 1E 00 64 B0 4A"))
    # A control-solution test checks the meter: decoded, but never the participant's glucose.
    assert m.sample is not None
    assert m.sample.concentration is not None
    assert glucose.measurements(m) == []
    # concentration NaN: no reading
    m2 = glucose.decode(hx("02 06 00 E8 07 01 02 07 1E 00 FF 07 11"))
    assert glucose.measurements(m2) == []


def test_glucose_short() -> None:
    error = malformed(glucose.decode, "03 01 00 E8 07 01 02 07 1E 00 05 00 64 B0")
    assert (error.characteristic, error.offset) == ("0x2A18", 14)


_CONTEXT_FULL = (
    "FF"  # every field, medication in liters, extended flags present
    " 01 00"  # sequence 1
    " 00"  # extended flags
    " 01 32 D0"  # breakfast, 0xD032 = 50e-3 kg carbohydrate
    " 01"  # preprandial
    " 51"  # tester 1 self, health 5 no health issues
    " 08 07 32"  # exercise 1800 s at 50 %
    " 01 0A A0"  # rapid acting insulin, 0xA00A = 10e-6 L
    " 41 F0"  # HbA1c 65e-1 = 6.5 %
)


def test_glucose_context() -> None:
    c = glucose.decode_context(hx(_CONTEXT_FULL))
    assert c == glucose.GlucoseContext(
        sequence_number=1,
        extended_flags=0,
        carbohydrate=glucose.Carbohydrate(glucose.CarbohydrateId.BREAKFAST, 0.05),
        meal=glucose.Meal.PREPRANDIAL,
        tester=glucose.Tester.SELF,
        health=glucose.Health.NO_HEALTH_ISSUES,
        exercise=glucose.Exercise(1800, 50),
        medication=glucose.Medication(
            glucose.MedicationId.RAPID_ACTING_INSULIN, 1e-5, glucose.MedicationUnit.LITERS
        ),
        hba1c_percent=6.5,
    )
    # Same values, exponents nearest zero: 5e-2 (0xE005), 1e-5 (0xB001).
    canonical = hx("FF 01 00 00 01 05 E0 01 51 08 07 32 01 01 B0 41 F0")
    assert glucose.encode_context(c) == canonical
    assert glucose.decode_context(canonical) == c
    assert [(m.metric, m.value, m.unit) for m in glucose.context_measurements(c)] == [
        ("carbohydrate_intake", 50.0, "g"),
        ("exercise_duration", 1800.0, "s"),
        ("exercise_intensity", 50.0, "%"),
        ("medication_volume", 0.01, "mL"),
        ("hba1c", 6.5, "%"),
    ]
    assert glucose.context_flags(c) == (
        "carbs_breakfast",
        "exercise",
        "health_no_health_issues",
        "insulin_rapid_acting",
        "meal_preprandial",
        "tester_self",
    )
    assert glucose.decode_context(hx("00 07 00")) == glucose.GlucoseContext(7)
    error = malformed(glucose.decode_context, "02 07 00")
    assert (error.characteristic, error.offset) == ("0x2A34", 3)
    with pytest.raises(EncodeError):
        glucose.encode_context(glucose.GlucoseContext(1, tester=1))


# Weight Scale Service 1.0: Weight Measurement 0x2A9D.


def test_weight_si() -> None:
    m = weight_scale.decode(hx("00 30 36"))  # 0x3630 = 13872 x 0.005 kg = 69.36 kg
    assert m == weight_scale.WeightMeasurement(69.36)
    assert weight_scale.measurements(m) == [Measurement("body_weight", 69.36, "kg")]


def test_weight_si_bmi_height() -> None:
    # flags 08; 70 kg (14000); BMI 22.9 (229); height 1.750 m (1750)
    m = weight_scale.decode(hx("08 B0 36 E5 00 D6 06"))
    assert m == weight_scale.WeightMeasurement(70.0, bmi=22.9, height=1.75)
    assert weight_scale.encode(m) == hx("08 B0 36 E5 00 D6 06")


def test_weight_imperial_everything() -> None:
    payload = hx(
        "0F"  # imperial, time stamp, user id, BMI and height
        " 28 3C"  # 15400 x 0.01 lb = 154 lb
        " E8 07 02 1D 06 00 00"  # 2024-02-29 06:00:00
        " 01"  # user 1
        " E4 00"  # BMI 22.8
        " B2 02"  # 690 x 0.1 in = 69 in
    )
    m = weight_scale.decode(payload)
    assert m == weight_scale.WeightMeasurement(
        154.0, weight_scale.UnitSystem.IMPERIAL, DateTime(2024, 2, 29, 6, 0, 0), 1, 22.8, 69.0
    )
    assert weight_scale.encode(m) == payload
    # 154 lb x 0.45359237 kg/lb = 69.85322498 kg
    assert weight_scale.measurements(m) == [
        Measurement("body_weight", 69.853225, "kg", datetime(2024, 2, 29, 6, tzinfo=UTC), user=1)
    ]


def test_weight_unsuccessful() -> None:
    m = weight_scale.decode(hx("00 FF FF"))
    assert m.weight is None
    assert weight_scale.measurements(m) == []
    assert weight_scale.encode(m) == hx("00 FF FF")
    assert malformed(weight_scale.decode, "08 B0 36 E5").offset == 3
    with pytest.raises(EncodeError):
        weight_scale.encode(weight_scale.WeightMeasurement(70.0, bmi=22.0))
    with pytest.raises(EncodeError):
        weight_scale.encode(weight_scale.WeightMeasurement(400.0))  # > 327.67 kg


# Body Composition Service 1.0: Body Composition Measurement 0x2A9C.


def test_body_composition_minimal() -> None:
    m = body_composition.decode(hx("00 00 C8 00"))  # body fat 200 x 0.1 % = 20 %
    assert m == body_composition.BodyCompositionMeasurement(20.0)
    assert body_composition.measurements(m) == [Measurement("body_fat", 20.0, "%")]


def test_body_composition_every_field() -> None:
    payload = hx(
        "FE 1F"  # every optional field, multiple packet, SI
        " FF 00"  # body fat 25.5 %
        " E8 07 05 14 07 00 00"  # 2024-05-20 07:00:00
        " 02"  # user 2
        " 58 1B"  # basal metabolism 7000 kJ
        " 90 01"  # muscle 40.0 %
        " 70 17"  # muscle mass 6000 x 0.005 = 30 kg
        " 04 29"  # fat free mass 52.5 kg
        " 48 26"  # soft lean mass 49 kg
        " B0 1D"  # body water mass 38 kg
        " C5 12"  # impedance 480.5 ohm
        " B0 36"  # weight 70 kg
        " 08 07"  # height 1.800 m
    )
    m = body_composition.decode(payload)
    assert m == body_composition.BodyCompositionMeasurement(
        body_fat_percent=25.5,
        unit=body_composition.UnitSystem.SI,
        timestamp=DateTime(2024, 5, 20, 7, 0, 0),
        user_id=2,
        basal_metabolism_kj=7000,
        muscle_percent=40.0,
        muscle_mass=30.0,
        fat_free_mass=52.5,
        soft_lean_mass=49.0,
        body_water_mass=38.0,
        impedance_ohm=480.5,
        weight=70.0,
        height=1.8,
        multiple_packet=True,
    )
    assert body_composition.encode(m) == payload
    when = datetime(2024, 5, 20, 7, tzinfo=UTC)
    assert body_composition.measurements(m) == [
        Measurement("body_fat", 25.5, "%", when, ("multiple_packet",), user=2),
        Measurement("body_weight", 70.0, "kg", when, ("multiple_packet",), user=2),
    ]


def test_body_composition_imperial_weight_and_unsuccessful() -> None:
    # flags 0x0401: imperial, weight; fat 18.0 %; weight 15400 x 0.01 lb = 154 lb
    m = body_composition.decode(hx("01 04 B4 00 28 3C"))
    assert m.weight == 154.0
    assert [r.value for r in body_composition.measurements(m)] == [18.0, 69.853225]
    failed = body_composition.decode(hx("00 00 FF FF"))
    assert failed.body_fat_percent is None
    assert body_composition.measurements(failed) == []
    error = malformed(body_composition.decode, "00 04 C8 00 B0")
    assert (error.characteristic, error.offset) == ("0x2A9C", 4)


# Battery Service 1.0: Battery Level 0x2A19.


def test_battery() -> None:
    assert battery.decode(hx("64")) == battery.BatteryLevel(100)
    assert battery.measurements(battery.decode(hx("2A"))) == [
        Measurement("battery_level", 42.0, "%")
    ]
    assert battery.encode(battery.BatteryLevel(0)) == hx("00")
    error = malformed(battery.decode, "65")  # 101: reserved
    assert (error.characteristic, error.offset) == ("0x2A19", 0)
    assert malformed(battery.decode, "").detail == "need 1 more byte"
    with pytest.raises(EncodeError):
        battery.encode(battery.BatteryLevel(101))


# Current Time Service 1.1: Current Time 0x2A2B.


def test_current_time() -> None:
    # 2024-03-10 14:30:00, day 7 (Sunday), 0x80/256 s, adjust reason 1 (manual)
    payload = hx("E8 07 03 0A 0E 1E 00 07 80 01")
    value = current_time.decode(payload)
    assert value == current_time.CurrentTime(
        DateTime(2024, 3, 10, 14, 30, 0), 7, 128, current_time.AdjustReason.MANUAL_TIME_UPDATE
    )
    assert value.to_datetime() == datetime(2024, 3, 10, 14, 30, 0, 500_000, tzinfo=UTC)
    assert current_time.encode(value) == payload
    assert current_time.measurements(value) == []


def test_current_time_written_by_the_hub() -> None:
    cest = timezone(timedelta(hours=2))
    value = current_time.CurrentTime.from_datetime(
        datetime(2024, 3, 10, 16, 30, 0, 500_000, tzinfo=cest),
        adjust_reason=current_time.AdjustReason.MANUAL_TIME_UPDATE,
    )
    assert current_time.encode(value) == hx("E8 07 03 0A 0E 1E 00 07 80 01")
    unknown = current_time.decode(hx("00 00 00 00 00 00 00 00 00 00"))
    assert unknown.to_datetime() is None
    assert malformed(current_time.decode, "E8 07 03 0A 0E 1E 00 07 80").offset == 7


# Device Information Service 1.1: UTF-8 strings 0x2A24..0x2A29.


def test_device_information() -> None:
    assert device_information.decode(hx("41 63 6D 65 00 00")) == "Acme"  # "Acme" + NULs
    assert device_information.decode(b"") == ""
    assert device_information.decode("Ünïcode 1.0".encode()) == "Ünïcode 1.0"
    assert device_information.encode("HR-100") == b"HR-100"
    assert device_information.measurements("Acme") == []
    error = malformed(device_information.decode, "41 62 C3")
    assert (error.characteristic, error.offset) == ("0x2A29", 2)
    with pytest.raises(MalformedPayload) as caught:
        device_information.decode(hx("FF"), device_information.SERIAL_NUMBER)
    assert caught.value.characteristic == "0x2A25"
    with pytest.raises(EncodeError):
        device_information.encode("x\x00")


def test_errors_share_the_package_base() -> None:
    assert issubclass(MalformedPayload, GattError)
    assert issubclass(EncodeError, GattError)
