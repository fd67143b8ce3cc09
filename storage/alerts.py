"""Alert rules, per-rule state, the alert lifecycle and its event feed, in PostgreSQL.

Lifecycle: ``open -> acknowledged -> resolved``. Data resolves an open or acknowledged alert
when its condition clears; a person acknowledges an open alert and resolves an acknowledged
one. An unacknowledged alert escalates once (``escalated_at``) after the rule's
``escalate_after_s``, else the study's ``alert_escalation_s``. At most one unresolved alert
per participant and rule (the partial unique index ``alerts_one_open``).

Every transition, in the transaction that makes it: an ``alert_events`` row, an
``alert_outbox`` row (published on MQTT after COMMIT), an audit record, and
``NOTIFY trialstream_alerts`` with the event id. Writers take :data:`ALERTS_LOCK_KEY` before
their first alert change, so event ids are committed in increasing order: a reader of
:func:`alert_events_since` that remembers the last id it saw misses nothing.

Lock order, to stay free of deadlocks: participant locks (sorted), then the alerts lock,
then the audit chain lock (taken by ``storage.audit.append``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import errors as pg_errors

from ingest.metrics import METRICS
from ingest.rules import (
    DEFAULT_MAX_GAP_S,
    Change,
    Rule,
    RuleError,
    RuleEvent,
    RuleKind,
    Severity,
    effective_rules,
)
from storage import audit
from storage.db import Conn
from storage.errors import StorageError, first_line
from storage.study_settings import StudySetting, set_study_setting
from storage.timeconv import from_ms, to_ms

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "trialstream_alerts"
SYSTEM_ACTOR = "system:alerts"
CLEARED_NOTE = "cleared by data"
# Arbitrary, fixed advisory lock keys: "alerts" (event order), "sweep" (one sweeper); the
# per-participant locks are storage.alert_state's.
ALERTS_LOCK_KEY = 0x616C_6572_7473
SWEEP_LOCK_KEY = 0x616C_7377_6565_70
# A page reconnecting after a long absence pages through the feed in chunks of this many.
EVENTS_PAGE = 1000


class AlertError(StorageError):
    """Base of the alert errors of ``storage``."""


class InvalidRule(AlertError):
    """A rule definition is inconsistent, or names a study or participant that is not there."""


class DuplicateRule(AlertError):
    """The study already has a rule of that name (or the participant an override of it)."""


class AlertNotFound(AlertError):
    pass


class AlertTransitionError(AlertError):
    """The alert is not in a state that allows the asked-for transition."""


class AlertState:
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class Alert:
    alert_id: int
    rule_id: int
    rule_name: str
    metric: str
    study_id: str
    site_id: str
    participant_id: str
    state: str
    severity: str
    opened_at: datetime
    first_time: datetime
    condition_time: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    ack_note: str | None
    resolved_at: datetime | None
    resolved_by: str | None
    resolve_note: str | None
    cleared_time: datetime | None
    escalated_at: datetime | None


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One row of the feed: what happened to which alert, when, by whom (no data values)."""

    event_id: int
    alert_id: int
    event: str
    at: datetime
    actor: str
    study_id: str
    site_id: str
    participant_id: str
    rule_id: int
    severity: str
    detail: Mapping[str, Any]


# --- rules --------------------------------------------------------------------------------


def _rule(row: Sequence[Any]) -> Rule:
    (rid, study, name, metric, kind, low, high, sustained, hyst, gap, sev, pid, esc) = row
    return Rule(
        rule_id=int(rid),
        study_id=str(study),
        name=str(name),
        metric=str(metric),
        kind=RuleKind(kind),
        low=low,
        high=high,
        sustained_s=int(sustained),
        hysteresis=float(hyst),
        max_gap_s=int(gap),
        severity=Severity(sev),
        participant_id=pid,
        escalate_after_s=esc,
    )


