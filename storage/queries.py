"""Data queries (``data_queries``, docs/queries.md): discrepancy management on a participant's
data. A monitor opens a query on one reading, a metric over a time range, or a gap the hub
reported, with a question; the site answers; the monitor closes it or reopens it.

    open --answer--> answered --close--> closed
      ^                 |                  |
      +----reopen-------+------reopen------+        (close also from open)

Each step is a message row (append-only) and an audit record, in one transaction with the
state change; a step that does not fit the query's state is refused (``QueryStateError``).
Who may take which step (roles and sites) is the caller's check (gateway.web.access).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from psycopg.rows import class_row

from ingest.metrics import METRICS
from ingest.wire import TEXT_CONTROL_RE
from storage import audit
from storage.db import Conn
from storage.errors import StorageError

MAX_TEXT: Final = 4000


class Target(StrEnum):
    READING = "reading"
    RANGE = "range"
    GAP = "gap"


class Step(StrEnum):
    OPEN = "open"
    ANSWER = "answer"
    CLOSE = "close"
    REOPEN = "reopen"


# The states each step may be taken from, and the state it leaves.
_STEPS: Final = {
    Step.ANSWER: ({"open"}, "answered"),
    Step.CLOSE: ({"open", "answered"}, "closed"),
    Step.REOPEN: ({"answered", "closed"}, "open"),
}


class QueryError(StorageError):
    """A query that cannot be opened as asked: its message says why."""


class QueryNotFound(StorageError):
    """No such query."""


class QueryStateError(StorageError):
    """The step does not fit the query's state (answering a closed query, ...)."""


@dataclass(frozen=True, slots=True)
class Subject:
    """What a query is about: a reading (its metric, time and envelope), a metric over a
    time range, or a gap (its envelope and start)."""

    target: Target
    from_time: datetime
    to_time: datetime
    metric: str | None = None
    device_id: str | None = None
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class Query:
    query_id: int
    participant_id: str
    site_id: str
    target: str
    metric: str | None
    from_time: datetime
    to_time: datetime
    device_id: str | None
    seq: int | None
    state: str
    opened_by: str
    opened_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Message:
    query_id: int
    message_id: int
    action: str
    text: str
    actor: str
    at: datetime


_READING_EXISTS = """
SELECT EXISTS (SELECT 1 FROM readings WHERE participant_id = %s AND metric = %s AND time = %s
               AND device_id = %s AND seq = %s)
"""
_GAP_EXISTS = """
SELECT EXISTS (SELECT 1 FROM gaps g JOIN envelopes e ON (e.device_id, e.seq) = (g.device_id, g.seq)
               WHERE e.participant_id = %s AND g.device_id = %s AND g.seq = %s
                 AND g.from_time = %s AND g.to_time = %s)
"""
_INSERT = """
INSERT INTO data_queries (participant_id, target, metric, from_time, to_time, device_id, seq,
    opened_by)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
RETURNING query_id
"""
_MESSAGE = "INSERT INTO data_query_messages (query_id, action, text, actor) VALUES (%s, %s, %s, %s)"
_LOCK = "SELECT state FROM data_queries WHERE query_id = %s FOR UPDATE"
_SET_STATE = "UPDATE data_queries SET state = %s, updated_at = now() WHERE query_id = %s"
_COLUMNS = """
SELECT q.query_id, q.participant_id, p.site_id, q.target, q.metric, q.from_time, q.to_time,
       q.device_id, q.seq, q.state, q.opened_by, q.opened_at, q.updated_at
FROM data_queries q JOIN participants p USING (participant_id)
"""
_LIST = (
    _COLUMNS
    + """
WHERE (%(participant)s::text IS NULL OR q.participant_id = %(participant)s)
  AND (%(sites)s::text[] IS NULL OR p.site_id = ANY(%(sites)s))
  AND (%(states)s::text[] IS NULL OR q.state = ANY(%(states)s))
  AND (%(ids)s::int8[] IS NULL OR q.query_id = ANY(%(ids)s))
ORDER BY q.query_id DESC
LIMIT %(limit)s
"""
)
_MESSAGES = """
SELECT query_id, message_id, action, text, actor, at FROM data_query_messages
WHERE query_id = ANY(%s) ORDER BY query_id, message_id
"""


def _text(text: str) -> str:
    stripped = text.strip()
    if not stripped:
        raise QueryError("the text is empty: say what is asked or answered")
    if len(stripped) > MAX_TEXT:
        raise QueryError(f"the text is longer than {MAX_TEXT} characters")
    found = TEXT_CONTROL_RE.search(stripped)  # whoever calls: the API, the command line
    if found:
        raise QueryError(f"the text has a control character ({found.group()!r})")
    return stripped


