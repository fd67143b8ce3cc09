"""``pipeline.admit`` decides whole envelopes at once when it can; whatever the readings and
the consent history, its answer is the one of judging every reading on its own."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from consent.gate import CONSENT, WITHDRAW, WITHDRAW_SCOPE, ConsentEvent, ConsentSnapshot
from consent.gate import ReconsentRequirement as Requirement
from ingest import keys, pipeline
from ingest.envelope import Opened
from ingest.model import AcceptedEnvelope, Gap, Payload, Reading, RejectedEnvelope
from storage.timeconv import from_ms

PARTICIPANT = "P1"
SCOPES = ("heart_rate", "spo2", "temperature")
# (metric, canonical unit): three scopes, two metrics sharing one.
METRICS = (
    ("heart_rate", "/min"),
    ("pulse_rate", "/min"),
    ("spo2", "%"),
    ("body_temperature", "Cel"),
)
# Times on a coarse grid, so readings land before enrollment, inside consent changes and
# past the future skew (now + 5 min) often enough.
STEP_MS = 10_000
ENROLLED_MS = 5 * STEP_MS
NOW_MS = 20 * STEP_MS
KEY = keys.generate_private_key().public_key()
times = st.integers(min_value=0, max_value=60).map(lambda k: k * STEP_MS)


@st.composite
def histories(draw: st.DrawFn) -> list[ConsentEvent]:
    n = draw(st.integers(min_value=0, max_value=6))
    ids = draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n, unique=True))
    return [
        ConsentEvent(
            consent_id=cid,
            participant_id=PARTICIPANT,
            action=draw(st.sampled_from((CONSENT, CONSENT, CONSENT, WITHDRAW, WITHDRAW_SCOPE))),
            scopes=draw(
                st.one_of(
                    st.just(frozenset(SCOPES)), st.frozensets(st.sampled_from(SCOPES), max_size=3)
                )
            ),
            effective_ms=draw(times),
            document="d1",
            version_rank=draw(st.integers(1, 2)),
            purge=draw(st.booleans()),
        )
        for cid in ids
    ]


@st.composite
def readings(draw: st.DrawFn) -> tuple[Reading, ...]:
    """Mostly plausible readings of one or two metrics (the whole-envelope case), now and
    then one that is not."""
    kinds = draw(st.lists(st.sampled_from(METRICS), min_size=1, max_size=2))
    start = draw(times)
    out = []
    for _ in range(draw(st.integers(min_value=0, max_value=8))):
        metric, unit = draw(st.sampled_from(kinds))
        flaw = draw(st.integers(0, 39))
        value = draw(st.floats(min_value=30, max_value=45))
        if flaw == 0:
            unit = draw(st.sampled_from(("bpm", "%", "/min", "Cel")))
        elif flaw == 1:
            metric = "mood"
        elif flaw == 2:
            value = draw(st.floats(allow_nan=True, allow_infinity=True))
        t = start + draw(st.integers(min_value=0, max_value=3)) * STEP_MS
        out.append(Reading(t, metric, value, unit, "s1"))
    return tuple(out)


requirements = st.lists(
    st.builds(Requirement, document=st.just("d1"), rank=st.integers(1, 2), deadline_ms=times),
    max_size=2,
)


@settings(max_examples=1000, deadline=None)
@given(histories(), requirements, readings())
def test_admit_agrees_with_judging_each_reading(
    events: list[ConsentEvent], reqs: list[Requirement], rs: tuple[Reading, ...]
) -> None:
    snapshot = ConsentSnapshot.from_events(events, reqs)
    payload = Payload("hub-1", 1, NOW_MS, rs)
    decoded = pipeline.Decoded(
        pipeline.Inbound(pipeline.up_topic("hub-1"), b"", NOW_MS),
        Opened("hub-1", payload, b"", b"", b""),
        b"digest",
    )
    device = pipeline.DeviceRecord("hub-1", PARTICIPANT, KEY, ENROLLED_MS, False)
    assert pipeline.admit(decoded, device, snapshot, NOW_MS) == pipeline._admit_each(
        decoded, device, snapshot, device.window(NOW_MS), (), ()
    )


def test_a_consent_ending_inside_the_envelope_splits_it() -> None:
    """Allowed at the envelope's first and last reading by different consents: judged one by
    one, so the readings between (no consent) are refused."""
    snapshot = ConsentSnapshot.from_events(
        [
            ConsentEvent(1, PARTICIPANT, CONSENT, frozenset({"heart_rate"}), 0, "d1", 1),
            ConsentEvent(2, PARTICIPANT, WITHDRAW, frozenset(), 20, "d1", 1),
            ConsentEvent(3, PARTICIPANT, CONSENT, frozenset({"heart_rate"}), 40, "d1", 1),
        ]
    )
    rs = tuple(Reading(t, "heart_rate", 70.0, "/min", "s1") for t in (10, 30, 50))
    device = pipeline.DeviceRecord("hub-1", PARTICIPANT, KEY, 0, False)
    decoded = pipeline.Decoded(
        pipeline.Inbound(pipeline.up_topic("hub-1"), b"", NOW_MS),
        Opened("hub-1", Payload("hub-1", 1, NOW_MS, rs), b"", b"", b""),
        b"digest",
    )
    accepted = pipeline.admit(decoded, device, snapshot, NOW_MS)
    assert isinstance(accepted, AcceptedEnvelope)
    assert [r.t_ms for r in accepted.readings] == [10, 50]
    assert accepted.consent_ids == (1, 3)
    assert [(f.reason.value, f.count) for f in accepted.refusals] == [("no_consent", 1)]


# --- every time an envelope carries, judged against the device's window ----------------------

DAY_MS = 86_400_000
WALL_NOW_MS = 1_780_000_000_000  # 2026
ALL_CONSENTED = ConsentSnapshot.from_events(
    [ConsentEvent(1, PARTICIPANT, CONSENT, frozenset(SCOPES), 0, "d1", 1)]
)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def decoded_of(payload: Payload) -> pipeline.Decoded:
    return pipeline.Decoded(
        pipeline.Inbound(pipeline.up_topic("hub-1"), b"", WALL_NOW_MS),
        Opened("hub-1", payload, b"", b"", b""),
        b"digest",
    )


def study_device(backfill_days: int = 30) -> pipeline.DeviceRecord:
    return pipeline.DeviceRecord(
        "hub-1", PARTICIPANT, KEY, WALL_NOW_MS - 400 * DAY_MS, False, backfill_days * DAY_MS
    )


def hr(t: int) -> Reading:
    return Reading(t, "heart_rate", 70.0, "/min", "s1")


def test_a_sent_time_outside_the_window_refuses_the_envelope() -> None:
    device = study_device()
    for sent, detail in (
        (WALL_NOW_MS + pipeline.FUTURE_SKEW_MS + 1, "sent time is in the future"),
        (2**62, "sent time is in the future"),
        (WALL_NOW_MS - 31 * DAY_MS, "sent time is older than the study's backfill horizon"),
        (-(2**63), "sent time is before the participant's enrollment"),
    ):
        payload = Payload("hub-1", 1, sent, (hr(WALL_NOW_MS - 1000),))
        out = pipeline.admit(decoded_of(payload), device, ALL_CONSENTED, WALL_NOW_MS)
        assert isinstance(out, RejectedEnvelope)
        assert (out.reason.value, out.detail, out.seq, out.reading_count) == (
            "implausible_time",
            detail,
            1,
            1,
        )


def test_readings_older_than_the_backfill_horizon_are_refused() -> None:
    old, fresh = WALL_NOW_MS - 31 * DAY_MS, WALL_NOW_MS - 29 * DAY_MS
    payload = Payload("hub-1", 1, WALL_NOW_MS, (hr(old), hr(fresh)))
    out = pipeline.admit(decoded_of(payload), study_device(30), ALL_CONSENTED, WALL_NOW_MS)
    assert isinstance(out, AcceptedEnvelope)
    assert [r.t_ms for r in out.readings] == [fresh]
    assert [(f.reason.value, f.count, f.first_ms, f.detail) for f in out.refusals] == [
        ("implausible_time", 1, old, "reading time is older than the study's backfill horizon")
    ]
    # A study that allows 60 days keeps both.
    out = pipeline.admit(decoded_of(payload), study_device(60), ALL_CONSENTED, WALL_NOW_MS)
    assert isinstance(out, AcceptedEnvelope)
    assert len(out.readings) == 2


def test_gaps_outside_the_window_are_refused_one_by_one() -> None:
    t = WALL_NOW_MS - 60_000
    gaps = (
        Gap(t - 5000, t, "out_of_range"),
        Gap(t, 2**62, "out_of_range"),
        Gap(t, t - 1, "clock_jump"),
    )
    payload = Payload("hub-1", 1, WALL_NOW_MS, (hr(t),), gaps)
    out = pipeline.admit(decoded_of(payload), study_device(), ALL_CONSENTED, WALL_NOW_MS)
    assert isinstance(out, AcceptedEnvelope)
    assert out.gaps == gaps[:1]
    assert len(out.readings) == 1
    assert [(f.reason.value, f.count, f.first_ms, f.last_ms, f.detail) for f in out.refusals] == [
        ("implausible_time", 0, t, 2**62, "gap time is in the future"),
        ("implausible_time", 0, t, t - 1, "gap ends before it starts"),
    ]


@settings(max_examples=500, deadline=None)
@given(
    sent=st.one_of(int64, st.just(WALL_NOW_MS)),
    reading_times=st.lists(st.one_of(int64, st.integers(WALL_NOW_MS - DAY_MS, WALL_NOW_MS))),
    gap_ends=st.lists(st.tuples(int64, int64), max_size=4),
)
def test_whatever_the_times_what_is_kept_converts(
    sent: int, reading_times: list[int], gap_ends: list[tuple[int, int]]
) -> None:
    """Any int64 in any time field: refused with a reason, or kept only inside the window,
    where every time converts to a timestamp PostgreSQL stores."""
    payload = Payload(
        "hub-1",
        1,
        sent,
        tuple(hr(t) for t in reading_times),
        tuple(Gap(a, b, "out_of_range") for a, b in gap_ends),
    )
    device = study_device()
    out = pipeline.admit(decoded_of(payload), device, ALL_CONSENTED, WALL_NOW_MS)
    if isinstance(out, RejectedEnvelope):
        assert out.reason.value == "implausible_time"
        return
    earliest, latest = device.window(WALL_NOW_MS)
    kept = [out.sent_ms, *(r.t_ms for r in out.readings)]
    kept += [t for g in out.gaps for t in (g.from_ms, g.to_ms)]
    assert all(earliest <= t <= latest for t in kept)
    for t in kept:
        from_ms(t)
    refused = sum(f.count for f in out.refusals)
    assert len(out.readings) + refused == len(reading_times)
    assert len(out.gaps) + sum(f.count == 0 for f in out.refusals) == len(gap_ends)
