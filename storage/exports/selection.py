"""What an export may contain: the participants the actor may see, and for each of them the
spans of time in which consent covered each metric.

Access follows the rest of the project (``consent.records.Actor``): admins see every site,
site coordinators, clinicians and monitors their own sites, participants nothing here.

Consent is judged again at export time with the same pure gate that judged each reading on
arrival (``consent.gate``), against the consent records as they are now: a reading is
exported only if consent covering its metric's scope held at the reading's own time. The
gate's answer changes only at a consent event or a re-consent deadline, so asking it at each
of those instants gives exact spans, which the database then joins against (no reading is
judged in Python). Under the ``delete`` policy a withdrawal takes its scopes away from every
earlier time too, so readings a deletion missed are still never exported.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum

from consent import records
from consent.gate import ConsentSnapshot
from consent.records import Actor
from storage.db import Conn
from storage.exports.errors import (
    ExportNotPermitted,
    InvalidExportRequest,
    UnknownParticipant,
    UnknownStudy,
)
from storage.exports.mapping import EXPORTED
from storage.timeconv import from_ms, to_ms
from storage.users import Role


class ExportKind(StrEnum):
    PARQUET = "parquet"
    FHIR = "fhir"
    SDTM = "sdtm"
    ADHERENCE = "adherence"


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """Readings of one study (or one participant of it), optionally in ``[from_time, to_time)``."""

    kind: ExportKind
    study_id: str
    participant_id: str | None = None
    from_time: datetime | None = None
    to_time: datetime | None = None

    def check(self) -> None:
        if not self.study_id:
            raise InvalidExportRequest("name the study to export")
        if self.participant_id == "":
            raise InvalidExportRequest("the participant id is empty")
        for name, t in (("from", self.from_time), ("to", self.to_time)):
            if t is not None and t.tzinfo is None:
                raise InvalidExportRequest(f"the {name} time needs a time zone")
        if (
            self.from_time is not None
            and self.to_time is not None
            and self.from_time >= self.to_time
        ):
            raise InvalidExportRequest("the from time must be before the to time")


@dataclass(frozen=True, slots=True)
class Participant:
    participant_id: str
    study_id: str
    site_id: str
    enrolled_on: date


@dataclass(frozen=True, slots=True)
class Window:
    """Readings of ``metric`` of a participant from ``lo_ms`` (inclusive) to ``hi_ms``
    (exclusive; None: no end) may be exported."""

    participant_id: str
    metric: str
    lo_ms: int
    hi_ms: int | None


@dataclass(frozen=True, slots=True)
class Selection:
    participants: tuple[Participant, ...]
    windows: tuple[Window, ...]

    def as_params(self) -> dict[str, list[str] | list[datetime] | list[datetime | None]]:
        """The windows as four arrays, for ``unnest`` in a query: named query parameters
        ``participants``, ``metrics``, ``lo`` and ``hi``."""
        return {
            "participants": [w.participant_id for w in self.windows],
            "metrics": [w.metric for w in self.windows],
            "lo": [from_ms(w.lo_ms) for w in self.windows],
            "hi": [None if w.hi_ms is None else from_ms(w.hi_ms) for w in self.windows],
        }


# Exports hold reading values: the roles that may read those (the API's CLINICAL roles).
MAY_EXPORT = frozenset({Role.CLINICIAN, Role.MONITOR, Role.ADMIN})


async def participants(conn: Conn, actor: Actor, request: ExportRequest) -> list[Participant]:
    """The participants of the request that the actor may export, or a typed refusal."""
    request.check()
    if actor.role not in MAY_EXPORT:
        raise ExportNotPermitted(f"a {actor.role.value} may not export reading values")
    cur = await conn.execute("SELECT 1 FROM studies WHERE study_id = %s", (request.study_id,))
    if await cur.fetchone() is None:
        raise UnknownStudy(f"no study {request.study_id!r}")
    cur = await conn.execute(
        "SELECT participant_id, study_id, site_id, (enrolled_at AT TIME ZONE 'UTC')::date"
        " FROM participants WHERE study_id = %s AND (%s::text IS NULL OR participant_id = %s)"
        " ORDER BY participant_id",
        (request.study_id, request.participant_id, request.participant_id),
    )
    rows = [Participant(str(p), str(s), str(site), d) for p, s, site, d in await cur.fetchall()]
    if request.participant_id is not None:
        if not rows:
            raise UnknownParticipant(
                f"no participant {request.participant_id!r} in study {request.study_id!r}"
            )
        if not actor.covers_site(rows[0].site_id):
            raise ExportNotPermitted(f"{actor.user} may not export {request.participant_id}")
        return rows
    cur = await conn.execute("SELECT site_id FROM sites WHERE study_id = %s", (request.study_id,))
    sites = [str(r[0]) for r in await cur.fetchall()]
    if actor.role is not Role.ADMIN and not any(actor.covers_site(s) for s in sites):
        raise ExportNotPermitted(f"{actor.user} may not export study {request.study_id}")
    return [p for p in rows if actor.covers_site(p.site_id)]


def windows(
    snapshot: ConsentSnapshot,
    participant_id: str,
    boundaries_ms: Iterable[int],
    *,
    metrics: Collection[str],
    start_ms: int | None = None,
    end_ms: int | None = None,
) -> list[Window]:
    """The spans in which the gate allows each metric of the participant, within the window.

    ``boundaries_ms`` must include every instant at which the gate's answer can change: each
    consent event's effective time and each re-consent deadline (extra instants are harmless).
    """
    points = sorted(set(boundaries_ms))
    out: list[Window] = []
    for metric in sorted(metrics):
        scope = EXPORTED[metric].metric.scope
        spans: list[list[int | None]] = []
        for i, start in enumerate(points):
            if not snapshot.decide(participant_id, scope, start).allowed:
                continue
            end = points[i + 1] if i + 1 < len(points) else None
            if spans and spans[-1][1] == start:
                spans[-1][1] = end
            else:
                spans.append([start, end])
        for lo, hi in spans:
            assert lo is not None
            lo_c = lo if start_ms is None else max(lo, start_ms)
            hi_c = hi if end_ms is None else (end_ms if hi is None else min(hi, end_ms))
            if hi_c is None or lo_c < hi_c:
                out.append(Window(participant_id, metric, lo_c, hi_c))
    return out


_BOUNDARIES = """
SELECT effective_at FROM consents WHERE participant_id = ANY(%s)
UNION
SELECT reconsent_by FROM consent_documents WHERE study_id = %s AND reconsent_by IS NOT NULL
"""


async def select(
    conn: Conn,
    actor: Actor,
    request: ExportRequest,
    *,
    metrics: Sequence[str] | None = None,
) -> Selection:
    """Participants and consent windows of an export, read in one short transaction.

    The transaction holds the shared consent lock (as the gateway's reads do) only while the
    consent records are read; the export's long read of readings happens after, outside it,
    so an export never delays a withdrawal.
    """
    wanted = tuple(EXPORTED) if metrics is None else tuple(metrics)
    async with conn.transaction():
        people = await participants(conn, actor, request)
        ids = [p.participant_id for p in people]
        snapshot = await records.snapshot(conn, ids)
        cur = await conn.execute(_BOUNDARIES, (ids, request.study_id))
        boundaries = [to_ms(r[0]) for r in await cur.fetchall()]
    lo = None if request.from_time is None else to_ms(request.from_time)
    hi = None if request.to_time is None else to_ms(request.to_time)
    found: list[Window] = []
    for pid in ids:
        found.extend(windows(snapshot, pid, boundaries, metrics=wanted, start_ms=lo, end_ms=hi))
    return Selection(tuple(people), tuple(found))
