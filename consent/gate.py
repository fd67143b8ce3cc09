"""The consent gate: may a reading of this metric, measured at this time, be stored?

Pure: given the participant's consent events (never updated, only appended), the study's
re-consent requirements, a metric's scope and the reading's own time, it answers yes (with
the consent record that allowed it, kept as provenance) or no with a reason. Events take
effect at ``effective_ms``, in the order ``(effective_ms, consent_id)``:

- ``consent`` grants exactly its scopes from then on (a later consent supersedes an earlier);
- ``withdraw`` ends all consent from then on;
- ``withdraw_scope`` removes its scopes from then on.

A withdrawal with ``purge`` (the study's data policy is ``delete``) also takes its scopes
away from every earlier time: the data held is deleted, so a reading of those scopes that
arrives late must not be stored either.

A re-consent requirement says: from ``deadline_ms`` on, a consent to a version of the
document older than ``rank`` no longer counts (``reconsent_required``).

A reading is judged by the time it was measured, not the time it arrived: under the
``retain`` policy a reading measured while consent held and delivered after a withdrawal is
stored (see docs/consent.md). Reasons, first match wins: ``no_consent`` (nothing granted at
that time), ``reconsent_required``, ``scope_not_consented``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from consent.errors import UnknownConsentAction
from ingest.model import Reason

CONSENT = "consent"
WITHDRAW = "withdraw"
WITHDRAW_SCOPE = "withdraw_scope"
ACTIONS = frozenset({CONSENT, WITHDRAW, WITHDRAW_SCOPE})


@dataclass(frozen=True, slots=True)
class ConsentEvent:
    consent_id: int
    participant_id: str
    action: str
    scopes: frozenset[str]
    effective_ms: int
    # Which consent document (a study's document across its versions) and how recent the
    # version is (higher is newer). Withdrawals carry those of the consent they end.
    document: str = ""
    version_rank: int = 0
    # A withdrawal under the 'delete' data policy (see the module doc).
    purge: bool = False


@dataclass(frozen=True, slots=True)
class ReconsentRequirement:
    """Version ``rank`` of ``document`` must be signed by ``deadline_ms``."""

    document: str
    rank: int
    deadline_ms: int


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: Reason | None = None
    consent_id: int | None = None


@dataclass(frozen=True, slots=True)
class ConsentState:
    """What holds from ``start_ms`` until the next state (``consent_id`` None: nothing)."""

    start_ms: int
    scopes: frozenset[str]
    consent_id: int | None
    document: str
    rank: int


_NOT_YET = Decision(False, Reason.NO_CONSENT)
_RECONSENT = Decision(False, Reason.RECONSENT_REQUIRED)
_NOT_IN_SCOPE = Decision(False, Reason.SCOPE_NOT_CONSENTED)


def _states(evs: list[ConsentEvent]) -> list[ConsentState]:
    evs.sort(key=lambda e: (e.effective_ms, e.consent_id))
    out: list[ConsentState] = []
    scopes: frozenset[str] = frozenset()
    consent_id: int | None = None
    document, rank = "", 0
    for e in evs:
        if e.action == CONSENT:
            scopes, consent_id, document, rank = e.scopes, e.consent_id, e.document, e.version_rank
        elif e.action == WITHDRAW:
            scopes, consent_id = frozenset(), None
        elif e.action == WITHDRAW_SCOPE:
            scopes = scopes - e.scopes
        else:
            raise UnknownConsentAction(f"unknown consent action {e.action!r}")
        state = ConsentState(e.effective_ms, scopes, consent_id, document, rank)
        if out and out[-1].start_ms == e.effective_ms:
            out[-1] = state
        else:
            out.append(state)
    for e in evs:
        if not e.purge or e.action == CONSENT:
            continue
        for i, s in enumerate(out):
            if s.start_ms >= e.effective_ms:
                break
            if e.action == WITHDRAW:
                out[i] = ConsentState(s.start_ms, frozenset(), None, s.document, s.rank)
            else:
                out[i] = ConsentState(
                    s.start_ms, s.scopes - e.scopes, s.consent_id, s.document, s.rank
                )
    return out


@dataclass(frozen=True, slots=True)
class _Deadlines:
    """A document's re-consent deadlines in order, with the highest rank due by each."""

    deadlines: tuple[int, ...]
    max_rank: tuple[int, ...]


def _deadlines(reqs: list[ReconsentRequirement]) -> _Deadlines:
    reqs.sort(key=lambda r: r.deadline_ms)
    ranks: list[int] = []
    for r in reqs:
        ranks.append(max(r.rank, ranks[-1]) if ranks else r.rank)
    return _Deadlines(tuple(r.deadline_ms for r in reqs), tuple(ranks))


@dataclass(frozen=True)
class ConsentSnapshot:
    """Consent states per participant, precomputed so each decision is a binary search."""

    _states: Mapping[str, tuple[ConsentState, ...]] = field(default_factory=dict)
    _deadlines: Mapping[str, _Deadlines] = field(default_factory=dict)
    # The highest consent_id among the events read. Consent rows are written one at a time
    # under the exclusive consent lock, so a row with a higher id was written after these
    # events were read: the snapshot is stale for its participants.
    watermark: int = 0

    @classmethod
    def from_events(
        cls,
        events: Iterable[ConsentEvent],
        requirements: Iterable[ReconsentRequirement] = (),
    ) -> ConsentSnapshot:
        by_participant: dict[str, list[ConsentEvent]] = {}
        watermark = 0
        for e in events:
            by_participant.setdefault(e.participant_id, []).append(e)
            watermark = max(watermark, e.consent_id)
        by_document: dict[str, list[ReconsentRequirement]] = {}
        for r in requirements:
            by_document.setdefault(r.document, []).append(r)
        return cls(
            {pid: tuple(_states(evs)) for pid, evs in by_participant.items()},
            {doc: _deadlines(reqs) for doc, reqs in by_document.items()},
            watermark,
        )

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
        if self.reconsent_due(state.document, state.rank, t_ms):
            return _RECONSENT
        if scope not in state.scopes:
            return _NOT_IN_SCOPE
        return Decision(True, consent_id=state.consent_id)

    def state_at(self, participant_id: str, t_ms: int) -> ConsentState | None:
        """The consent in force at ``t_ms`` (re-consent deadlines aside), or None."""
        states = self._states.get(participant_id, ())
        i = bisect.bisect_right(states, t_ms, key=lambda s: s.start_ms) - 1
        if i < 0 or states[i].consent_id is None or not states[i].scopes:
            return None
        return states[i]

    def reconsent_due(self, document: str, rank: int, t_ms: int) -> bool:
        """Whether, at ``t_ms``, a consent to version ``rank`` of ``document`` is outdated."""
        due = self._deadlines.get(document)
        if due is None:
            return False
        j = bisect.bisect_right(due.deadlines, t_ms) - 1
        return j >= 0 and due.max_rank[j] > rank
