"""What a device says about its own readings: the registry of reading flags and their classes.

A reading may carry flags (protocol v2): short codes for the device's statements about it,
taken from the status fields of the GATT health profiles (Heart Rate sensor contact, Blood
Pressure Measurement Status, PLX Measurement Status and Device and Sensor Status, Glucose
Sensor Status Annunciation, sample type and location, Temperature Type). Each code has a
class, which is what the rest of the system acts on:

- ``invalid``: the device says the value is not a measurement of the participant (no sensor
  contact, invalid measurement, a sensor or strip fault, demonstration or test data);
- ``questionable``: the device doubts it (questionable measurement, weak or erratic signal,
  body movement, loose cuff, an estimate or a measurement still in progress);
- ``info``: context that does not put the value in doubt (measurement site, sample type,
  irregular pulse, a result beyond the meter's range, which bounds the true value).

An unregistered code is stored as the device sent it and classed ``info``: a flag this
gateway does not know never suppresses an alert. The classes order invalid > questionable >
info; a reading's class is that of its worst flag. docs/protocol.md lists the registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Final


class FlagClass(StrEnum):
    INVALID = "invalid"
    QUESTIONABLE = "questionable"
    INFO = "info"


_INVALID: Final = frozenset(
    {
        # Heart Rate: sensor contact supported and not detected.
        "no_sensor_contact",
        # PLX Measurement Status.
        "invalid_measurement",
        "measurement_unavailable",
        "demonstration",
        "testing",
        "calibration_ongoing",
        # PLX Device and Sensor Status.
        "equipment_malfunction",
        "sensor_malfunction",
        "sensor_disconnected",
        "sensor_unconnected_to_user",
        "unknown_sensor",
        # Glucose Sensor Status Annunciation (sensor_malfunction as above).
        "general_device_fault",
        "strip_insertion_error",
        "strip_type_incorrect",
        "sample_size_insufficient",
        "read_interrupted",
    }
)
_QUESTIONABLE: Final = frozenset(
    {
        # PLX Measurement Status.
        "questionable_measurement",
        "measurement_ongoing",
        "early_estimate",
        # PLX Device and Sensor Status.
        "signal_processing_irregularity",
        "inadequate_signal",
        "poor_signal",
        "low_perfusion",
        "erratic_signal",
        "nonpulsatile_signal",
        "questionable_pulse",
        "sensor_interference",
        "sensor_displaced",
        # Blood Pressure Measurement Status.
        "body_movement",
        "cuff_loose",
        "improper_position",
        # Glucose Sensor Status Annunciation.
        "temperature_too_high",
        "temperature_too_low",
        # Temperature and Blood Pressure: a measurement in progress.
        "intermediate",
    }
)
_INFO: Final = frozenset(
    {
        "irregular_pulse",
        "pulse_rate_above_range",
        "pulse_rate_below_range",
        "pulse_rate_range_reserved",
        "validated",
        "fully_qualified",
        "from_storage",
        "signal_analysis_ongoing",
        "extended_display_update_ongoing",
        "device_clock_not_set",
        "device_battery_low",
        "result_above_range",
        "result_below_range",
        "time_fault",
        "multiple_packet",
        "exercise",
    }
)
# Families of context codes: where on the body, what sample. The name after the prefix is
# the profile's value (site_armpit, sample_capillary_plasma, location_finger, ...).
INFO_PREFIXES: Final = (
    "site_",
    "sample_",
    "location_",
    # Glucose Measurement Context: the meal, who tested, the participant's health, what was
    # eaten, which insulin was taken.
    "meal_",
    "tester_",
    "health_",
    "carbs_",
    "insulin_",
    "medication_",
)

REGISTERED: Final = _INVALID | _QUESTIONABLE | _INFO
# The flags that put a reading in doubt: alert rules skip readings carrying one, and the
# hourly rollups and daily summaries leave them out. The database's reading_in_doubt()
# (migration 0021) holds the same list: a change here needs a migration that replaces it.
IN_DOUBT: Final = _INVALID | _QUESTIONABLE
_RANK: Final = {FlagClass.INVALID: 2, FlagClass.QUESTIONABLE: 1, FlagClass.INFO: 0}


def class_of(flag: str) -> FlagClass:
    """The class of one flag (``info`` for a code this registry does not know)."""
    if flag in _INVALID:
        return FlagClass.INVALID
    if flag in _QUESTIONABLE:
        return FlagClass.QUESTIONABLE
    return FlagClass.INFO


def is_registered(flag: str) -> bool:
    return flag in REGISTERED or flag.startswith(INFO_PREFIXES)


def worst(flags: Iterable[str]) -> FlagClass | None:
    """The class of a reading with these flags: its worst flag's; None without flags."""
    out: FlagClass | None = None
    for flag in flags:
        c = class_of(flag)
        if out is None or _RANK[c] > _RANK[out]:
            out = c
    return out


def in_doubt(flags: Iterable[str]) -> bool:
    """Whether the device marked the reading invalid or questionable."""
    return not IN_DOUBT.isdisjoint(flags)


def is_invalid(flags: Iterable[str]) -> bool:
    """Whether the device marked the reading invalid (its worst flag's class is ``invalid``)."""
    return not _INVALID.isdisjoint(flags)
