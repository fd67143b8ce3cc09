"""Alert rules, judged by reading time: pure, no I/O, no clock ("now" is passed in).

A **range** rule breaches when a value is below ``low`` or above ``high``. A breach *run* is a
sequence of breaching readings, consecutive by reading time, with no two neighbours further
apart than ``max_gap_s`` (a longer silence breaks the run: nothing says the condition held
through it). Any reading that does not breach also breaks the run. The rule *opens* at the
reading where a run has spanned ``sustained_s`` (its first and latest readings that far
apart; ``sustained_s = 0`` opens on the first breaching reading). Once open it *clears* only
at a reading inside ``[low + hysteresis, high - hysteresis]``; readings between that band
and the bounds keep it open. Silence never clears a range rule.

A **missing_data** rule opens when no reading of its metric is newer than ``sustained_s``
before now (time-based: :func:`sweep_missing`), and clears when a reading arrives that
makes the latest reading time newer than that again (:func:`evaluate_missing`).

Late data. :func:`evaluate` folds readings newer than everything already judged into the
prior :class:`RuleState` (a batch of in-range readings for an idle rule is decided by one
pass over its values, vectorised in pyarrow for long series). A reading at or before
``state.evaluated_until`` cannot be folded in: the caller re-reads the stored readings from
a *reset point* and calls :func:`replay`. A reset point is a reading inside the clearing
band: after it every rule is idle with no run, whatever came before, so replaying from the
last one before the earliest late reading reproduces the rule's timeline exactly
(:func:`clear_band` gives the band to look for). The replayed episodes are reconciled with
the episodes already alerted (their start times): only episodes not yet alerted open; the
open episode clears if the replay ends it. Alerts already raised are never withdrawn: an
episode that late data dissolves is cleared, at the time of the earliest late reading.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from ingest.errors import IngestError

# The continuity rule for sustained conditions when a rule does not set one: neighbouring
# readings up to a minute apart (a wearable streams every second or so, with short drop-outs).
DEFAULT_MAX_GAP_S = 60


class RuleError(IngestError):
    """A rule's definition is inconsistent (bounds, hysteresis, durations)."""


class RuleKind(StrEnum):
    RANGE = "range"
    MISSING_DATA = "missing_data"
    # Adherence below ``low`` percent on each of the last ``sustained_s / DAY_S`` local days
    # the schedule expected the metric (docs/adherence.md).
    ADHERENCE = "adherence"


DAY_S = 86_400
MAX_ADHERENCE_DAYS = 31


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Change(StrEnum):
    OPENED = "opened"
    CLEARED = "cleared"


@dataclass(frozen=True, slots=True)
class Rule:
    """One alert rule. ``participant_id`` set: an override of the study rule of that name."""

    rule_id: int
    study_id: str
    name: str
    metric: str
    kind: RuleKind = RuleKind.RANGE
    low: float | None = None
    high: float | None = None
    sustained_s: int = 0
    hysteresis: float = 0.0
    max_gap_s: int = DEFAULT_MAX_GAP_S
    severity: Severity = Severity.WARNING
    participant_id: str | None = None
    escalate_after_s: int | None = None

    def __post_init__(self) -> None:
        for name, bound in (("low", self.low), ("high", self.high)):
            if bound is not None and not math.isfinite(bound):
                raise RuleError(f"rule {self.name!r}: {name} must be a finite number")
        if not math.isfinite(self.hysteresis) or self.hysteresis < 0:
            raise RuleError(f"rule {self.name!r}: hysteresis must be a number >= 0")
        if self.sustained_s < 0:
            raise RuleError(f"rule {self.name!r}: sustained_s must be >= 0")
        if self.max_gap_s <= 0:
            raise RuleError(f"rule {self.name!r}: max_gap_s must be > 0")
        if self.escalate_after_s is not None and self.escalate_after_s <= 0:
            raise RuleError(f"rule {self.name!r}: escalate_after_s must be > 0")
        if self.kind is RuleKind.RANGE:
            if self.low is None and self.high is None:
                raise RuleError(f"rule {self.name!r}: a range rule needs low, high or both")
            if (
                self.low is not None
                and self.high is not None
                and self.low + 2 * self.hysteresis > self.high
            ):
                raise RuleError(
                    f"rule {self.name!r}: low + 2 * hysteresis must not exceed high "
                    "(the rule could never clear)"
                )
        elif self.kind is RuleKind.ADHERENCE:
            if self.low is None or not 0 < self.low <= 100 or self.high is not None:
                raise RuleError(
                    f"rule {self.name!r}: an adherence rule needs low, a percentage in (0, 100],"
                    " and no high"
                )
            days, rest = divmod(self.sustained_s, DAY_S)
            if rest or not 1 <= days <= MAX_ADHERENCE_DAYS:
                raise RuleError(
                    f"rule {self.name!r}: an adherence rule's span is 1-{MAX_ADHERENCE_DAYS}"
                    " whole days"
                )
        elif self.sustained_s <= 0:
            raise RuleError(f"rule {self.name!r}: a missing_data rule needs sustained_s > 0")


