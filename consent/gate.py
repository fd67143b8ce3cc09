"""The consent gate: may a reading of this metric, measured at this time, be stored?

Pure: given the participant's consent events (never updated, only appended), a metric's
scope and the reading's own time, it answers yes (with the consent record that allowed it,
kept as provenance) or no with a reason. Events take effect at ``effective_ms``:

- ``consent`` grants exactly its scopes from then on (a later consent supersedes an earlier);
- ``withdraw`` ends all consent from then on;
- ``withdraw_scope`` removes its scopes from then on.

A reading is judged by the time it was measured, not the time it arrived: a reading measured
while consent held and delivered after a withdrawal is stored (see docs/consent.md).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ingest.model import Reason

CONSENT = "consent"
WITHDRAW = "withdraw"
WITHDRAW_SCOPE = "withdraw_scope"


@dataclass(frozen=True, slots=True)
class ConsentEvent:
    consent_id: int
    participant_id: str
    action: str
    scopes: frozenset[str]
    effective_ms: int


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: Reason | None = None
    consent_id: int | None = None


@dataclass(frozen=True, slots=True)
class _State:
    """What holds from ``start_ms`` until the next state."""

    start_ms: int
    scopes: frozenset[str]
    consent_id: int | None


_NOT_YET = Decision(False, Reason.NO_CONSENT)


@dataclass(frozen=True)
class ConsentSnapshot:
    """Consent states per participant, precomputed so each decision is a binary search."""

    _states: Mapping[str, tuple[_State, ...]] = field(default_factory=dict)

    @classmethod
    def from_events(cls, events: Iterable[ConsentEvent]) -> ConsentSnapshot:
        by_participant: dict[str, list[ConsentEvent]] = {}
        for e in events:
            by_participant.setdefault(e.participant_id, []).append(e)
        states: dict[str, tuple[_State, ...]] = {}
        for pid, evs in by_participant.items():
            evs.sort(key=lambda e: (e.effective_ms, e.consent_id))
            out: list[_State] = []
            scopes: frozenset[str] = frozenset()
            consent_id: int | None = None
            for e in evs:
                if e.action == CONSENT:
                    scopes, consent_id = e.scopes, e.consent_id
                elif e.action == WITHDRAW:
                    scopes, consent_id = frozenset(), None
                elif e.action == WITHDRAW_SCOPE:
                    scopes = scopes - e.scopes
                else:
                    raise ValueError(f"unknown consent action {e.action!r}")
                state = _State(e.effective_ms, scopes, consent_id)
                if out and out[-1].start_ms == e.effective_ms:
                    out[-1] = state
                else:
                    out.append(state)
            states[pid] = tuple(out)
        return cls(states)

    def decide(self, participant_id: str, scope: str, t_ms: int) -> Decision:
        states = self._states.get(participant_id)
        if not states:
            return _NOT_YET
        i = bisect.bisect_right(states, t_ms, key=lambda s: s.start_ms) - 1
        if i < 0:
            return _NOT_YET
        state = states[i]
        if state.consent_id is None or not state.scopes:
            return _NOT_YET
        if scope not in state.scopes:
            return Decision(False, Reason.SCOPE_NOT_CONSENTED)
        return Decision(True, consent_id=state.consent_id)
