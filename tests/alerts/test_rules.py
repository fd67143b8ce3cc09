"""The pure rule evaluator: hand-built reading sequences, each with the exact events expected."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ingest.rules import (
    VECTOR_MIN,
    Change,
    Evaluation,
    Rule,
    RuleError,
    RuleEvent,
    RuleKind,
    RuleState,
    Series,
    Severity,
    _fold,
    clear_band,
    effective_rules,
    evaluate,
    evaluate_missing,
    late_from,
    replay,
    sweep_missing,
)

S = 1000  # ms per second
P = "P1"


def series(*pairs: tuple[float, float]) -> Series:
    """Readings as (seconds, value)."""
    return Series.of([int(t * S) for t, _ in pairs], [v for _, v in pairs])


def every(start_s: int, stop_s: int, step_s: int, value: float) -> list[tuple[float, float]]:
    return [(t, value) for t in range(start_s, stop_s + 1, step_s)]


def opened(rule: Rule, at_s: float, first_s: float, value: float | None) -> RuleEvent:
    return RuleEvent(Change.OPENED, rule.rule_id, P, int(at_s * S), int(first_s * S), value)


def cleared(rule: Rule, at_s: float, first_s: float, value: float | None) -> RuleEvent:
    return RuleEvent(Change.CLEARED, rule.rule_id, P, int(at_s * S), int(first_s * S), value)


def hr_high(**kw: object) -> Rule:
    fields: dict[str, object] = {"high": 120.0}
    fields.update(kw)
    return Rule(1, "S1", "hr-high", "heart_rate", **fields)  # type: ignore[arg-type]


def run(rule: Rule, *batches: Series, state: RuleState | None = None) -> Evaluation:
    """Evaluate batches in order, collecting every event."""
    current = state or RuleState()
    events: list[RuleEvent] = []
    for batch in batches:
        result = evaluate(rule, current, batch, P)
        current = result.state
        events.extend(result.events)
    return Evaluation(current, tuple(events))


# --- thresholds ---------------------------------------------------------------------------


def test_high_threshold_opens_on_first_breach_and_clears_inside() -> None:
    rule = hr_high()
    result = run(rule, series((0, 100), (1, 120), (2, 121), (3, 130), (4, 119)))
    assert result.events == (opened(rule, 2, 2, 121.0), cleared(rule, 4, 2, 119.0))
    assert result.state == RuleState(evaluated_until=4 * S)


def test_value_on_the_bound_does_not_breach() -> None:
    rule = Rule(1, "S1", "hr-band", "heart_rate", low=40.0, high=120.0)
    assert run(rule, series((0, 40), (1, 120), (2, 80))).events == ()


def test_low_threshold() -> None:
    rule = Rule(2, "S1", "spo2-low", "spo2", low=90.0, severity=Severity.CRITICAL)
    result = run(rule, series((0, 95), (10, 89), (20, 88), (30, 91)))
    assert result.events == (opened(rule, 10, 10, 89.0), cleared(rule, 30, 10, 91.0))


def test_open_alert_stays_open_across_batches_without_new_events() -> None:
    rule = hr_high()
    result = run(rule, series((0, 130)), series((1, 131), (2, 140)), series((3, 125)))
    assert result.events == (opened(rule, 0, 0, 130.0),)
    assert result.state == RuleState(evaluated_until=3 * S, active_since=0)


def test_open_alert_clears_in_a_later_batch() -> None:
    rule = hr_high(hysteresis=5.0)
    result = run(rule, series((0, 130)), series((1, 118), (2, 110), (3, 125)))
    assert result.events == (
        opened(rule, 0, 0, 130.0),
        cleared(rule, 2, 0, 110.0),
        opened(rule, 3, 3, 125.0),
    )


def test_idle_batch_in_range_changes_nothing_but_the_time() -> None:
    rule = hr_high()
    result = run(rule, series(*every(0, 100, 1, 72.0)))
    assert result == Evaluation(RuleState(evaluated_until=100 * S))


def test_unsorted_batch_is_judged_by_reading_time() -> None:
    rule = hr_high()
    result = run(rule, series((3, 100), (1, 130), (2, 131)))
    assert result.events == (opened(rule, 1, 1, 130.0), cleared(rule, 3, 1, 100.0))


# --- sustained duration and continuity ------------------------------------------------------


def test_sustained_opens_when_the_run_spans_the_duration() -> None:
    rule = hr_high(sustained_s=60, max_gap_s=10)
    not_yet = run(rule, series(*every(0, 55, 5, 125.0)))
    assert not_yet.events == ()
    assert not_yet.state == RuleState(55 * S, run_start=0, run_last=55 * S)
    result = run(rule, series(*every(60, 70, 5, 125.0)), state=not_yet.state)
    assert result.events == (opened(rule, 60, 0, 125.0),)


def test_sustained_run_carries_across_batches() -> None:
    rule = hr_high(sustained_s=60, max_gap_s=10)
    one_batch = run(rule, series(*every(0, 60, 5, 125.0)))
    two_batches = run(rule, series(*every(0, 30, 5, 125.0)), series(*every(35, 60, 5, 125.0)))
    assert one_batch.events == two_batches.events == (opened(rule, 60, 0, 125.0),)
    assert one_batch.state == two_batches.state


def test_a_gap_longer_than_max_gap_breaks_the_run() -> None:
    rule = hr_high(sustained_s=60, max_gap_s=10)
    readings = every(0, 30, 5, 125.0) + every(45, 110, 5, 125.0)  # 30 -> 45: 15 s apart
    assert run(rule, series(*readings)).events == (opened(rule, 105, 45, 125.0),)


def test_a_gap_of_exactly_max_gap_keeps_the_run() -> None:
    rule = hr_high(sustained_s=60, max_gap_s=10)
    readings = [(0, 125.0), (10, 125.0), (20, 125.0), (30, 125.0), (40, 125.0), (50, 125.0)]
    assert run(rule, series(*readings, (60, 125.0))).events == (opened(rule, 60, 0, 125.0),)


def test_an_in_range_reading_breaks_the_run() -> None:
    rule = hr_high(sustained_s=60, max_gap_s=10)
    readings = [*every(0, 25, 5, 125.0), (30, 100.0), *every(35, 95, 5, 125.0)]
    assert run(rule, series(*readings)).events == (opened(rule, 95, 35, 125.0),)


def test_silence_does_not_clear_an_open_alert() -> None:
    rule = hr_high(max_gap_s=10)
    result = run(rule, series((0, 130)), series((3600, 125)))
    assert result.events == (opened(rule, 0, 0, 130.0),)
    assert result.state.active_since == 0


# --- hysteresis -----------------------------------------------------------------------------


def test_hysteresis_clears_only_inside_the_narrowed_band() -> None:
    rule = hr_high(hysteresis=5.0)
    result = run(
        rule,
        series((0, 125), (1, 118), (2, 121), (3, 116), (4, 115), (5, 121), (6, 110)),
    )
    assert result.events == (
        opened(rule, 0, 0, 125.0),
        cleared(rule, 4, 0, 115.0),
        opened(rule, 5, 5, 121.0),
        cleared(rule, 6, 5, 110.0),
    )


def test_hysteresis_on_both_bounds() -> None:
    rule = Rule(3, "S1", "hr-band", "heart_rate", low=50.0, high=120.0, hysteresis=5.0)
    assert clear_band(rule) == (55.0, 115.0)
    result = run(rule, series((0, 48), (1, 53), (2, 54.9), (3, 55), (4, 117), (5, 121), (6, 54)))
    assert result.events == (
        opened(rule, 0, 0, 48.0),
        cleared(rule, 3, 0, 55.0),
        opened(rule, 5, 5, 121.0),
    )


def test_a_reading_in_the_hysteresis_band_breaks_a_pending_run() -> None:
    rule = hr_high(hysteresis=5.0, sustained_s=10, max_gap_s=10)
    result = run(rule, series((0, 125), (5, 118), (10, 125), (15, 125), (20, 125)))
    assert result.events == (opened(rule, 20, 10, 125.0),)


# --- missing data ---------------------------------------------------------------------------


def missing_rule() -> Rule:
    return Rule(9, "S1", "no-hr", "heart_rate", kind=RuleKind.MISSING_DATA, sustained_s=300)


def test_missing_data_opens_after_the_silence() -> None:
    rule = missing_rule()
    assert sweep_missing(rule, RuleState(), 0, 299_999, P) == Evaluation(RuleState())
    result = sweep_missing(rule, RuleState(), 0, 300 * S, P)
    assert result.events == (opened(rule, 300, 0, None),)
    assert result.state == RuleState(active_since=0)
    # Open: a later sweep does not open it again.
    assert sweep_missing(rule, result.state, 0, 900 * S, P).events == ()


def test_missing_data_counts_from_the_latest_reading() -> None:
    rule = missing_rule()
    state = evaluate_missing(rule, RuleState(), [50 * S, 100 * S], 100 * S, P).state
    assert state == RuleState(evaluated_until=100 * S)
    assert sweep_missing(rule, state, 0, 399 * S, P).events == ()
    assert sweep_missing(rule, state, 0, 400 * S, P).events == (opened(rule, 400, 100, None),)


def test_missing_data_clears_on_recent_data_only() -> None:
    rule = missing_rule()
    state = sweep_missing(rule, RuleState(), 0, 1000 * S, P).state
    # A backfill of old readings does not end the silence as of now.
    old = evaluate_missing(rule, state, [200 * S, 250 * S], 1000 * S, P)
    assert old.events == ()
    assert old.state == RuleState(evaluated_until=250 * S, active_since=0)
    recent = evaluate_missing(rule, old.state, [990 * S, 800 * S], 1000 * S, P)
    assert recent.events == (cleared(rule, 800, 0, None),)
    assert recent.state == RuleState(evaluated_until=990 * S)


def test_missing_data_uses_the_latest_reading_whatever_the_arrival_order() -> None:
    rule = missing_rule()
    newer_first = evaluate_missing(rule, RuleState(), [500 * S], 500 * S, P).state
    then_older = evaluate_missing(rule, newer_first, [100 * S], 500 * S, P).state
    assert then_older == RuleState(evaluated_until=500 * S)


# --- late data ------------------------------------------------------------------------------


def test_late_from_finds_readings_not_newer_than_judged() -> None:
    state = RuleState(evaluated_until=60 * S)
    assert late_from(RuleState(), series((0, 1))) is None
    assert late_from(state, series((61, 1), (70, 1))) is None
    assert late_from(state, series((60, 1), (70, 1))) == 60 * S
    assert late_from(state, series((70, 1), (10, 1))) == 10 * S


def test_evaluate_refuses_late_readings() -> None:
    rule = hr_high()
    with pytest.raises(RuleError, match="replay"):
        evaluate(rule, RuleState(evaluated_until=60 * S), series((30, 130)), P)


def test_late_reading_that_fills_a_gap_opens_the_sustained_alert() -> None:
    rule = hr_high(sustained_s=60, max_gap_s=10)
    readings = every(0, 30, 5, 125.0) + every(45, 60, 5, 125.0)
    before = run(rule, series(*readings))
    assert before.events == ()
    window = series(*readings, (38, 125.0))
    result = replay(rule, before.state, window, [], P, late_ms=38 * S)
    assert result.events == (opened(rule, 60, 0, 125.0),)
    assert result.state == RuleState(evaluated_until=60 * S, active_since=0)


def test_late_in_range_reading_does_not_end_a_condition_that_still_holds() -> None:
    rule = hr_high(sustained_s=30, max_gap_s=10)
    readings = every(0, 100, 5, 125.0)
    before = run(rule, series(*readings))
    assert before.events == (opened(rule, 30, 0, 125.0),)
    # By reading time the value was in range at 52 s: that episode ended there, and the
    # breach that went on from 55 s is a new episode that met the rule at 85 s.
    window = series(*readings, (52, 100.0))
    result = replay(rule, before.state, window, [0], P, late_ms=52 * S)
    assert result.events == (cleared(rule, 52, 0, 100.0), opened(rule, 85, 55, 125.0))
    assert result.state == RuleState(evaluated_until=100 * S, active_since=55 * S)


def test_late_breach_inside_an_open_episode_adds_nothing() -> None:
    rule = hr_high(sustained_s=30, max_gap_s=10)
    readings = every(0, 100, 5, 125.0)
    before = run(rule, series(*readings))
    result = replay(rule, before.state, series(*readings, (52, 140.0)), [0], P, late_ms=52 * S)
    assert result.events == ()
    assert result.state == before.state


def test_late_reading_before_the_open_episode_extends_it() -> None:
    rule = hr_high(sustained_s=30, max_gap_s=10)
    readings = [(0, 100.0), *every(10, 60, 5, 125.0)]
    before = run(rule, series(*readings))
    assert before.events == (opened(rule, 40, 10, 125.0),)
    window = series(*readings, (5, 125.0))
    result = replay(rule, before.state, window, [10 * S], P, late_ms=5 * S)
    assert result.events == ()
    assert result.state.active_since == 5 * S


def test_backfilled_past_episode_opens_and_clears() -> None:
    rule = hr_high(sustained_s=60, max_gap_s=10)
    live = [*every(0, 10, 5, 80.0), *every(500, 510, 5, 80.0)]
    before = run(rule, series(*live))
    backfill = [*every(100, 200, 5, 125.0), (205, 90.0)]
    window = series(*[r for r in live if r[0] >= 10], *backfill)  # from the reset point at 10 s
    result = replay(rule, before.state, window, [], P, late_ms=100 * S)
    assert result.events == (opened(rule, 160, 100, 125.0), cleared(rule, 205, 100, 90.0))
    assert result.state == RuleState(evaluated_until=510 * S)
    # The same past episode, judged again with one more late reading: already alerted.
    again = replay(
        rule,
        result.state,
        series(*[r for r in live if r[0] >= 10], *backfill, (150, 126.0)),
        [100 * S],
        P,
        late_ms=150 * S,
    )
    assert again.events == ()


def test_late_data_that_dissolves_the_open_episode_clears_it_at_the_late_reading() -> None:
    rule = hr_high(sustained_s=20, max_gap_s=10)
    readings = [(0, 80.0), *every(10, 30, 5, 125.0)]
    before = run(rule, series(*readings))
    assert before.events == (opened(rule, 30, 10, 125.0),)
    window = series(*readings, (22, 119.0))  # in range: runs 10..20 and 25..30, both short
    result = replay(rule, before.state, window, [10 * S], P, late_ms=22 * S)
    assert result.events == (cleared(rule, 22, 10, None),)
    assert result.state == RuleState(30 * S, run_start=25 * S, run_last=30 * S)


def test_replay_from_a_window_cut_inside_the_open_episode() -> None:
    rule = hr_high(sustained_s=0, max_gap_s=10)
    before = RuleState(evaluated_until=5000 * S, active_since=10 * S)
    window = series(*every(4000, 5000, 10, 130.0), (4500, 100.0))
    result = replay(
        rule, before, window, [10 * S], P, late_ms=4500 * S, start=RuleState(active_since=10 * S)
    )
    assert result.events == (cleared(rule, 4500, 10, 100.0), opened(rule, 4510, 4510, 130.0))


def test_replay_of_an_empty_window_keeps_the_state() -> None:
    rule = hr_high()
    state = RuleState(evaluated_until=5 * S, active_since=0)
    assert replay(rule, state, series(), [], P, late_ms=0) == Evaluation(state)


# --- per-participant overrides ----------------------------------------------------------------


def test_participant_override_replaces_the_study_rule_of_that_name() -> None:
    study_hr = Rule(1, "S1", "hr-high", "heart_rate", high=120.0)
    study_spo2 = Rule(2, "S1", "spo2-low", "spo2", low=90.0)
    p1_hr = Rule(3, "S1", "hr-high", "heart_rate", high=140.0, participant_id="P1")
    p1_own = Rule(4, "S1", "temp-high", "body_temperature", high=38.0, participant_id="P1")
    p2_hr = Rule(5, "S1", "hr-high", "heart_rate", high=100.0, participant_id="P2")
    every_rule = [p2_hr, p1_own, study_spo2, p1_hr, study_hr]
    assert effective_rules(every_rule, "P1") == [study_spo2, p1_hr, p1_own]
    assert effective_rules(every_rule, "P2") == [study_spo2, p2_hr]
    assert effective_rules(every_rule, "P3") == [study_hr, study_spo2]
    readings = series((0, 130.0))
    (p1_rule,) = [r for r in effective_rules(every_rule, "P1") if r.metric == "heart_rate"]
    (p3_rule,) = [r for r in effective_rules(every_rule, "P3") if r.metric == "heart_rate"]
    assert evaluate(p1_rule, RuleState(), readings, "P1").events == ()
    assert evaluate(p3_rule, RuleState(), readings, "P3").events == (
        RuleEvent(Change.OPENED, 1, "P3", 0, 0, 130.0),
    )


# --- bad definitions and misuse -------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "needs low, high or both"),
        ({"high": math.inf}, "finite"),
        ({"low": math.nan}, "finite"),
        ({"high": 120.0, "hysteresis": -1.0}, "hysteresis"),
        ({"high": 120.0, "hysteresis": math.nan}, "hysteresis"),
        ({"low": 100.0, "high": 110.0, "hysteresis": 6.0}, "never clear"),
        ({"high": 120.0, "sustained_s": -1}, "sustained_s"),
        ({"high": 120.0, "max_gap_s": 0}, "max_gap_s"),
        ({"high": 120.0, "escalate_after_s": 0}, "escalate_after_s"),
        ({"kind": RuleKind.MISSING_DATA}, "missing_data rule needs sustained_s"),
    ],
)
def test_inconsistent_rules_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(RuleError, match=message):
        Rule(1, "S1", "r", "heart_rate", **fields)  # type: ignore[arg-type]


def test_series_needs_matching_columns() -> None:
    with pytest.raises(RuleError):
        Series.of([1, 2], [1.0])


def test_functions_refuse_the_other_kind_of_rule() -> None:
    rng, miss = hr_high(), missing_rule()
    with pytest.raises(RuleError):
        evaluate(miss, RuleState(), series((0, 1)), P)
    with pytest.raises(RuleError):
        replay(miss, RuleState(), series((0, 1)), [], P, late_ms=0)
    with pytest.raises(RuleError):
        evaluate_missing(rng, RuleState(), [0], 0, P)
    with pytest.raises(RuleError):
        sweep_missing(rng, RuleState(), 0, 0, P)


# --- properties -----------------------------------------------------------------------------

readings_strategy = st.lists(
    st.tuples(st.integers(0, 600), st.sampled_from([60.0, 112.0, 118.0, 125.0, 150.0])),
    min_size=1,
    max_size=60,
    unique_by=lambda r: r[0],
)


@settings(max_examples=150, deadline=None)
@given(readings=readings_strategy, cut=st.integers(0, 60), sustained=st.sampled_from([0, 10, 30]))
@example(readings=[(0, 150.0), (1, 60.0)], cut=1, sustained=0)
@example(readings=[(0, 150.0), (10, 150.0), (20, 112.0)], cut=1, sustained=10)
def test_batch_boundaries_do_not_change_the_result(
    readings: list[tuple[int, float]], cut: int, sustained: int
) -> None:
    rule = hr_high(hysteresis=5.0, sustained_s=sustained, max_gap_s=15)
    ordered = sorted(readings)
    whole = run(rule, series(*ordered))
    parts = [p for p in (ordered[:cut], ordered[cut:]) if p]
    split = run(rule, *(series(*p) for p in parts))
    assert split == whole


@settings(max_examples=150, deadline=None)
@given(readings=readings_strategy, sustained=st.sampled_from([0, 10, 30]))
def test_replay_of_the_whole_history_matches_judging_it_in_order(
    readings: list[tuple[int, float]], sustained: int
) -> None:
    rule = hr_high(hysteresis=5.0, sustained_s=sustained, max_gap_s=15)
    whole = run(rule, series(*sorted(readings)))
    fresh = replay(rule, RuleState(), series(*readings), [], P, late_ms=0)
    assert fresh == whole


@given(
    st.lists(
        st.tuples(st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False)),
        max_size=30,
    )
)
@example([(1, 1.0), (1, 2.0), (0, 3.0)])  # a tie after an out-of-order reading
@example([(0, 1.0), (0, 2.0), (1, 3.0)])  # in order with a tie: kept as given
def test_a_series_is_its_readings_stably_sorted_by_time(pairs: list[tuple[int, float]]) -> None:
    s = Series.of([t for t, _ in pairs], [v for _, v in pairs])
    expected = sorted(pairs, key=lambda p: p[0])  # sorted() is stable
    assert list(zip(s.times, s.values, strict=True)) == expected


@settings(max_examples=60, deadline=None)  # the first long series imports pyarrow
@given(
    values=st.lists(st.floats(60.0, 160.0), min_size=1, max_size=12),
    copies=st.sampled_from([1, VECTOR_MIN]),
    bounds=st.sampled_from([(None, 120.0), (50.0, None), (80.0, 120.0)]),
    open_since=st.sampled_from([None, 0]),
)
def test_the_shortcuts_agree_with_folding_every_reading_short_or_vectorised(
    values: list[float],
    copies: int,
    bounds: tuple[float | None, float | None],
    open_since: int | None,
) -> None:
    """An idle rule with nothing breaching, or an open one with nothing in the clearing
    band, is decided without the fold: in Python for a short series, in pyarrow from
    VECTOR_MIN readings on. Either way the result is the fold's."""
    rule = hr_high(low=bounds[0], high=bounds[1], hysteresis=5.0, sustained_s=2)
    tiled = values * copies
    assert (len(tiled) >= VECTOR_MIN) == (copies > 1)
    s = Series.of([(i + 1) * S for i in range(len(tiled))], tiled)
    state = RuleState(0, None, None, open_since)
    folded, events = _fold(rule, state, s, P)
    assert evaluate(rule, state, s, P) == Evaluation(folded, tuple(events))
