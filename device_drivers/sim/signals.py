"""Seeded physiological signals for the virtual wearables: pure, no clock.

Each generator draws the simulated participant's own baseline from a healthy range, wanders
around it slowly (an Ornstein-Uhlenbeck walk), adds measurement noise, and has an abnormal
episode that can be switched on and off (fever, hypertension, desaturation,
hyperglycaemia) so the alert rules downstream have something to catch. The same seed gives
the same values; each ``next()`` advances the signal by one sample period.

The ranges are textbook adult reference values, rounded: they make data look right on a
chart, they are not a physiological model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BloodPressureSample",
    "BloodPressureSignal",
    "BodySample",
    "BodySignal",
    "GlucoseSignal",
    "OximetrySample",
    "OximetrySignal",
    "TemperatureSignal",
]


class _Drift:
    """An Ornstein-Uhlenbeck walk: mean 0, stationary spread ``spread``, time constant ``tau_s``."""

    def __init__(self, rng: random.Random, spread: float, tau_s: float, period_s: float) -> None:
        self._rng = rng
        self._decay = math.exp(-period_s / tau_s)
        self._step = spread * math.sqrt(1 - self._decay * self._decay)
        self.value = 0.0

    def next(self) -> float:
        self.value = self.value * self._decay + self._rng.gauss(0.0, self._step)
        return self.value


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


def _check_period(period_s: float) -> None:
    if period_s <= 0:
        raise ValueError("sample_period_s must be positive")


class _Episodic:
    def __init__(self, seed: int, period_s: float) -> None:
        _check_period(period_s)
        self._rng = random.Random(seed)  # noqa: S311  # simulation, not cryptography
        self._period = period_s
        self._episode = False

    @property
    def episode(self) -> bool:
        return self._episode

    def set_episode(self, on: bool) -> None:
        """Switch the abnormal episode on or off (takes effect at the next sample)."""
        if on and not self._episode:
            self._start_episode()
        self._episode = on

    def _start_episode(self) -> None:
        """Draw this episode's level (subclasses)."""


# Oral temperature of healthy adults: 36.3-37.1 Cel; drift over hours (circadian swing is
# about 0.5 Cel peak to peak); thermometer resolution 0.01, noise about 0.05.
_TEMP_BASELINE: Final = (36.5, 36.9)
_TEMP_LIMITS: Final = (36.0, 37.3)
_TEMP_DRIFT: Final = (0.2, 3 * 3600.0)
_TEMP_NOISE: Final = 0.05
_FEVER: Final = (38.3, 39.6)


class TemperatureSignal(_Episodic):
    """Body temperature in Cel (2 decimals); episode: fever 38.3-39.6 Cel."""

    def __init__(self, seed: int, *, sample_period_s: float = 60.0) -> None:
        super().__init__(seed, sample_period_s)
        self._baseline = self._rng.uniform(*_TEMP_BASELINE)
        self._drift = _Drift(self._rng, *_TEMP_DRIFT, sample_period_s)
        self._fever = 0.0

    def _start_episode(self) -> None:
        self._fever = self._rng.uniform(_FEVER[0] + 0.2, _FEVER[1] - 0.2)

    def next(self) -> float:
        drift = self._drift.next()
        if self._episode:
            value = _clamp(self._fever + self._rng.gauss(0.0, 0.1), *_FEVER)
        else:
            value = _clamp(
                self._baseline + drift + self._rng.gauss(0.0, _TEMP_NOISE), *_TEMP_LIMITS
            )
        return round(value, 2)


@dataclass(frozen=True, slots=True)
class BloodPressureSample:
    systolic: int
    diastolic: int
    mean_arterial: int
    pulse_rate: int


# Normal adult office blood pressure: systolic < 130, diastolic < 85 mmHg (ESC/ESH); the
# simulated participant sits around 110-125 / 70-80. Stage 2 hypertension: >= 160 / >= 100.
_SYSTOLIC_BASELINE: Final = (110.0, 125.0)
_DIASTOLIC_BASELINE: Final = (70.0, 80.0)
_BP_DRIFT_TAU_S: Final = 6 * 3600.0
_HYPERTENSION_SYSTOLIC: Final = (160.0, 185.0)
_HYPERTENSION_DIASTOLIC: Final = (100.0, 115.0)
_PULSE_BASELINE: Final = (62.0, 76.0)