async def add_rule(
    conn: Conn,
    *,
    study_id: str,
    name: str,
    metric: str,
    created_by: str,
    kind: RuleKind = RuleKind.RANGE,
    low: float | None = None,
    high: float | None = None,
    sustained_s: int = 0,
    hysteresis: float = 0.0,
    max_gap_s: int = DEFAULT_MAX_GAP_S,
    severity: Severity = Severity.WARNING,
    participant_id: str | None = None,
    escalate_after_s: int | None = None,
) -> Rule:
    """Add a study rule, or (``participant_id``) a participant's override of the study rule
    of the same name. Audited. Rules are never edited: add an override instead."""
    try:
        rule = Rule(
            0,
            study_id,
            name,
            metric,
            kind,
            low,
            high,
            sustained_s,
            hysteresis,
            max_gap_s,
            severity,
            participant_id,
            escalate_after_s,
        )
    except RuleError as exc:
        raise InvalidRule(str(exc)) from exc
    if not name.strip():
        raise InvalidRule("a rule needs a name")
    if metric not in METRICS:
        known = ", ".join(sorted(METRICS))
        raise InvalidRule(f"unknown metric {metric!r} (one of {known})")
    try:
        async with conn.transaction():
            if participant_id is not None:
                cur = await conn.execute(
                    "SELECT study_id FROM participants WHERE participant_id = %s",
                    (participant_id,),
                )
                row = await cur.fetchone()
                if row is None or row[0] != study_id:
                    raise InvalidRule(f"participant {participant_id!r} is not in study {study_id}")
            cur = await conn.execute(
                "INSERT INTO alert_rules (study_id, participant_id, name, kind, metric, low, high,"
                " sustained_s, hysteresis, max_gap_s, severity, escalate_after_s, created_by)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " RETURNING rule_id, study_id, name, metric, kind, low, high, sustained_s,"
                " hysteresis, max_gap_s, severity, participant_id, escalate_after_s",
                (
                    study_id,
                    participant_id,
                    name,
                    kind.value,
                    metric,
                    low,
                    high,
                    sustained_s,
                    hysteresis,
                    max_gap_s,
                    severity.value,
                    escalate_after_s,
                    created_by,
                ),
            )
            inserted = await cur.fetchone()
            assert inserted is not None
            rule = _rule(inserted)
            await audit.append(
                conn,
                actor=created_by,
                action="alert_rule.created",
                entity="alert_rule",
                entity_id=str(rule.rule_id),
                detail={
                    "study_id": study_id,
                    "participant_id": participant_id,
                    "name": name,
                    "kind": kind.value,
                    "metric": metric,
                    "low": low,
                    "high": high,
                    "sustained_s": sustained_s,
                    "hysteresis": hysteresis,
                    "max_gap_s": max_gap_s,
                    "severity": severity.value,
                    "escalate_after_s": escalate_after_s,
                },
            )
    except pg_errors.UniqueViolation as exc:
        whose = f"participant {participant_id}" if participant_id else f"study {study_id}"
        raise DuplicateRule(f"{whose} already has a rule named {name!r}") from exc
    except pg_errors.ForeignKeyViolation as exc:
        raise InvalidRule(f"no study {study_id!r}") from exc
    except pg_errors.CheckViolation as exc:
        raise InvalidRule(f"rule refused by the database: {first_line(exc)}") from exc
    return rule


async def list_rules(conn: Conn, study_id: str | None = None) -> list[Rule]:
    cur = await conn.execute(
        "SELECT rule_id, study_id, name, metric, kind, low, high, sustained_s, hysteresis,"
        " max_gap_s, severity, participant_id, escalate_after_s FROM alert_rules"
        " WHERE %s::text IS NULL OR study_id = %s ORDER BY study_id, rule_id",
        (study_id, study_id),
    )
    return [_rule(r) for r in await cur.fetchall()]