async def _check_subject(conn: Conn, participant_id: str, s: Subject) -> None:
    if s.from_time > s.to_time:
        raise QueryError("the range ends before it starts")
    if s.target is Target.GAP:
        if s.metric is not None or s.device_id is None or s.seq is None:
            raise QueryError("a gap is named by its envelope (device_id, seq) and times")
        cur = await conn.execute(
            _GAP_EXISTS, (participant_id, s.device_id, s.seq, s.from_time, s.to_time)
        )
    else:
        if s.metric not in METRICS:
            raise QueryError(f"unknown metric {s.metric!r}")
        if s.target is Target.RANGE:
            if s.device_id is not None or s.seq is not None:
                raise QueryError("a range is named by its metric and times, not an envelope")
            return
        if s.device_id is None or s.seq is None or s.from_time != s.to_time:
            raise QueryError("a reading is named by its metric, time and envelope")
        cur = await conn.execute(
            _READING_EXISTS, (participant_id, s.metric, s.from_time, s.device_id, s.seq)
        )
    row = await cur.fetchone()
    if row is None or not row[0]:
        raise QueryError(f"participant {participant_id} has no such {s.target.value}")


async def open_query(
    conn: Conn, participant_id: str, subject: Subject, text: str, *, actor: str
) -> int:
    """Open a query on ``subject`` of the participant's data; returns its id. Audited."""
    question = _text(text)
    async with conn.transaction():
        await _check_subject(conn, participant_id, subject)
        cur = await conn.execute(
            _INSERT,
            (
                participant_id,
                subject.target.value,
                subject.metric,
                subject.from_time,
                subject.to_time,
                subject.device_id,
                subject.seq,
                actor,
            ),
        )
        row = await cur.fetchone()
        assert row is not None
        query_id = int(row[0])
        await conn.execute(_MESSAGE, (query_id, Step.OPEN.value, question, actor))
        await audit.append(
            conn,
            actor=actor,
            action="query.open",
            entity="participant",
            entity_id=participant_id,
            detail={
                "query_id": query_id,
                "target": subject.target.value,
                "metric": subject.metric,
                "from": subject.from_time.isoformat(),
                "to": subject.to_time.isoformat(),
            },
        )
    return query_id


async def step(conn: Conn, query_id: int, action: Step, text: str, *, actor: str) -> str:
    """Answer, close or reopen a query; returns its new state. Audited."""
    if action is Step.OPEN:
        raise QueryStateError("a query is opened with open_query")
    said = _text(text)
    allowed, after = _STEPS[action]
    async with conn.transaction():
        cur = await conn.execute(_LOCK, (query_id,))
        row = await cur.fetchone()
        if row is None:
            raise QueryNotFound(f"no query {query_id}")
        if row[0] not in allowed:
            raise QueryStateError(f"query {query_id} is {row[0]}: it cannot be {_done(action)}")
        await conn.execute(_SET_STATE, (after, query_id))
        await conn.execute(_MESSAGE, (query_id, action.value, said, actor))
        await audit.append(
            conn,
            actor=actor,
            action=f"query.{action.value}",
            entity="query",
            entity_id=str(query_id),
            detail={"from_state": row[0], "to_state": after},
        )
    return after


def _done(action: Step) -> str:
    return {Step.ANSWER: "answered", Step.CLOSE: "closed", Step.REOPEN: "reopened"}[action]


async def queries(
    conn: Conn,
    *,
    participant_id: str | None = None,
    site_ids: Collection[str] | None = None,
    states: Collection[str] | None = None,
    query_ids: Collection[int] | None = None,
    limit: int = 500,
) -> list[Query]:
    """Queries, newest first, of a participant and/or of ``site_ids`` (None: every site)."""
    async with conn.cursor(row_factory=class_row(Query)) as cur:
        await cur.execute(
            _LIST,
            {
                "participant": participant_id,
                "sites": None if site_ids is None else list(site_ids),
                "states": None if states is None else list(states),
                "ids": None if query_ids is None else list(query_ids),
                "limit": limit,
            },
        )
        return await cur.fetchall()


async def messages(conn: Conn, query_ids: Collection[int]) -> dict[int, list[Message]]:
    """Each query's messages, in order."""
    out: dict[int, list[Message]] = {q: [] for q in query_ids}
    async with conn.cursor(row_factory=class_row(Message)) as cur:
        await cur.execute(_MESSAGES, (list(query_ids),))
        for m in await cur.fetchall():
            out[m.query_id].append(m)
    return out


def as_json(q: Query, said: Sequence[Message]) -> dict[str, Any]:
    """A query and its messages as the API answers them and ``trialstream queries --json``
    prints them."""
    return {
        "query_id": q.query_id,
        "participant_id": q.participant_id,
        "site_id": q.site_id,
        "target": q.target,
        "metric": q.metric,
        "from": q.from_time.isoformat(),
        "to": q.to_time.isoformat(),
        "device_id": q.device_id,
        "seq": q.seq,
        "state": q.state,
        "opened_by": q.opened_by,
        "opened_at": q.opened_at.isoformat(),
        "updated_at": q.updated_at.isoformat(),
        "messages": [
            {"action": m.action, "text": m.text, "actor": m.actor, "at": m.at.isoformat()}
            for m in said
        ],
    }
