"""Property tests for every profile (hypothesis).

- encode/decode round trip over every flag combination: each optional field is drawn
  present or absent independently, and numbers are drawn from the wire's own values (any
  raw SFLOAT/FLOAT, special values included), so decode(encode(m)) == m exactly;
- any bytes -> a decoded value or MalformedPayload, nothing else, and decoding what the
  encoder wrote gives the same value again;
- special values never become Measurements.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_drivers.gatt import (
    battery,
    blood_pressure,
    body_composition,
    current_time,
    date_time,
    device_information,
    glucose,
    heart_rate,
    pulse_oximeter,
    registry,
    temperature,
    weight_scale,
)
from device_drivers.gatt._mass import UnitSystem
from device_drivers.gatt.base import CANONICAL_UNITS, Measurement
from device_drivers.gatt.date_time import DateTime
from device_drivers.gatt.errors import MalformedPayload
from device_drivers.gatt.ieee11073 import SpecialValue, decode_float, decode_sfloat

T = TypeVar("T")

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
s16 = st.integers(-0x8000, 0x7FFF)
u24 = st.integers(0, 0xFFFFFF)
nibble = st.integers(0, 0xF)
sfloats = st.integers(0, 0xFFFF).map(decode_sfloat)
floats32 = st.integers(0, 0xFFFFFFFF).map(decode_float)
date_times = st.builds(DateTime, u16, u8, u8, u8, u8, u8)


def opt(strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T | None]:
    return st.none() | strategy


def steps(steps_per_unit: int, high: int = 0xFFFF) -> st.SearchStrategy[float]:
    return st.integers(0, high).map(lambda raw: raw / steps_per_unit)


heart_rates = st.builds(
    heart_rate.HeartRateMeasurement,
    u16,
    st.none() | st.booleans(),
    opt(u16),
    st.lists(u16.map(lambda raw: raw * 1000 / 1024), max_size=9).map(tuple),
)


def temperatures(kind: type[T]) -> st.SearchStrategy[T]:
    return st.builds(
        kind, floats32, st.sampled_from(temperature.TemperatureUnit), opt(date_times), opt(u8)
    )


pressure_units = st.sampled_from(blood_pressure.PressureUnit)
blood_pressures = st.builds(
    blood_pressure.BloodPressureMeasurement,
    sfloats,
    sfloats,
    sfloats,
    pressure_units,
    opt(date_times),
    opt(sfloats),
    opt(u8),
    opt(u16),
)
cuff_pressures = st.builds(
    blood_pressure.IntermediateCuffPressure,
    sfloats,
    pressure_units,
    opt(date_times),
    opt(sfloats),
    opt(u8),
    opt(u16),
)
spot_checks = st.builds(
    pulse_oximeter.SpotCheckMeasurement,
    sfloats,
    sfloats,
    opt(date_times),
    opt(u16),
    opt(u24),
    opt(sfloats),
    st.booleans(),
)
pairs = st.builds(pulse_oximeter.SpO2PulseRate, sfloats, sfloats)
continuous = st.builds(
    pulse_oximeter.ContinuousMeasurement,
    pairs,
    opt(pairs),
    opt(pairs),
    opt(u16),
    opt(u24),
    opt(sfloats),
)
glucose_measurements = st.builds(
    glucose.GlucoseMeasurement,
    u16,
    date_times,
    opt(s16),
    opt(
        st.builds(
            glucose.GlucoseSample,
            sfloats,
            st.sampled_from(glucose.GlucoseUnit),
            nibble,
            nibble,
        )
    ),
    opt(u16),
    st.booleans(),
)


@st.composite
def glucose_contexts(draw: st.DrawFn) -> glucose.GlucoseContext:
    tester_health = draw(st.none() | st.tuples(nibble, nibble))
    return glucose.GlucoseContext(
        sequence_number=draw(u16),
        extended_flags=draw(opt(u8)),
        carbohydrate=draw(opt(st.builds(glucose.Carbohydrate, u8, sfloats))),
        meal=draw(opt(u8)),
        tester=None if tester_health is None else tester_health[0],
        health=None if tester_health is None else tester_health[1],
        exercise=draw(opt(st.builds(glucose.Exercise, u16, u8))),
        medication=draw(
            opt(st.builds(glucose.Medication, u8, sfloats, st.sampled_from(glucose.MedicationUnit)))
        ),
        hba1c_percent=draw(opt(sfloats)),
    )


@st.composite
def weights(draw: st.DrawFn) -> weight_scale.WeightMeasurement:
    unit = draw(st.sampled_from(UnitSystem))
    mass = 200 if unit is UnitSystem.SI else 100
    height = 1000 if unit is UnitSystem.SI else 10
    bmi_height = draw(st.none() | st.tuples(steps(10), steps(height)))
    return weight_scale.WeightMeasurement(
        weight=draw(opt(steps(mass, 0xFFFE))),
        unit=unit,
        timestamp=draw(opt(date_times)),
        user_id=draw(opt(u8)),
        bmi=None if bmi_height is None else bmi_height[0],
        height=None if bmi_height is None else bmi_height[1],
    )


@st.composite
def body_compositions(draw: st.DrawFn) -> body_composition.BodyCompositionMeasurement:
    unit = draw(st.sampled_from(UnitSystem))
    mass = steps(200 if unit is UnitSystem.SI else 100)
    return body_composition.BodyCompositionMeasurement(
        body_fat_percent=draw(opt(steps(10, 0xFFFE))),
        unit=unit,
        timestamp=draw(opt(date_times)),
        user_id=draw(opt(u8)),
        basal_metabolism_kj=draw(opt(u16)),
        muscle_percent=draw(opt(steps(10))),
        muscle_mass=draw(opt(mass)),
        fat_free_mass=draw(opt(mass)),
        soft_lean_mass=draw(opt(mass)),
        body_water_mass=draw(opt(mass)),
        impedance_ohm=draw(opt(steps(10))),
        weight=draw(opt(mass)),
        height=draw(opt(steps(1000 if unit is UnitSystem.SI else 10))),
        multiple_packet=draw(st.booleans()),
    )


current_times = st.builds(current_time.CurrentTime, date_times, u8, u8, u8)
batteries = st.builds(battery.BatteryLevel, st.integers(0, 100))
strings = st.text(max_size=40).filter(lambda text: not text.endswith("\x00"))

# characteristic -> (strategy of decoded values, encode, decode)
PROFILES: dict[int, tuple[st.SearchStrategy[Any], Callable[[Any], bytes], Callable[[bytes], Any]]]
PROFILES = {
    0x2A37: (heart_rates, heart_rate.encode, heart_rate.decode),
    0x2A1C: (
        temperatures(temperature.TemperatureMeasurement),
        temperature.encode,
        temperature.decode,
    ),
    0x2A1E: (
        temperatures(temperature.IntermediateTemperature),
        temperature.encode_intermediate,
        temperature.decode_intermediate,
    ),
    0x2A35: (blood_pressures, blood_pressure.encode, blood_pressure.decode),
    0x2A36: (
        cuff_pressures,
        blood_pressure.encode_intermediate,
        blood_pressure.decode_intermediate,
    ),
    0x2A5E: (
        spot_checks,
        pulse_oximeter.encode_spot_check,
        pulse_oximeter.decode_spot_check,
    ),
    0x2A5F: (
        continuous,
        pulse_oximeter.encode_continuous,
        pulse_oximeter.decode_continuous,
    ),
    0x2A18: (glucose_measurements, glucose.encode, glucose.decode),
    0x2A34: (glucose_contexts(), glucose.encode_context, glucose.decode_context),
    0x2A9D: (weights(), weight_scale.encode, weight_scale.decode),
    0x2A9C: (body_compositions(), body_composition.encode, body_composition.decode),
    0x2A19: (batteries, battery.encode, battery.decode),
    0x2A2B: (current_times, current_time.encode, current_time.decode),
    0x2A08: (date_times, date_time.encode, date_time.decode),
    **{
        uuid: (
            strings,
            partial(device_information.encode, char_id=uuid),
            partial(device_information.decode, char_id=uuid),
        )
        for uuid in device_information.NAMES
    },
}


def test_every_registered_characteristic_has_a_property_profile() -> None:
    assert set(PROFILES) == set(registry.CHARACTERISTICS)


def check_readings(readings: list[Measurement]) -> None:
    for reading in readings:
        assert isinstance(reading, Measurement)
        assert math.isfinite(reading.value)
        assert CANONICAL_UNITS[reading.metric] == reading.unit
        assert reading.time is None or reading.time.utcoffset() is not None


@pytest.mark.parametrize("char_id", sorted(PROFILES), ids=lambda c: f"0x{c:04X}")
@settings(max_examples=150)
@given(data=st.data())
def test_round_trip(char_id: int, data: st.DataObject) -> None:
    strategy, encode, decode = PROFILES[char_id]
    value = data.draw(strategy)
    assert decode(encode(value)) == value
    check_readings(registry.CHARACTERISTICS[char_id].measurements(value))


@settings(max_examples=150)
@given(heart_rates, st.booleans())
def test_heart_rate_round_trip_both_formats(m: heart_rate.HeartRateMeasurement, wide: bool) -> None:
    assert heart_rate.decode(heart_rate.encode(m, uint16=wide)) == m


def decode_or_error(
    decode: Callable[[bytes], Any], payload: bytes
) -> tuple[Any, MalformedPayload | None]:
    """Only MalformedPayload is caught: any other exception fails the test."""
    try:
        return decode(payload), None
    except MalformedPayload as error:
        return None, error


@pytest.mark.parametrize("char_id", sorted(PROFILES), ids=lambda c: f"0x{c:04X}")
@settings(max_examples=200)
@given(payload=st.binary(max_size=48))
def test_any_bytes_decode_or_raise_malformed(char_id: int, payload: bytes) -> None:
    _, encode, decode = PROFILES[char_id]
    value, error = decode_or_error(decode, payload)
    if error is not None:
        assert error.characteristic == f"0x{char_id:04X}"
        assert 0 <= error.offset <= len(payload)
        return
    assert decode(encode(value)) == value
    check_readings(registry.decode_to_measurements(char_id, payload))


def finite(*values: object) -> int:
    return sum(isinstance(v, float) and math.isfinite(v) for v in values)


@given(blood_pressures)
def test_blood_pressure_special_values_never_become_readings(
    m: blood_pressure.BloodPressureMeasurement,
) -> None:
    readings = blood_pressure.measurements(m)
    values = (m.systolic, m.diastolic, m.mean_arterial_pressure, m.pulse_rate)
    assert len(readings) == finite(*values)


@given(cuff_pressures)
def test_cuff_pressure_special_values_never_become_readings(
    m: blood_pressure.IntermediateCuffPressure,
) -> None:
    assert len(blood_pressure.intermediate_measurements(m)) == finite(m.pulse_rate)


@given(temperatures(temperature.TemperatureMeasurement))
def test_temperature_special_values_never_become_readings(
    m: temperature.TemperatureMeasurement,
) -> None:
    assert len(temperature.measurements(m)) == finite(m.temperature)


@given(spot_checks)
def test_spot_check_special_values_never_become_readings(
    m: pulse_oximeter.SpotCheckMeasurement,
) -> None:
    assert len(pulse_oximeter.spot_check_measurements(m)) == finite(m.spo2, m.pulse_rate)


@given(continuous)
def test_continuous_special_values_never_become_readings(
    m: pulse_oximeter.ContinuousMeasurement,
) -> None:
    readings = pulse_oximeter.continuous_measurements(m)
    assert len(readings) == finite(m.normal.spo2, m.normal.pulse_rate)


@given(glucose_measurements)
def test_glucose_special_values_never_become_readings(m: glucose.GlucoseMeasurement) -> None:
    control = m.sample is not None and (
        m.sample.sample_type == glucose.SampleType.CONTROL_SOLUTION
        or m.sample.sample_location == glucose.SampleLocation.CONTROL_SOLUTION
    )
    expected = 0 if m.sample is None or control else finite(m.sample.concentration)
    assert len(glucose.measurements(m)) == expected


@given(st.sampled_from(SpecialValue), st.sampled_from(sorted(PROFILES)))
def test_special_values_in_every_number_slot(special: SpecialValue, char_id: int) -> None:
    # A payload whose every SFLOAT/FLOAT is the same special value gives no numeric reading
    # from those fields: build it from a decoded all-special value of each numeric profile.
    cases: dict[int, Any] = {
        0x2A1C: temperature.TemperatureMeasurement(special),
        0x2A1E: temperature.IntermediateTemperature(special),
        0x2A35: blood_pressure.BloodPressureMeasurement(
            special, special, special, pulse_rate=special
        ),
        0x2A36: blood_pressure.IntermediateCuffPressure(special, pulse_rate=special),
        0x2A5E: pulse_oximeter.SpotCheckMeasurement(special, special),
        0x2A5F: pulse_oximeter.ContinuousMeasurement(
            pulse_oximeter.SpO2PulseRate(special, special)
        ),
        0x2A18: glucose.GlucoseMeasurement(
            1, DateTime(2024, 1, 1, 0, 0, 0), sample=glucose.GlucoseSample(special)
        ),
    }
    if char_id not in cases:
        return
    _, encode, _ = PROFILES[char_id]
    assert registry.decode_to_measurements(char_id, encode(cases[char_id])) == []