class BloodPressureSignal(_Episodic):
    """One cuff measurement per sample; episode: stage 2 hypertension."""

    def __init__(self, seed: int, *, sample_period_s: float = 600.0) -> None:
        super().__init__(seed, sample_period_s)
        self._systolic = self._rng.uniform(*_SYSTOLIC_BASELINE)
        self._diastolic = self._rng.uniform(*_DIASTOLIC_BASELINE)
        self._pulse = self._rng.uniform(*_PULSE_BASELINE)
        self._drift = _Drift(self._rng, 5.0, _BP_DRIFT_TAU_S, sample_period_s)
        self._high = (0.0, 0.0)

    def _start_episode(self) -> None:
        self._high = (
            self._rng.uniform(_HYPERTENSION_SYSTOLIC[0] + 5, _HYPERTENSION_SYSTOLIC[1] - 5),
            self._rng.uniform(_HYPERTENSION_DIASTOLIC[0] + 3, _HYPERTENSION_DIASTOLIC[1] - 3),
        )

    def next(self) -> BloodPressureSample:
        drift = self._drift.next()
        if self._episode:
            systolic = _clamp(self._high[0] + self._rng.gauss(0, 4), *_HYPERTENSION_SYSTOLIC)
            diastolic = _clamp(self._high[1] + self._rng.gauss(0, 3), *_HYPERTENSION_DIASTOLIC)
        else:
            systolic = _clamp(self._systolic + drift + self._rng.gauss(0, 4), 95, 135)
            diastolic = _clamp(self._diastolic + drift * 0.6 + self._rng.gauss(0, 3), 60, 88)
        pulse = _clamp(self._pulse + self._rng.gauss(0, 3), 50, 100)
        systolic, diastolic = round(systolic), round(diastolic)
        # Mean arterial pressure ~ diastolic + a third of the pulse pressure.
        mean = round(diastolic + (systolic - diastolic) / 3)
        return BloodPressureSample(systolic, diastolic, mean, round(pulse))


@dataclass(frozen=True, slots=True)
class OximetrySample:
    spo2: int
    pulse_rate: int


# SpO2 of healthy adults at sea level: 95-100 %; below 90 % is hypoxaemia. Oximeters report
# whole percent. A desaturation episode holds 84-89 %.
_SPO2_BASELINE: Final = (96.5, 98.5)
_DESATURATION: Final = (84.0, 89.0)


class OximetrySignal(_Episodic):
    """SpO2 (%) and pulse rate (/min); episode: desaturation to 84-89 %."""

    def __init__(self, seed: int, *, sample_period_s: float = 1.0) -> None:
        super().__init__(seed, sample_period_s)
        self._spo2 = self._rng.uniform(*_SPO2_BASELINE)
        self._pulse = self._rng.uniform(*_PULSE_BASELINE)
        self._pulse_drift = _Drift(self._rng, 4.0, 120.0, sample_period_s)
        self._low = 0.0

    def _start_episode(self) -> None:
        self._low = self._rng.uniform(_DESATURATION[0] + 1, _DESATURATION[1] - 1)

    def next(self) -> OximetrySample:
        pulse = _clamp(self._pulse + self._pulse_drift.next() + self._rng.gauss(0, 1.0), 50, 100)
        if self._episode:
            spo2 = _clamp(self._low + self._rng.gauss(0, 0.8), *_DESATURATION)
        else:
            spo2 = _clamp(self._spo2 + self._rng.gauss(0, 0.6), 95, 100)
        return OximetrySample(round(spo2), round(pulse))


# Capillary glucose (mg/dL): fasting 70-99, two hours after a meal below 140 in people
# without diabetes; hyperglycaemia is taken as 250-350 here (well above the 180 target).
_FASTING: Final = (82.0, 98.0)
_AFTER_MEAL_RISE: Final = (15.0, 45.0)
_HYPERGLYCAEMIA: Final = (250.0, 350.0)


class GlucoseSignal(_Episodic):
    """One finger-stick glucose in mg/dL (integer) per sample, before or after a meal.

    :attr:`last_after_meal` says which (it becomes the record's meal context);
    episode: hyperglycaemia, 250-350 mg/dL.
    """

    def __init__(self, seed: int, *, sample_period_s: float = 6 * 3600.0) -> None:
        super().__init__(seed, sample_period_s)
        self._fasting = self._rng.uniform(*_FASTING)
        self.last_after_meal = False

    def next(self) -> int:
        self.last_after_meal = self._rng.random() < 0.5
        if self._episode:
            value = self._rng.uniform(*_HYPERGLYCAEMIA)
        else:
            value = self._fasting + self._rng.gauss(0, 5)
            if self.last_after_meal:
                value += self._rng.uniform(*_AFTER_MEAL_RISE)
            value = _clamp(value, 70, 160)
        return round(value)


@dataclass(frozen=True, slots=True)
class BodySample:
    weight_kg: float
    body_fat_percent: float


class BodySignal(_Episodic):
    """Weight (kg, 0.005 kg steps) and body fat (%, 0.1 steps); no abnormal episode."""

    def __init__(self, seed: int, *, sample_period_s: float = 86_400.0) -> None:
        super().__init__(seed, sample_period_s)
        self._weight = self._rng.uniform(58.0, 95.0)
        self._fat = self._rng.uniform(18.0, 32.0)
        self._drift = _Drift(self._rng, 1.0, 30 * 86_400.0, sample_period_s)

    def next(self) -> BodySample:
        drift = self._drift.next()
        weight = self._weight + drift + self._rng.gauss(0, 0.3)
        fat = self._fat + drift * 0.3 + self._rng.gauss(0, 0.4)
        return BodySample(round(weight * 200) / 200, round(fat, 1))