async def rules_for(conn: Conn, participant_ids: Collection[str]) -> dict[str, list[Rule]]:
    """The effective rules of each participant (study rules with their overrides applied);
    participants without any rule are left out."""
    if not participant_ids:
        return {}
    cur = await conn.execute(
        "SELECT p.participant_id, r.rule_id, r.study_id, r.name, r.metric, r.kind, r.low,"
        " r.high, r.sustained_s, r.hysteresis, r.max_gap_s, r.severity, r.participant_id,"
        " r.escalate_after_s"
        " FROM participants p JOIN alert_rules r ON r.study_id = p.study_id"
        " AND (r.participant_id IS NULL OR r.participant_id = p.participant_id)"
        " WHERE p.participant_id = ANY(%s)",
        (list(participant_ids),),
    )
    by_participant: dict[str, list[Rule]] = {}
    for row in await cur.fetchall():
        by_participant.setdefault(str(row[0]), []).append(_rule(row[1:]))
    return {p: effective_rules(rules, p) for p, rules in by_participant.items()}


async def set_study_escalation(
    conn: Conn, study_id: str, seconds: int | None, *, actor: str
) -> None:
    """Set (None: clear) how long an alert of the study may stay unacknowledged. Audited."""
    if seconds is not None and seconds <= 0:
        raise InvalidRule("the escalation time must be > 0 seconds")
    await set_study_setting(conn, study_id, StudySetting.ALERT_ESCALATION_S, seconds, actor=actor)


async def swept_rules(conn: Conn, kind: RuleKind) -> list[tuple[str, Rule, int]]:
    """Every (participant, effective rule of ``kind``, baseline ms) the sweep judges
    (missing data, adherence): participants of studies with such rules, except those whose
    latest consent record is a withdrawal. The baseline (enrolment or the rule's creation,
    the later) stands in for the latest reading while a missing-data rule has seen none."""
    cur = await conn.execute(
        "SELECT p.participant_id, p.enrolled_at FROM participants p"
        " WHERE p.study_id IN (SELECT study_id FROM alert_rules WHERE kind = %s)"
        " AND coalesce((SELECT c.action FROM consents c WHERE c.participant_id = p.participant_id"
        "  ORDER BY c.effective_at DESC, c.consent_id DESC LIMIT 1), 'consent') <> 'withdraw'",
        (kind.value,),
    )
    enrolled = {str(p): to_ms(at) for p, at in await cur.fetchall()}
    if not enrolled:
        return []
    cur = await conn.execute(
        "SELECT rule_id, created_at FROM alert_rules WHERE kind = %s", (kind.value,)
    )
    created = {int(r): to_ms(at) for r, at in await cur.fetchall()}
    out: list[tuple[str, Rule, int]] = []
    for participant, rules in sorted((await rules_for(conn, list(enrolled))).items()):
        out.extend(
            (participant, rule, max(enrolled[participant], created[rule.rule_id]))
            for rule in rules
            if rule.kind is kind
        )
    return out


async def try_sweep_lock(conn: Conn) -> bool:
    """Whether this transaction is the one sweeper (held until it ends)."""
    cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (SWEEP_LOCK_KEY,))
    row = await cur.fetchone()
    return bool(row and row[0])


# --- lifecycle ----------------------------------------------------------------------------


def _event(row: Sequence[Any]) -> AlertEvent:
    eid, aid, event, at, actor, study, site, pid, rid, sev, detail = row
    return AlertEvent(
        int(eid),
        int(aid),
        str(event),
        at,
        str(actor),
        str(study),
        str(site),
        str(pid),
        int(rid),
        str(sev),
        dict(detail),
    )


async def _lock_alerts(conn: Conn) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (ALERTS_LOCK_KEY,))


