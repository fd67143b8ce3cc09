"""Glucose (service 0x1808): Glucose Measurement (0x2A18) and Glucose Measurement Context
(0x2A34) (Glucose Service 1.0 / Glucose Profile 1.0).

Glucose Measurement: flags uint8 (bit 0 Time Offset present; bit 1 concentration, type and
sample location present; bit 2 concentration unit, 0 kg/L, 1 mol/L; bit 3 Sensor Status
Annunciation present; bit 4 context information follows); sequence number uint16; base
time (Date Time); time offset sint16 minutes; concentration SFLOAT; type (low nibble) and
sample location (high nibble) uint8; sensor status annunciation uint16.

The reading is ``glucose`` in mg/dL at base time + time offset:

- kg/L: 1 kg/L = 10^5 mg/dL.
- mol/L: converted with the molar mass of glucose (C6H12O6), 180.156 g/mol, so
  1 mol/L = 18015.6 mg/dL (and 1 mmol/L = 18.0156 mg/dL).

Sample type, sample location and annunciation bits become flags (``sample_capillary_plasma``,
``location_finger``, ``device_battery_low``...). A control-solution test checks the meter,
not the participant: it is decoded (flag ``control_solution``) but gives no reading.

Glucose Measurement Context: flags uint8 (bit 0 carbohydrate, bit 1 meal, bit 2
tester-health, bit 3 exercise, bit 4 medication, bit 5 medication unit 0 kg / 1 L, bit 6
HbA1c, bit 7 extended flags present); sequence number uint16; extended flags uint8;
carbohydrate id uint8 + SFLOAT (kg); meal uint8; tester (low) / health (high) nibbles uint8;
exercise duration uint16 s + intensity uint8 %; medication id uint8 + SFLOAT (kg or L);
HbA1c SFLOAT (%). Context gives no reading of its own (no canonical metric covers it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from device_drivers.gatt import date_time
from device_drivers.gatt._codec import Reader, Writer
from device_drivers.gatt.base import Measurement, clean, reading
from device_drivers.gatt.date_time import DateTime
from device_drivers.gatt.errors import EncodeError
from device_drivers.gatt.ieee11073 import Numeric, SpecialValue

__all__ = [
    "CONTEXT_CHARACTERISTIC",
    "GLUCOSE_MOLAR_MASS_G_PER_MOL",
    "MEASUREMENT_CHARACTERISTIC",
    "Carbohydrate",
    "CarbohydrateId",
    "Exercise",
    "GlucoseContext",
    "GlucoseMeasurement",
    "GlucoseSample",
    "GlucoseUnit",
    "Health",
    "Meal",
    "Medication",
    "MedicationId",
    "MedicationUnit",
    "SampleLocation",
    "SampleType",
    "SensorStatus",
    "Tester",
    "context_measurements",
    "decode",
    "decode_context",
    "encode",
    "encode_context",
    "measurement_time",
    "measurements",
]

MEASUREMENT_CHARACTERISTIC = 0x2A18
CONTEXT_CHARACTERISTIC = 0x2A34

GLUCOSE_MOLAR_MASS_G_PER_MOL = 180.156
_MG_PER_DL_PER_KG_PER_L = 100_000.0  # 1 kg/L = 10^6 mg / 10 dL
_MG_PER_DL_PER_MOL_PER_L = GLUCOSE_MOLAR_MASS_G_PER_MOL * 100.0  # g/L -> mg/dL is x100

_FLAG_TIME_OFFSET = 0x01
_FLAG_SAMPLE = 0x02
_FLAG_MOL_PER_L = 0x04
_FLAG_SENSOR_STATUS = 0x08
_FLAG_CONTEXT_FOLLOWS = 0x10

_CTX_CARBOHYDRATE = 0x01
_CTX_MEAL = 0x02
_CTX_TESTER_HEALTH = 0x04
_CTX_EXERCISE = 0x08
_CTX_MEDICATION = 0x10
_CTX_MEDICATION_LITERS = 0x20
_CTX_HBA1C = 0x40
_CTX_EXTENDED = 0x80

_NIBBLE = 0x0F


class GlucoseUnit(enum.Enum):
    KG_PER_L = "kg/L"
    MOL_PER_L = "mol/L"


class SampleType(enum.IntEnum):
    """Type nibble; 0 and 11..15 are reserved."""

    CAPILLARY_WHOLE_BLOOD = 1
    CAPILLARY_PLASMA = 2
    VENOUS_WHOLE_BLOOD = 3
    VENOUS_PLASMA = 4
    ARTERIAL_WHOLE_BLOOD = 5
    ARTERIAL_PLASMA = 6
    UNDETERMINED_WHOLE_BLOOD = 7
    UNDETERMINED_PLASMA = 8
    INTERSTITIAL_FLUID = 9
    CONTROL_SOLUTION = 10


class SampleLocation(enum.IntEnum):
    """Sample Location nibble; 0 and 5..14 are reserved."""

    FINGER = 1
    ALTERNATE_SITE_TEST = 2
    EARLOBE = 3
    CONTROL_SOLUTION = 4
    NOT_AVAILABLE = 15


class SensorStatus(enum.IntFlag):
    """Sensor Status Annunciation (uint16); bits 12-15 reserved."""

    DEVICE_BATTERY_LOW = 1 << 0
    SENSOR_MALFUNCTION = 1 << 1
    SAMPLE_SIZE_INSUFFICIENT = 1 << 2
    STRIP_INSERTION_ERROR = 1 << 3
    STRIP_TYPE_INCORRECT = 1 << 4
    RESULT_ABOVE_RANGE = 1 << 5
    RESULT_BELOW_RANGE = 1 << 6
    TEMPERATURE_TOO_HIGH = 1 << 7
    TEMPERATURE_TOO_LOW = 1 << 8
    READ_INTERRUPTED = 1 << 9
    GENERAL_DEVICE_FAULT = 1 << 10
    TIME_FAULT = 1 << 11


class CarbohydrateId(enum.IntEnum):
    BREAKFAST = 1
    LUNCH = 2
    DINNER = 3
    SNACK = 4
    DRINK = 5
    SUPPER = 6
    BRUNCH = 7


class Meal(enum.IntEnum):
    PREPRANDIAL = 1
    POSTPRANDIAL = 2
    FASTING = 3
    CASUAL = 4
    BEDTIME = 5


class Tester(enum.IntEnum):
    SELF = 1
    HEALTH_CARE_PROFESSIONAL = 2
    LAB_TEST = 3
    NOT_AVAILABLE = 15


class Health(enum.IntEnum):
    MINOR_HEALTH_ISSUES = 1
    MAJOR_HEALTH_ISSUES = 2
    DURING_MENSES = 3
    UNDER_STRESS = 4
    NO_HEALTH_ISSUES = 5
    NOT_AVAILABLE = 15


class MedicationId(enum.IntEnum):
    RAPID_ACTING_INSULIN = 1
    SHORT_ACTING_INSULIN = 2
    INTERMEDIATE_ACTING_INSULIN = 3
    LONG_ACTING_INSULIN = 4
    PRE_MIXED_INSULIN = 5


class MedicationUnit(enum.Enum):
    KILOGRAMS = "kg"
    LITERS = "L"


@dataclass(frozen=True, slots=True)
class GlucoseSample:
    """Concentration with its unit, sample type and location (nibbles, raw if reserved)."""

    concentration: Numeric
    unit: GlucoseUnit = GlucoseUnit.KG_PER_L
    sample_type: int = SampleType.CAPILLARY_WHOLE_BLOOD
    sample_location: int = SampleLocation.FINGER


@dataclass(frozen=True, slots=True)
class GlucoseMeasurement:
    sequence_number: int
    base_time: DateTime
    time_offset_minutes: int | None = None
    sample: GlucoseSample | None = None
    sensor_status: int | None = None
    context_follows: bool = False


@dataclass(frozen=True, slots=True)
class Carbohydrate:
    carbohydrate_id: int
    kilograms: Numeric


@dataclass(frozen=True, slots=True)
class Exercise:
    duration_s: int
    intensity_percent: int


@dataclass(frozen=True, slots=True)
class Medication:
    medication_id: int
    amount: Numeric
    unit: MedicationUnit = MedicationUnit.KILOGRAMS


@dataclass(frozen=True, slots=True)
class GlucoseContext:
    """Context for the Glucose Measurement with the same sequence number."""

    sequence_number: int
    extended_flags: int | None = None
    carbohydrate: Carbohydrate | None = None
    meal: int | None = None
    tester: int | None = None
    health: int | None = None
    exercise: Exercise | None = None
    medication: Medication | None = None
    hba1c_percent: Numeric | None = None


def _enum_or_raw(kind: type[enum.IntEnum], raw: int) -> int:
    try:
        return kind(raw)
    except ValueError:
        return raw


def decode(data: bytes) -> GlucoseMeasurement:
    reader = Reader(data, MEASUREMENT_CHARACTERISTIC)
    flags = reader.u8()
    sequence = reader.u16()
    base_time = date_time.read(reader)
    offset = reader.s16() if flags & _FLAG_TIME_OFFSET else None
    sample = None
    if flags & _FLAG_SAMPLE:
        concentration = reader.sfloat()
        type_location = reader.u8()
        sample = GlucoseSample(
            concentration,
            GlucoseUnit.MOL_PER_L if flags & _FLAG_MOL_PER_L else GlucoseUnit.KG_PER_L,
            _enum_or_raw(SampleType, type_location & _NIBBLE),
            _enum_or_raw(SampleLocation, type_location >> 4),
        )
    status = reader.u16() if flags & _FLAG_SENSOR_STATUS else None
    return GlucoseMeasurement(
        sequence, base_time, offset, sample, status, bool(flags & _FLAG_CONTEXT_FOLLOWS)
    )


def encode(m: GlucoseMeasurement) -> bytes:
    flags = _FLAG_CONTEXT_FOLLOWS if m.context_follows else 0
    if m.time_offset_minutes is not None:
        flags |= _FLAG_TIME_OFFSET
    if m.sample is not None:
        flags |= _FLAG_SAMPLE
        if m.sample.unit is GlucoseUnit.MOL_PER_L:
            flags |= _FLAG_MOL_PER_L
    if m.sensor_status is not None:
        flags |= _FLAG_SENSOR_STATUS
    writer = Writer()
    writer.u8(flags)
    writer.u16(m.sequence_number)
    date_time.write(writer, m.base_time)
    if m.time_offset_minutes is not None:
        writer.s16(m.time_offset_minutes)
    if m.sample is not None:
        writer.sfloat(m.sample.concentration)
        _check_nibble(m.sample.sample_type)
        _check_nibble(m.sample.sample_location)
        writer.u8(m.sample.sample_type | (m.sample.sample_location << 4))
    if m.sensor_status is not None:
        writer.u16(m.sensor_status)
    return writer.getvalue()


def _check_nibble(value: int) -> None:
    if not 0 <= value <= _NIBBLE:
        raise EncodeError(f"{value} does not fit a 4-bit field")


def measurement_time(m: GlucoseMeasurement) -> datetime | None:
    """Base time plus time offset, as aware UTC; None when the base time is unknown."""
    base = m.base_time.to_datetime()
    if base is None or m.time_offset_minutes is None:
        return base
    try:
        return base + timedelta(minutes=m.time_offset_minutes)
    except OverflowError:
        return None


def _mg_per_dl(value: Numeric, unit: GlucoseUnit) -> Numeric:
    if isinstance(value, SpecialValue):
        return value
    factor = _MG_PER_DL_PER_MOL_PER_L if unit is GlucoseUnit.MOL_PER_L else _MG_PER_DL_PER_KG_PER_L
    return clean(value * factor)


def _sample_flags(sample: GlucoseSample) -> list[str]:
    flags: list[str] = []
    kind = _enum_or_raw(SampleType, sample.sample_type)
    where = _enum_or_raw(SampleLocation, sample.sample_location)
    flags.append(
        f"sample_{kind.name.lower()}" if isinstance(kind, SampleType) else f"sample_reserved_{kind}"
    )
    if where is not SampleLocation.NOT_AVAILABLE:
        flags.append(
            f"location_{where.name.lower()}"
            if isinstance(where, SampleLocation)
            else f"location_reserved_{where}"
        )
    if kind == SampleType.CONTROL_SOLUTION or where == SampleLocation.CONTROL_SOLUTION:
        flags.append("control_solution")
    return flags


def measurements(m: GlucoseMeasurement) -> list[Measurement]:
    """One ``glucose`` reading in mg/dL when a concentration is present and finite."""
    if m.sample is None:
        return []
    flags = _sample_flags(m.sample)
    if "control_solution" in flags:
        return []  # meter quality control, not the participant's glucose
    if m.sensor_status is not None:
        flags += [str(bit.name).lower() for bit in SensorStatus if m.sensor_status & bit]
    return reading(
        "glucose",
        _mg_per_dl(m.sample.concentration, m.sample.unit),
        time=measurement_time(m),
        flags=tuple(flags),
    )


def decode_context(data: bytes) -> GlucoseContext:
    reader = Reader(data, CONTEXT_CHARACTERISTIC)
    flags = reader.u8()
    sequence = reader.u16()
    extended = reader.u8() if flags & _CTX_EXTENDED else None
    carbohydrate = None
    if flags & _CTX_CARBOHYDRATE:
        carbohydrate = Carbohydrate(_enum_or_raw(CarbohydrateId, reader.u8()), reader.sfloat())
    meal = _enum_or_raw(Meal, reader.u8()) if flags & _CTX_MEAL else None
    tester = health = None
    if flags & _CTX_TESTER_HEALTH:
        tester_health = reader.u8()
        tester = _enum_or_raw(Tester, tester_health & _NIBBLE)
        health = _enum_or_raw(Health, tester_health >> 4)
    exercise = None
    if flags & _CTX_EXERCISE:
        exercise = Exercise(reader.u16(), reader.u8())
    medication = None
    if flags & _CTX_MEDICATION:
        unit = MedicationUnit.LITERS if flags & _CTX_MEDICATION_LITERS else MedicationUnit.KILOGRAMS
        medication = Medication(_enum_or_raw(MedicationId, reader.u8()), reader.sfloat(), unit)
    hba1c = reader.sfloat() if flags & _CTX_HBA1C else None
    return GlucoseContext(
        sequence, extended, carbohydrate, meal, tester, health, exercise, medication, hba1c
    )


def encode_context(c: GlucoseContext) -> bytes:
    """Encode; ``tester`` and ``health`` share one byte, so both or neither must be set."""
    if (c.tester is None) != (c.health is None):
        raise EncodeError("tester and health are sent together: set both or neither")
    flags = 0
    for present, bit in (
        (c.carbohydrate, _CTX_CARBOHYDRATE),
        (c.meal, _CTX_MEAL),
        (c.tester, _CTX_TESTER_HEALTH),
        (c.exercise, _CTX_EXERCISE),
        (c.medication, _CTX_MEDICATION),
        (c.hba1c_percent, _CTX_HBA1C),
        (c.extended_flags, _CTX_EXTENDED),
    ):
        if present is not None:
            flags |= bit
    if c.medication is not None and c.medication.unit is MedicationUnit.LITERS:
        flags |= _CTX_MEDICATION_LITERS
    writer = Writer()
    writer.u8(flags)
    writer.u16(c.sequence_number)
    if c.extended_flags is not None:
        writer.u8(c.extended_flags)
    if c.carbohydrate is not None:
        writer.u8(c.carbohydrate.carbohydrate_id)
        writer.sfloat(c.carbohydrate.kilograms)
    if c.meal is not None:
        writer.u8(c.meal)
    if c.tester is not None and c.health is not None:
        _check_nibble(c.tester)
        _check_nibble(c.health)
        writer.u8(c.tester | (c.health << 4))
    if c.exercise is not None:
        writer.u16(c.exercise.duration_s)
        writer.u8(c.exercise.intensity_percent)
    if c.medication is not None:
        writer.u8(c.medication.medication_id)
        writer.sfloat(c.medication.amount)
    if c.hba1c_percent is not None:
        writer.sfloat(c.hba1c_percent)
    return writer.getvalue()


# Flag prefixes of the context's enumerations (ingest.flags: information only).
_CONTEXT_FLAGS: tuple[tuple[str, type[enum.IntEnum]], ...] = (
    ("meal", Meal),
    ("tester", Tester),
    ("health", Health),
)
_INSULIN_FLAGS: dict[int, str] = {
    MedicationId.RAPID_ACTING_INSULIN: "insulin_rapid_acting",
    MedicationId.SHORT_ACTING_INSULIN: "insulin_short_acting",
    MedicationId.INTERMEDIATE_ACTING_INSULIN: "insulin_intermediate_acting",
    MedicationId.LONG_ACTING_INSULIN: "insulin_long_acting",
    MedicationId.PRE_MIXED_INSULIN: "insulin_pre_mixed",
}


def _named(prefix: str, kind: type[enum.IntEnum], raw: int) -> str:
    value = _enum_or_raw(kind, raw)
    return (
        f"{prefix}_{value.name.lower()}" if isinstance(value, kind) else f"{prefix}_reserved_{raw}"
    )


def context_flags(c: GlucoseContext) -> tuple[str, ...]:
    """What the context says of its measurement, as reading flags: the meal, who tested,
    the participant's health, what was eaten and which insulin was taken."""
    flags: list[str] = []
    for (prefix, kind), raw in zip(_CONTEXT_FLAGS, (c.meal, c.tester, c.health), strict=True):
        if raw is not None and raw != 15:  # 15: "not available"
            flags.append(_named(prefix, kind, raw))
    if c.carbohydrate is not None:
        flags.append(_named("carbs", CarbohydrateId, c.carbohydrate.carbohydrate_id))
    if c.medication is not None:
        raw = c.medication.medication_id
        flags.append(_INSULIN_FLAGS.get(raw, f"medication_reserved_{raw}"))
    if c.exercise is not None:
        flags.append("exercise")
    return tuple(sorted(flags))


def context_measurements(c: GlucoseContext) -> list[Measurement]:
    """The context's own values, each a reading at its measurement's time (the caller
    stamps them): carbohydrates eaten (g), exercise (s, %), medication (mg or mL) and HbA1c
    (%). Special values (NaN, NRes) give none."""
    out: list[Measurement] = []
    if c.carbohydrate is not None:
        out += reading("carbohydrate_intake", _scaled(c.carbohydrate.kilograms, 1000.0))
    if c.exercise is not None:
        # 65535 s is "overrun": longer than the field holds, not a duration.
        if c.exercise.duration_s != 0xFFFF:
            out += reading("exercise_duration", float(c.exercise.duration_s))
        out += reading("exercise_intensity", float(c.exercise.intensity_percent))
    if c.medication is not None:
        if c.medication.unit is MedicationUnit.LITERS:
            out += reading("medication_volume", _scaled(c.medication.amount, 1000.0))
        else:
            out += reading("medication_mass", _scaled(c.medication.amount, 1_000_000.0))
    out += reading("hba1c", c.hba1c_percent)
    return out


def _scaled(value: Numeric, factor: float) -> Numeric:
    return value if isinstance(value, SpecialValue) else clean(value * factor)
