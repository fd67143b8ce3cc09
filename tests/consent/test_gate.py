"""The consent gate against a simple reference model, over random consent histories, plus the
documented cases one by one."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consent.errors import UnknownConsentAction
from consent.gate import (
    CONSENT,
    WITHDRAW,
    WITHDRAW_SCOPE,
    ConsentEvent,
    ConsentSnapshot,
    Decision,
    ReconsentRequirement,
)
from ingest.model import Reason

SCOPES = ("a", "b", "c")
DOCS = ("d1", "d2")
PARTICIPANTS = ("P1", "P2")


@dataclass(frozen=True)
class Query:
    participant: str
    scope: str
    t_ms: int


def reference(
    events: list[ConsentEvent],
    reqs: list[ReconsentRequirement],
    q: Query,
) -> Decision:
    """The rules of docs/consent.md, written the slow and obvious way."""
    mine = sorted(
        (e for e in events if e.participant_id == q.participant),
        key=lambda e: (e.effective_ms, e.consent_id),
    )
    scopes: set[str] = set()
    consent_id: int | None = None
    doc, rank = "", 0
    for e in mine:
        if e.effective_ms > q.t_ms:
            break
        if e.action == CONSENT:
            scopes, consent_id, doc, rank = set(e.scopes), e.consent_id, e.document, e.version_rank
        elif e.action == WITHDRAW:
            scopes, consent_id = set(), None
        else:
            scopes -= e.scopes
    for e in mine:
        if e.purge and e.action != CONSENT and e.effective_ms > q.t_ms:
            if e.action == WITHDRAW:
                scopes, consent_id = set(), None
            else:
                scopes -= e.scopes
    if consent_id is None or not scopes:
        return Decision(False, Reason.NO_CONSENT)
    if any(r.document == doc and r.deadline_ms <= q.t_ms and r.rank > rank for r in reqs):
        return Decision(False, Reason.RECONSENT_REQUIRED)
    if q.scope not in scopes:
        return Decision(False, Reason.SCOPE_NOT_CONSENTED)
    return Decision(True, consent_id=consent_id)


times = st.integers(min_value=0, max_value=40)
scope_sets = st.frozensets(st.sampled_from(SCOPES), max_size=3)


@st.composite
def histories(draw: st.DrawFn) -> list[ConsentEvent]:
    n = draw(st.integers(min_value=0, max_value=10))
    ids = draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n, unique=True))
    return [
        ConsentEvent(
            consent_id=cid,
            participant_id=draw(st.sampled_from(PARTICIPANTS)),
            action=draw(st.sampled_from((CONSENT, CONSENT, WITHDRAW, WITHDRAW_SCOPE))),
            scopes=draw(scope_sets),
            effective_ms=draw(times),
            document=draw(st.sampled_from(DOCS)),
            version_rank=draw(st.integers(1, 3)),
            purge=draw(st.booleans()),
        )
        for cid in ids
    ]


requirements = st.lists(
    st.builds(
        ReconsentRequirement,
        document=st.sampled_from(DOCS),
        rank=st.integers(1, 3),
        deadline_ms=times,
    ),
    max_size=3,
)
queries = st.lists(
    st.builds(
        Query,
        participant=st.sampled_from((*PARTICIPANTS, "P-none")),
        scope=st.sampled_from((*SCOPES, "d")),
        t_ms=st.integers(min_value=-2, max_value=45),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=400, deadline=None)
@given(histories(), requirements, queries)
def test_gate_agrees_with_the_reference_model(
    events: list[ConsentEvent], reqs: list[ReconsentRequirement], qs: list[Query]
) -> None:
    snap = ConsentSnapshot.from_events(events, reqs)
    for q in qs:
        assert snap.decide(q.participant, q.scope, q.t_ms) == reference(events, reqs, q), q


@settings(max_examples=200, deadline=None)
@given(histories(), requirements, queries)
def test_event_order_in_the_input_does_not_matter(
    events: list[ConsentEvent], reqs: list[ReconsentRequirement], qs: list[Query]
) -> None:
    forward = ConsentSnapshot.from_events(events, reqs)
    backward = ConsentSnapshot.from_events(reversed(events), reversed(reqs))
    for q in qs:
        assert forward.decide(q.participant, q.scope, q.t_ms) == backward.decide(
            q.participant, q.scope, q.t_ms
        )


def consent(cid: int, t: int, scopes: str, *, doc: str = "d1", rank: int = 1) -> ConsentEvent:
    return ConsentEvent(cid, "P1", CONSENT, frozenset(scopes), t, doc, rank)


def withdraw(cid: int, t: int, scopes: str = "", *, purge: bool = False) -> ConsentEvent:
    action = WITHDRAW_SCOPE if scopes else WITHDRAW
    return ConsentEvent(cid, "P1", action, frozenset(scopes), t, "d1", 1, purge)


def decide(events: list[ConsentEvent], scope: str, t: int, *reqs: ReconsentRequirement) -> object:
    d = ConsentSnapshot.from_events(events, reqs).decide("P1", scope, t)
    return d.consent_id if d.allowed else d.reason


def test_before_during_and_after_withdrawal() -> None:
    events = [consent(1, 100, "ab"), withdraw(2, 200)]
    assert decide(events, "a", 99) == Reason.NO_CONSENT
    assert decide(events, "a", 100) == 1
    assert decide(events, "a", 199) == 1
    assert decide(events, "a", 200) == Reason.NO_CONSENT


def test_declined_scope_and_partial_withdrawal() -> None:
    events = [consent(1, 100, "ab"), withdraw(2, 200, "b")]
    assert decide(events, "c", 150) == Reason.SCOPE_NOT_CONSENTED
    assert decide(events, "b", 150) == 1
    assert decide(events, "b", 250) == Reason.SCOPE_NOT_CONSENTED
    assert decide(events, "a", 250) == 1


def test_retain_judges_by_measurement_time_and_delete_purges_the_past() -> None:
    # Retain: a reading measured before the withdrawal is stored whenever it arrives.
    assert decide([consent(1, 100, "ab"), withdraw(2, 200)], "a", 150) == 1
    # Delete: the data held is deleted, so late arrivals of the withdrawn scopes are refused.
    assert decide([consent(1, 100, "ab"), withdraw(2, 200, purge=True)], "a", 150) == (
        Reason.NO_CONSENT
    )
    partial = [consent(1, 100, "ab"), withdraw(2, 200, "b", purge=True)]
    assert decide(partial, "b", 150) == Reason.SCOPE_NOT_CONSENTED
    assert decide(partial, "a", 150) == 1
    # A later consent grants again from its own time.
    again = [*partial, consent(3, 300, "ab")]
    assert decide(again, "b", 310) == 3
    # ... even when it takes effect at the very time of the purging withdrawal.
    same_time = [*partial, consent(3, 200, "ab")]
    assert decide(same_time, "b", 200) == 3
    assert decide(same_time, "b", 199) == Reason.SCOPE_NOT_CONSENTED


def test_reconsent_deadline() -> None:
    due = ReconsentRequirement("d1", 2, 500)
    old = [consent(1, 100, "ab", rank=1)]
    assert decide(old, "a", 499, due) == 1
    assert decide(old, "a", 500, due) == Reason.RECONSENT_REQUIRED
    # Reason order: re-consent is reported before a scope the old consent did not cover.
    assert decide(old, "c", 600, due) == Reason.RECONSENT_REQUIRED
    renewed = [*old, consent(2, 700, "a", rank=2)]
    assert decide(renewed, "a", 650, due) == Reason.RECONSENT_REQUIRED
    assert decide(renewed, "a", 700, due) == 2
    # A requirement on another document does not apply.
    assert decide(old, "a", 600, ReconsentRequirement("d2", 2, 500)) == 1


def test_unknown_action_is_a_typed_error() -> None:
    bad = ConsentEvent(1, "P1", "revoke", frozenset("a"), 0)
    with pytest.raises(UnknownConsentAction):
        ConsentSnapshot.from_events([bad])


def test_state_at_reports_the_consent_in_force() -> None:
    snap = ConsentSnapshot.from_events([consent(1, 100, "ab"), withdraw(2, 200, "b")])
    state = snap.state_at("P1", 250)
    assert state is not None
    assert (state.consent_id, state.scopes) == (1, frozenset("a"))
    assert snap.state_at("P1", 50) is None
    assert snap.state_at("P2", 250) is None


def test_watermark_is_the_newest_consent_row_read() -> None:
    """What ``records.confirm_unchanged`` compares with: any row above it is newer."""
    assert ConsentSnapshot().watermark == 0
    events = [consent(7, 100, "ab"), withdraw(3, 50), consent(5, 300, "a")]
    assert ConsentSnapshot.from_events(events).watermark == 7