def effective_rules(rules: Iterable[Rule], participant_id: str) -> list[Rule]:
    """The rules that apply to one participant: study rules, each replaced by the
    participant's own rule of the same name where there is one, plus the participant's own
    rules of other names. Ordered by rule id."""
    chosen: dict[str, Rule] = {}
    for rule in rules:
        if rule.participant_id is None:
            chosen.setdefault(rule.name, rule)
    for rule in rules:
        if rule.participant_id == participant_id:
            chosen[rule.name] = rule
    return sorted(chosen.values(), key=lambda r: r.rule_id)


@dataclass(frozen=True, slots=True)
class RuleState:
    """What one rule knows about one participant after the readings judged so far.

    ``evaluated_until``: the latest reading time judged. ``run_start``/``run_last``: the
    current breach run while idle. ``active_since``: while open, the start of the open
    episode's run (the alert's ``first_time``); None while idle.
    """

    evaluated_until: int | None = None
    run_start: int | None = None
    run_last: int | None = None
    active_since: int | None = None


@dataclass(frozen=True, slots=True)
class RuleEvent:
    """A change of a rule's condition for one participant, stamped with reading times.

    ``at_ms``: when the condition met the rule (opened) or ended (cleared). ``first_ms``:
    where the episode began (the run's first reading; for missing data, the last reading).
    """

    change: Change
    rule_id: int
    participant_id: str
    at_ms: int
    first_ms: int
    value: float | None = None


@dataclass(frozen=True, slots=True)
class Evaluation:
    state: RuleState
    events: tuple[RuleEvent, ...] = ()


# From this many readings a series' "does anything breach / clear" test runs in pyarrow
# compute, imported then. Below it a Python pass costs less than converting the values for
# pyarrow (measured: 12 against 23 us at 512, 115 against 80 us at 5,000, 1.1 against
# 0.6 ms at 50,000); a batch holds a handful of one participant's metric, so a gateway
# worker that sees only those never loads pyarrow's 50 MB.
VECTOR_MIN = 4096


@dataclass(frozen=True, slots=True)
class Series:
    """Readings of one participant and metric, sorted by reading time (stable for ties)."""

    times: tuple[int, ...]
    values: tuple[float, ...]

    @classmethod
    def of(cls, times: Sequence[int], values: Sequence[float]) -> Series:
        if len(times) != len(values):
            raise RuleError("a series needs as many times as values")
        # A hub sends its readings in time order: sort (stably) only when they are not.
        if len(times) > 1 and any(b < a for a, b in itertools.pairwise(times)):
            order = sorted(range(len(times)), key=times.__getitem__)
            return cls(tuple(times[i] for i in order), tuple(values[i] for i in order))
        return cls(tuple(times), tuple(values))

    def __len__(self) -> int:
        return len(self.times)

    @property
    def first_ms(self) -> int:
        return self.times[0]

    @property
    def last_ms(self) -> int:
        return self.times[-1]


def clear_band(rule: Rule) -> tuple[float | None, float | None]:
    """The band a value must be inside to clear the rule (None: unbounded on that side)."""
    low = None if rule.low is None else rule.low + rule.hysteresis
    high = None if rule.high is None else rule.high - rule.hysteresis
    return low, high


def _vector_any(
    values: Sequence[float], low: float | None, high: float | None, inside: bool
) -> bool:
    """``_any_outside`` / ``_any_inside`` of a long series, in pyarrow compute."""
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.compute as pc  # type: ignore[import-untyped]

    arr = pa.array(values, type=pa.float64())
    masks = []
    if low is not None:
        masks.append(pc.greater_equal(arr, low) if inside else pc.less(arr, low))
    if high is not None:
        masks.append(pc.less_equal(arr, high) if inside else pc.greater(arr, high))
    mask = functools.reduce(pc.and_ if inside else pc.or_, masks)
    return bool(pc.any(mask).as_py())


def _any_outside(values: Sequence[float], low: float | None, high: float | None) -> bool:
    """Whether any value is below ``low`` or above ``high`` (None: unbounded)."""
    if len(values) >= VECTOR_MIN:
        return _vector_any(values, low, high, inside=False)
    if low is not None and high is not None:
        return any(v < low or v > high for v in values)
    if low is not None:
        return any(v < low for v in values)
    assert high is not None
    return any(v > high for v in values)