async def _record(
    conn: Conn,
    alert_id: int,
    event: str,
    at: datetime,
    actor: str,
    detail: Mapping[str, object],
    reason: str | None = None,
) -> AlertEvent:
    cur = await conn.execute(
        "INSERT INTO alert_events (alert_id, event, at, actor, study_id, site_id, participant_id,"
        " rule_id, severity, detail)"
        " SELECT a.alert_id, %s, %s, %s, p.study_id, p.site_id, a.participant_id, a.rule_id,"
        " a.severity, %s::jsonb FROM alerts a JOIN participants p USING (participant_id)"
        " WHERE a.alert_id = %s RETURNING event_id, alert_id, event, at, actor, study_id,"
        " site_id, participant_id, rule_id, severity, detail",
        (event, at, actor, json.dumps(dict(detail)), alert_id),
    )
    row = await cur.fetchone()
    assert row is not None
    recorded = _event(row)
    await conn.execute("INSERT INTO alert_outbox (event_id) VALUES (%s)", (recorded.event_id,))
    await audit.append(
        conn,
        actor=actor,
        action=f"alert.{event}",
        entity="alert",
        entity_id=str(alert_id),
        detail={
            "event_id": recorded.event_id,
            "participant_id": recorded.participant_id,
            "rule_id": recorded.rule_id,
            "severity": recorded.severity,
            **detail,
        },
        reason=reason,
    )
    await conn.execute(
        "SELECT pg_notify(%s, %s)",
        (
            NOTIFY_CHANNEL,
            json.dumps(
                {
                    "event_id": recorded.event_id,
                    "alert_id": alert_id,
                    "event": event,
                    "study_id": recorded.study_id,
                    "site_id": recorded.site_id,
                }
            ),
        ),
    )
    return recorded


def _iso(t_ms: int) -> str:
    return from_ms(t_ms).isoformat()


async def apply_events(
    conn: Conn, events: Sequence[RuleEvent], rules: Mapping[int, Rule], now_ms: int
) -> list[AlertEvent]:
    """Turn rule events into alert transitions, in order.

    ``opened`` opens an alert unless one is already unresolved for the participant and rule;
    ``cleared`` resolves the unresolved one. An episode opened and cleared by the same
    evaluation (a backfilled past episode) becomes an alert stored already resolved, with
    both events: it is reported even while a later episode's alert is open.
    """
    if not events:
        return []
    await _lock_alerts(conn)
    now = from_ms(now_ms)
    recorded: list[AlertEvent] = []
    skipped: set[tuple[str, int, int]] = set()
    i = 0
    while i < len(events):
        ev = events[i]
        rule = rules[ev.rule_id]
        i += 1
        if ev.change is Change.CLEARED:
            if (ev.participant_id, ev.rule_id, ev.first_ms) in skipped:
                continue
            cur = await conn.execute(
                "UPDATE alerts SET state = 'resolved', resolved_at = %s, resolved_by = %s,"
                " resolve_note = %s, cleared_time = %s"
                " WHERE participant_id = %s AND rule_id = %s AND state <> 'resolved'"
                " RETURNING alert_id",
                (
                    now,
                    SYSTEM_ACTOR,
                    CLEARED_NOTE,
                    from_ms(ev.at_ms),
                    ev.participant_id,
                    ev.rule_id,
                ),
            )
            row = await cur.fetchone()
            if row is not None:  # else resolved by a person earlier: nothing left to end
                recorded.append(await _record_cleared(conn, int(row[0]), now, ev))
            continue
        nxt = events[i] if i < len(events) else None
        closed = (
            nxt is not None
            and nxt.change is Change.CLEARED
            and (nxt.participant_id, nxt.rule_id, nxt.first_ms)
            == (ev.participant_id, ev.rule_id, ev.first_ms)
        )
        cur = await conn.execute(
            "INSERT INTO alerts (rule_id, participant_id, state, severity, opened_at,"
            " first_time, condition_time, last_value, resolved_at, resolved_by, resolve_note,"
            " cleared_time)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (participant_id, rule_id) WHERE state <> 'resolved' DO NOTHING"
            " RETURNING alert_id",
            (
                ev.rule_id,
                ev.participant_id,
                AlertState.RESOLVED if closed else AlertState.OPEN,
                rule.severity.value,
                now,
                from_ms(ev.first_ms),
                from_ms(ev.at_ms),
                ev.value,
                now if closed else None,
                SYSTEM_ACTOR if closed else None,
                CLEARED_NOTE if closed else None,
                from_ms(nxt.at_ms) if closed and nxt is not None else None,
            ),
        )
        row = await cur.fetchone()
        if row is None:
            log.info("alert already open participant=%s rule_id=%d", ev.participant_id, ev.rule_id)
            skipped.add((ev.participant_id, ev.rule_id, ev.first_ms))
            continue
        alert_id = int(row[0])
        recorded.append(
            await _record(
                conn,
                alert_id,
                "opened",
                now,
                SYSTEM_ACTOR,
                {
                    "rule": rule.name,
                    "kind": rule.kind.value,
                    "metric": rule.metric,
                    "first_time": _iso(ev.first_ms),
                    "condition_time": _iso(ev.at_ms),
                },
            )
        )
        if closed and nxt is not None:
            recorded.append(await _record_cleared(conn, alert_id, now, nxt))
            i += 1
    return recorded


