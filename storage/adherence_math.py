"""What each participant-day's counts mean against the schedule (docs/adherence.md): pure
computation over rows ``storage.adherence`` reads, so one cohort answer is a few indexed
reads and a loop, not a query planned per cell.

- A day's bounds are local midnight to midnight in the zone valid at the day's noon (UTC),
  so a daylight-saving day has 23 or 25 hours.
- Its study minutes are those inside the participant's study period: from the first consent
  to the first full withdrawal, and not after now.
- The schedule row in effect for a participant, metric and day is the most specific scope
  with a row from that day or before (the participant's own, else their arm's, else the
  study's), and within it the latest.
- Continuous: ``wear_hours`` prorated on the study minutes, never more than them; spot:
  ``per_day`` prorated and rounded down. Adherence is capped at 1; completeness is usable
  readings against the rate over the expected wear.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from zoneinfo import ZoneInfo

NOON = time(12)


@dataclass(frozen=True, slots=True)
class Person:
    participant_id: str
    study_id: str
    arm: str | None
    consented_at: datetime | None
    withdrawn_at: datetime | None


@dataclass(frozen=True, slots=True)
class ZoneSpan:
    """A zone of a participant's, valid from ``valid_from`` (None: always before) to
    ``valid_to`` (None: from then on)."""

    participant_id: str
    time_zone: str
    valid_from: datetime | None
    valid_to: datetime | None


@dataclass(frozen=True, slots=True)
class Rule:
    """A schedule row."""

    study_id: str
    arm: str | None
    participant_id: str | None
    metric: str
    effective_from: date
    kind: str
    rate_hz: float | None
    wear_hours: float | None
    per_day: int | None


@dataclass(frozen=True, slots=True)
class Counts:
    """A participant's adherence days in the span, as arrays (one row a participant reads
    much faster than one a day and metric)."""

    participant_id: str
    days: list[date]
    metrics: list[str]
    readings: list[int]
    invalid: list[int]
    worn_minutes: list[int]


@dataclass(frozen=True, slots=True)
class MetricDay:
    """One participant's metric on one local day: what arrived and what was expected.

    ``adherence`` is the share of the expectation met (capped at 1): worn minutes against
    ``expected_minutes`` for a continuous stream, usable readings against
    ``expected_count`` for spot checks; None where nothing was expected that day.
    ``completeness`` (continuous only) is the usable readings against ``rate_hz`` over the
    expected wear time."""

    participant_id: str
    day: date
    metric: str
    kind: str | None
    readings: int
    invalid: int
    worn_minutes: int
    study_minutes: float
    expected_minutes: float | None
    expected_count: int | None
    adherence: float | None
    completeness: float | None


@dataclass(frozen=True, slots=True)
class ParticipantDay:
    """A participant's local day for the cohort view: the mean adherence of the metrics
    expected that day (None: nothing expected, e.g. before consent)."""

    participant_id: str
    day: date
    adherence: float | None
    metrics_expected: int
    metrics_met: int


@dataclass(frozen=True, slots=True)
class Inputs:
    """What one answer is computed from: the participants, their zones, the schedule rows of
    their studies, their days' counts, the span of days, and the database's now."""

    people: Sequence[Person]
    zones: Mapping[str, Sequence[ZoneSpan]]
    rules: Sequence[Rule]
    counts: Iterable[Counts]
    first: date
    last: date
    now: datetime


@cache
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@cache
def day_bounds(zone: str, day: date) -> tuple[datetime, datetime]:
    """Local midnight to the next, in UTC."""
    tz = _zone(zone)
    start = datetime.combine(day, time(0), tz).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), tz).astimezone(UTC)
    return start, end


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _us(t: datetime) -> int:
    """Microseconds since the epoch, exactly (the cohort's loop compares integers)."""
    return (t - _EPOCH) // _MICROSECOND


@cache
def _day_us(zone: str, day: date) -> tuple[int, int]:
    start, end = day_bounds(zone, day)
    return _us(start), _us(end)


def zone_on(spans: Sequence[ZoneSpan], day: date) -> str:
    noon = datetime.combine(day, NOON, UTC)
    for s in spans:
        if (s.valid_from is None or s.valid_from <= noon) and (
            s.valid_to is None or noon < s.valid_to
        ):
            return s.time_zone
    return "UTC"


def _candidates(person: Person, rules: Iterable[Rule]) -> dict[str, list[Rule]]:
    """The person's rules per metric, most specific scope first, then latest first."""
    out: dict[str, list[Rule]] = {}
    for r in rules:
        if r.study_id != person.study_id:
            continue
        mine = r.participant_id == person.participant_id
        general = r.participant_id is None and (r.arm is None or r.arm == person.arm)
        if mine or general:
            out.setdefault(r.metric, []).append(r)
    for found in out.values():
        found.sort(
            key=lambda r: (r.participant_id is not None, r.arm is not None, r.effective_from),
            reverse=True,
        )
    return out


def _in_effect(candidates: Sequence[Rule], day: date) -> Rule | None:
    return next((r for r in candidates if r.effective_from <= day), None)


Tally = tuple[int, int, int]  # readings, invalid, worn minutes
_NONE: Tally = (0, 0, 0)
_NO_TALLIES: Mapping[str, Tally] = {}
Expected = tuple[str | None, float | None, int | None, float | None, float | None]


def _wear_minutes(rule: Rule, study: float, day_minutes: float) -> float:
    """A continuous stream's expected wear: ``wear_hours`` prorated, at most the study's."""
    assert rule.wear_hours is not None
    return min(rule.wear_hours * 60 * study / day_minutes, study)


def _spot_count(rule: Rule, study: float, day_minutes: float) -> int | None:
    """Spot checks expected: ``per_day`` prorated and rounded down; None for none."""
    assert rule.per_day is not None
    return math.floor(rule.per_day * study / day_minutes) or None


def _expected(rule: Rule | None, tally: Tally, study: float, day_minutes: float) -> Expected:
    """kind, expected minutes, expected count, adherence, completeness."""
    if rule is None or rule.kind == "none":
        return None, None, None, None, None
    if rule.kind == "continuous":
        if study <= 0:
            return rule.kind, None, None, None, None
        assert rule.rate_hz is not None
        minutes = _wear_minutes(rule, study, day_minutes)
        if minutes <= 0:
            return rule.kind, minutes, None, None, None
        rate = min(1.0, (tally[0] - tally[1]) / (rule.rate_hz * 60 * minutes))
        return rule.kind, minutes, None, min(1.0, tally[2] / minutes), rate
    count = _spot_count(rule, study, day_minutes)
    return rule.kind, None, count, _share(rule, tally, study, day_minutes), None


def _share(rule: Rule | None, tally: Tally, study: float, day_minutes: float) -> float | None:
    """The adherence of ``_expected`` alone (the cohort needs nothing else, for every cell)."""
    if rule is None or rule.kind == "none" or study <= 0:
        return None
    if rule.kind == "continuous":
        minutes = _wear_minutes(rule, study, day_minutes)
        return min(1.0, tally[2] / minutes) if minutes > 0 else None
    count = _spot_count(rule, study, day_minutes)
    return min(1.0, (tally[0] - tally[1]) / count) if count else None


# participant, day, study minutes, day minutes, the metrics (sorted), their rules, their tallies
Cell = tuple[str, date, float, float, list[str], Mapping[str, Rule], Mapping[str, Tally]]


def _cells(given: Inputs) -> Iterator[Cell]:
    """Per participant and day (in order): study minutes, day minutes, and each metric the
    schedule has a row for or that has data, with the rules and tallies to look them up in."""
    tallies: dict[str, dict[date, dict[str, Tally]]] = {}
    for c in given.counts:
        mine = tallies.setdefault(c.participant_id, {})
        for day, metric, n, bad, worn in zip(
            c.days, c.metrics, c.readings, c.invalid, c.worn_minutes, strict=True
        ):
            mine.setdefault(day, {})[metric] = (n, bad, worn)
    span = [given.first + timedelta(days=i) for i in range((given.last - given.first).days + 1)]
    # Participants with the same rules share what is in effect each day.
    in_effect: dict[tuple[int, ...], dict[date, dict[str, Rule]]] = {}
    ordered: dict[tuple[int, ...], dict[date, list[str]]] = {}
    for person in sorted(given.people, key=lambda p: p.participant_id):
        candidates = _candidates(person, given.rules)
        signature = tuple(id(r) for m in sorted(candidates) for r in candidates[m])
        by_day = in_effect.setdefault(signature, {})
        own_zones = given.zones.get(person.participant_id, ())
        own_tallies = tallies.get(person.participant_id, {})
        end = _us(min(person.withdrawn_at or given.now, given.now))
        consented = _us(person.consented_at) if person.consented_at else None
        ruled_order = ordered.setdefault(signature, {})
        for day in span:
            ruled = by_day.get(day)
            if ruled is None:
                ruled = by_day[day] = {
                    m: r for m, c in candidates.items() if (r := _in_effect(c, day)) is not None
                }
                ruled_order[day] = sorted(ruled)
            start_us, end_us = _day_us(zone_on(own_zones, day) if own_zones else "UTC", day)
            lo = max(start_us, consented) if consented is not None else None
            hi = min(end_us, end)
            # As timedelta.total_seconds() / 60 would give, bit for bit.
            study = (hi - lo) / 10**6 / 60 if lo is not None and hi > lo else 0.0
            tallied = own_tallies.get(day, _NO_TALLIES)
            metrics = sorted(ruled.keys() | tallied.keys()) if tallied else ruled_order[day]
            yield (
                person.participant_id,
                day,
                study,
                (end_us - start_us) / 10**6 / 60,
                metrics,
                ruled,
                tallied,
            )


def metric_days(given: Inputs) -> list[MetricDay]:
    """Each person's metrics on each local day from ``first`` to ``last``, by participant,
    day and metric: those the schedule has a row for and those with data."""
    return [
        _metric_day(pid, day, m, ruled.get(m), tallied.get(m, _NONE), study, day_minutes)
        for pid, day, study, day_minutes, metrics, ruled, tallied in _cells(given)
        for m in metrics
    ]


def _metric_day(
    pid: str, day: date, metric: str, rule: Rule | None, tally: Tally, study: float, dm: float
) -> MetricDay:
    kind, minutes, count, share, rate = _expected(rule, tally, study, dm)
    return MetricDay(pid, day, metric, kind, *tally, study, minutes, count, share, rate)


def cohort(given: Inputs) -> list[ParticipantDay]:
    """The heat map's cells: per participant and day with a metric, the mean adherence of
    the metrics expected, how many were, and how many were met in full."""
    out: list[ParticipantDay] = []
    for pid, day, study, day_minutes, metrics, ruled, tallied in _cells(given):
        if not metrics:
            continue
        shares = [
            share
            for m in metrics
            if (share := _share(ruled.get(m), tallied.get(m, _NONE), study, day_minutes))
            is not None
        ]
        out.append(
            ParticipantDay(
                pid,
                day,
                sum(shares) / len(shares) if shares else None,
                len(shares),
                sum(1 for a in shares if a >= 1),
            )
        )
    return out