def _any_inside(values: Sequence[float], low: float | None, high: float | None) -> bool:
    """Whether any value is within ``low``..``high`` inclusive (None: unbounded)."""
    if len(values) >= VECTOR_MIN:
        return _vector_any(values, low, high, inside=True)
    return any((low is None or v >= low) and (high is None or v <= high) for v in values)


def late_from(state: RuleState, series: Series) -> int | None:
    """The earliest reading time in ``series`` that is not newer than what was judged, or
    None when every reading is newer (then :func:`evaluate` applies)."""
    if not len(series) or state.evaluated_until is None:
        return None
    first = series.first_ms
    return first if first <= state.evaluated_until else None


def _fold(
    rule: Rule, state: RuleState, series: Series, participant_id: str
) -> tuple[RuleState, list[RuleEvent]]:
    gap_ms = rule.max_gap_s * 1000
    sustained_ms = rule.sustained_s * 1000
    run_start, run_last, active = state.run_start, state.run_last, state.active_since
    events: list[RuleEvent] = []
    low, high = rule.low, rule.high
    clear_low, clear_high = clear_band(rule)
    for t, v in zip(series.times, series.values, strict=True):
        if (low is not None and v < low) or (high is not None and v > high):
            if run_last is None or run_start is None or t - run_last > gap_ms:
                run_start = t
            run_last = t
            if active is None and t - run_start >= sustained_ms:
                active = run_start
                events.append(RuleEvent(Change.OPENED, rule.rule_id, participant_id, t, active, v))
        else:
            run_start = run_last = None
            if (
                active is not None
                and (clear_low is None or v >= clear_low)
                and (clear_high is None or v <= clear_high)
            ):
                events.append(RuleEvent(Change.CLEARED, rule.rule_id, participant_id, t, active, v))
                active = None
    if active is not None:
        run_start = run_last = None
    until = (
        series.last_ms
        if state.evaluated_until is None
        else max(state.evaluated_until, series.last_ms)
    )
    return RuleState(until, run_start, run_last, active), events


def evaluate(rule: Rule, state: RuleState, series: Series, participant_id: str) -> Evaluation:
    """Fold readings newer than ``state.evaluated_until`` into a range rule's state."""
    if rule.kind is not RuleKind.RANGE:
        raise RuleError(f"rule {rule.name!r} is not a range rule")
    if not len(series):
        return Evaluation(state)
    if late_from(state, series) is not None:
        raise RuleError(
            f"rule {rule.name!r}: readings at or before {state.evaluated_until} need replay()"
        )
    idle = state.active_since is None
    if idle and not _any_outside(series.values, rule.low, rule.high):
        # Nothing breaches: any pending run is broken and the rule stays idle.
        return Evaluation(RuleState(series.last_ms))
    if not idle and not _any_inside(series.values, *clear_band(rule)):
        # Open and nothing inside the clearing band: it stays open.
        return Evaluation(replace(state, evaluated_until=series.last_ms))
    new_state, events = _fold(rule, state, series, participant_id)
    return Evaluation(new_state, tuple(events))


@dataclass(frozen=True, slots=True)
class _Episode:
    start: int
    opened: RuleEvent | None
    cleared: RuleEvent | None

    def contains(self, t: int) -> bool:
        return self.start <= t and (self.cleared is None or t < self.cleared.at_ms)


def replay(
    rule: Rule,
    prior: RuleState,
    window: Series,
    known_starts: Iterable[int],
    participant_id: str,
    *,
    late_ms: int,
    start: RuleState | None = None,
) -> Evaluation:
    """Re-judge a range rule over ``window``: the stored readings from a reset point on,
    late ones included.

    ``known_starts``: the ``first_ms`` of episodes already alerted in the window.
    ``late_ms``: the earliest late reading (the time an episode it dissolved clears at).
    ``start``: the state at the window's first reading; idle (the default) when the window
    begins at a reset point, open since ``prior.active_since`` when the window is cut short
    inside the open episode.
    """
    if rule.kind is not RuleKind.RANGE:
        raise RuleError(f"rule {rule.name!r} is not a range rule")
    if not len(window):
        return Evaluation(prior)
    start = start or RuleState()
    state, raw = _fold(rule, start, window, participant_id)
    episodes: list[_Episode] = []
    if start.active_since is not None:
        episodes.append(_Episode(start.active_since, None, None))
    for ev in raw:
        if ev.change is Change.OPENED:
            episodes.append(_Episode(ev.first_ms, ev, None))
        else:
            episodes[-1] = replace(episodes[-1], cleared=ev)
    known = set(known_starts)
    current = prior.active_since
    events: list[RuleEvent] = []
    if current is not None and not any(e.contains(current) for e in episodes):
        events.append(RuleEvent(Change.CLEARED, rule.rule_id, participant_id, late_ms, current))
    for episode in episodes:
        if current is not None and episode.contains(current):
            if episode.cleared is not None:
                events.append(episode.cleared)
            continue
        if episode.opened is None or any(episode.contains(k) for k in known):
            continue
        events.append(episode.opened)
        if episode.cleared is not None:
            events.append(episode.cleared)
    if prior.evaluated_until is not None and state.evaluated_until is not None:
        state = replace(state, evaluated_until=max(prior.evaluated_until, state.evaluated_until))
    return Evaluation(state, tuple(events))