async def _record_cleared(conn: Conn, alert_id: int, now: datetime, ev: RuleEvent) -> AlertEvent:
    return await _record(
        conn,
        alert_id,
        "resolved",
        now,
        SYSTEM_ACTOR,
        {"by": "data", "cleared_time": _iso(ev.at_ms)},
        CLEARED_NOTE,
    )


async def escalate_due(conn: Conn, now_ms: int) -> list[AlertEvent]:
    """Escalate every alert still unacknowledged past its escalation time (once each)."""
    now = from_ms(now_ms)
    await _lock_alerts(conn)
    cur = await conn.execute(
        "SELECT a.alert_id, coalesce(r.escalate_after_s, s.alert_escalation_s)"
        " FROM alerts a JOIN alert_rules r USING (rule_id)"
        " JOIN participants p ON p.participant_id = a.participant_id"
        " JOIN studies s ON s.study_id = p.study_id"
        " WHERE a.state = 'open' AND a.escalated_at IS NULL"
        " AND coalesce(r.escalate_after_s, s.alert_escalation_s) IS NOT NULL"
        " AND a.opened_at + make_interval(secs => coalesce(r.escalate_after_s,"
        " s.alert_escalation_s)) <= %s ORDER BY a.alert_id",
        (now,),
    )
    due = [(int(a), int(s)) for a, s in await cur.fetchall()]
    recorded: list[AlertEvent] = []
    for alert_id, after_s in due:
        await conn.execute(
            "UPDATE alerts SET escalated_at = %s WHERE alert_id = %s", (now, alert_id)
        )
        recorded.append(
            await _record(
                conn,
                alert_id,
                "escalated",
                now,
                SYSTEM_ACTOR,
                {"unacknowledged_s": after_s},
                f"unacknowledged for {after_s} s",
            )
        )
    return recorded


def _check_actor(by: str) -> None:
    if not by.strip() or "\x00" in by:
        raise AlertTransitionError("say who does it: a non-empty user name")


async def _current_state(conn: Conn, alert_id: int) -> str:
    cur = await conn.execute("SELECT state FROM alerts WHERE alert_id = %s FOR UPDATE", (alert_id,))
    row = await cur.fetchone()
    if row is None:
        raise AlertNotFound(f"no alert {alert_id}")
    return str(row[0])


async def acknowledge(
    conn: Conn, alert_id: int, *, by: str, note: str | None = None, at: datetime | None = None
) -> AlertEvent:
    """open -> acknowledged, by whom and with an optional note. Audited."""
    _check_actor(by)
    when = at or datetime.now(UTC)
    async with conn.transaction():
        await _lock_alerts(conn)
        state = await _current_state(conn, alert_id)
        if state != AlertState.OPEN:
            raise AlertTransitionError(
                f"alert {alert_id} is {state}: only an open alert is acknowledged"
            )
        await conn.execute(
            "UPDATE alerts SET state = 'acknowledged', acknowledged_at = %s,"
            " acknowledged_by = %s, ack_note = %s WHERE alert_id = %s",
            (when, by, note, alert_id),
        )
        return await _record(conn, alert_id, "acknowledged", when, by, {"note": note}, note)


