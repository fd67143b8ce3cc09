"""``pipeline.admit`` decides whole envelopes at once when it can; whatever the readings and
the consent history, its answer is the one of judging every reading on its own."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from consent.gate import CONSENT, WITHDRAW, WITHDRAW_SCOPE, ConsentEvent, ConsentSnapshot
from consent.gate import ReconsentRequirement as Requirement
from ingest import keys, pipeline
from ingest.envelope import Opened
from ingest.model import Payload, Reading

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
        decoded, device, snapshot, NOW_MS
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
    assert [r.t_ms for r in accepted.readings] == [10, 50]
    assert accepted.consent_ids == (1, 3)
    assert [(f.reason.value, f.count) for f in accepted.refusals] == [("no_consent", 1)]