def evaluate_missing(
    rule: Rule, state: RuleState, times: Sequence[int], now_ms: int, participant_id: str
) -> Evaluation:
    """Readings arrived: the latest reading time moves on (late data included: by reading
    time, an old backfill alone does not end the silence), and an open missing-data alert
    clears once the latest reading is newer than ``sustained_s`` before now."""
    if rule.kind is not RuleKind.MISSING_DATA:
        raise RuleError(f"rule {rule.name!r} is not a missing_data rule")
    if not times:
        return Evaluation(state)
    newest = max(times)
    last = newest if state.evaluated_until is None else max(state.evaluated_until, newest)
    silence_ms = rule.sustained_s * 1000
    if state.active_since is not None and now_ms - last < silence_ms:
        ended = min(
            (t for t in times if t > state.active_since),
            default=last,
        )
        event = RuleEvent(Change.CLEARED, rule.rule_id, participant_id, ended, state.active_since)
        return Evaluation(RuleState(last), (event,))
    return Evaluation(replace(state, evaluated_until=last))


def sweep_missing(
    rule: Rule, state: RuleState, since_ms: int, now_ms: int, participant_id: str
) -> Evaluation:
    """Time passed: open when the latest reading (or ``since_ms``, when the rule has seen
    none: enrolment or the rule's creation) is ``sustained_s`` or more before now."""
    if rule.kind is not RuleKind.MISSING_DATA:
        raise RuleError(f"rule {rule.name!r} is not a missing_data rule")
    if state.active_since is not None:
        return Evaluation(state)
    last = state.evaluated_until if state.evaluated_until is not None else since_ms
    silence_ms = rule.sustained_s * 1000
    if now_ms - last < silence_ms:
        return Evaluation(state)
    event = RuleEvent(Change.OPENED, rule.rule_id, participant_id, last + silence_ms, last)
    return Evaluation(replace(state, active_since=last), (event,))


@dataclass(frozen=True, slots=True)
class AdherenceDay:
    """A participant's complete local day for a metric: its bounds in ms and the share of
    the schedule's expectation met (0-1), None when nothing was expected that day."""

    start_ms: int
    end_ms: int
    adherence: float | None


def judge_adherence(
    rule: Rule, state: RuleState, days: Sequence[AdherenceDay], participant_id: str
) -> Evaluation:
    """Opens when each of the last N days the metric was expected (N = the rule's days)
    fell below ``low`` percent; clears as soon as that no longer holds (a day met, or a
    backfill that lifted one). ``days``: complete local days, oldest first. The event's
    value is the newest of those days' adherence, in percent."""
    if rule.kind is not RuleKind.ADHERENCE:
        raise RuleError(f"rule {rule.name!r} is not an adherence rule")
    assert rule.low is not None
    need = rule.sustained_s // DAY_S
    expected = [d for d in days if d.adherence is not None]
    last = expected[-need:]
    holds = len(last) == need and all(
        d.adherence is not None and d.adherence * 100 < rule.low for d in last
    )
    newest = expected[-1] if expected else None
    value = None if newest is None or newest.adherence is None else newest.adherence * 100
    if state.active_since is None and holds:
        event = RuleEvent(
            Change.OPENED, rule.rule_id, participant_id, last[-1].end_ms, last[0].start_ms, value
        )
        return Evaluation(RuleState(active_since=last[0].start_ms), (event,))
    if state.active_since is not None and not holds:
        ended = newest.end_ms if newest is not None else state.active_since
        event = RuleEvent(
            Change.CLEARED, rule.rule_id, participant_id, ended, state.active_since, value
        )
        return Evaluation(RuleState(), (event,))
    return Evaluation(state)