async def resolve(
    conn: Conn, alert_id: int, *, by: str, note: str | None = None, at: datetime | None = None
) -> AlertEvent:
    """acknowledged -> resolved, by a person. Audited. While the condition still holds, the
    rule does not raise a new alert until it has cleared and breached again."""
    _check_actor(by)
    when = at or datetime.now(UTC)
    async with conn.transaction():
        await _lock_alerts(conn)
        state = await _current_state(conn, alert_id)
        if state != AlertState.ACKNOWLEDGED:
            raise AlertTransitionError(
                f"alert {alert_id} is {state}: acknowledge it before resolving it"
            )
        await conn.execute(
            "UPDATE alerts SET state = 'resolved', resolved_at = %s, resolved_by = %s,"
            " resolve_note = %s WHERE alert_id = %s",
            (when, by, note, alert_id),
        )
        return await _record(
            conn, alert_id, "resolved", when, by, {"by": "person", "note": note}, note
        )


_ALERT_QUERY = """
SELECT a.alert_id, a.rule_id, r.name, r.metric, p.study_id, p.site_id, a.participant_id,
       a.state, a.severity, a.opened_at, a.first_time, a.condition_time, a.acknowledged_at,
       a.acknowledged_by, a.ack_note, a.resolved_at, a.resolved_by, a.resolve_note,
       a.cleared_time, a.escalated_at
FROM alerts a JOIN alert_rules r ON r.rule_id = a.rule_id
     JOIN participants p ON p.participant_id = a.participant_id
WHERE (%(study)s::text IS NULL OR p.study_id = %(study)s)
  AND (%(states)s::text[] IS NULL OR a.state = ANY(%(states)s))
  AND (%(alert)s::int8 IS NULL OR a.alert_id = %(alert)s)
ORDER BY a.alert_id
"""


async def list_alerts(
    conn: Conn,
    *,
    study_id: str | None = None,
    states: Collection[str] | None = None,
    alert_id: int | None = None,
) -> list[Alert]:
    cur = await conn.execute(
        _ALERT_QUERY,
        {
            "study": study_id,
            "states": None if states is None else list(states),
            "alert": alert_id,
        },
    )
    return [Alert(*row) for row in await cur.fetchall()]


async def alert_events_since(
    conn: Conn, last_event_id: int, sites: Collection[str], *, limit: int = EVENTS_PAGE
) -> list[AlertEvent]:
    """Events after ``last_event_id`` for alerts of participants of ``sites``, in order: what a
    live page reconnecting with ``Last-Event-ID`` has missed (call again while a full page
    comes back)."""
    if not sites:
        return []
    cur = await conn.execute(
        "SELECT event_id, alert_id, event, at, actor, study_id, site_id, participant_id,"
        " rule_id, severity, detail FROM alert_events"
        " WHERE event_id > %s AND site_id = ANY(%s) ORDER BY event_id LIMIT %s",
        (last_event_id, list(sites), limit),
    )
    return [_event(r) for r in await cur.fetchall()]


async def take_outbox(conn: Conn, limit: int) -> list[AlertEvent]:
    """Events not yet published, locked for this transaction (other drainers skip them)."""
    cur = await conn.execute(
        "SELECT e.event_id, e.alert_id, e.event, e.at, e.actor, e.study_id, e.site_id,"
        " e.participant_id, e.rule_id, e.severity, e.detail"
        " FROM alert_outbox o JOIN alert_events e USING (event_id)"
        " ORDER BY o.event_id LIMIT %s FOR UPDATE OF o SKIP LOCKED",
        (limit,),
    )
    return [_event(r) for r in await cur.fetchall()]


async def published(conn: Conn, event_ids: Sequence[int]) -> None:
    if event_ids:
        await conn.execute("DELETE FROM alert_outbox WHERE event_id = ANY(%s)", (list(event_ids),))


__all__ = [
    "NOTIFY_CHANNEL",
    "SYSTEM_ACTOR",
    "Alert",
    "AlertError",
    "AlertEvent",
    "AlertNotFound",
    "AlertState",
    "AlertTransitionError",
    "DuplicateRule",
    "InvalidRule",
    "acknowledge",
    "add_rule",
    "alert_events_since",
    "apply_events",
    "escalate_due",
    "list_alerts",
    "list_rules",
    "published",
    "resolve",
    "rules_for",
    "set_study_escalation",
    "swept_rules",
    "take_outbox",
    "try_sweep_lock",
]
