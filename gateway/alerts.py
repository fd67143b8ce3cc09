"""The alert engine in the ingest path, its periodic sweep, and publication on MQTT.

``AlertEngine`` is the bulk writer's ``also`` hook: inside the transaction that stored a
batch's readings it locks the batch's participants (two workers holding readings of one
participant judge them one after the other), loads their effective rules and rule state,
judges the new readings by reading time (ingest.rules; late readings are re-judged from the
stored readings of a reset point on), and writes state, alert transitions and their events.
Everything commits with the readings, or nothing does.

``AlertEngine.sweep`` is the time-based part: missing-data rules and escalation. One worker
sweeps at a time (a transaction-level advisory lock; the others skip that round).

``AlertService`` runs in the gateway: the sweep every ``SWEEP_INTERVAL_S``, and the outbox
drain, woken by ``NOTIFY trialstream_alerts`` (sent at COMMIT) or the same interval. Each
event is published on ``dct/v1/alerts/<study>`` (QoS 1) and leaves the outbox only in the
transaction that saw the broker acknowledge it: at least once, so subscribers deduplicate
by ``event_id``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import MQTTErrorCode
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ingest import rules
from ingest.flags import in_doubt
from ingest.model import AcceptedEnvelope
from ingest.rules import Rule, RuleEvent, RuleKind, RuleState, Series
from storage import adherence, db
from storage import alert_state as state_store
from storage import alerts as store
from storage.alerts import AlertEvent
from storage.db import Conn
from storage.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

ALERTS_TOPIC = "dct/v1/alerts/{study}"
# The sweep (missing data, escalation) runs this often: both are judged in minutes, so a
# few seconds of lateness is noise; the outbox drain falls back to the same interval when a
# notification was missed (for example while the listening connection was being replaced).
SWEEP_INTERVAL_S = 5.0
# Late data is re-judged from the last reading inside the clearing band, searched back this
# far (a day of readings of one metric at 1 Hz is ~86k rows: a bounded replay).
REPLAY_LOOKBACK_S = 86_400
# Adherence rules judge whole local days: once a minute is often enough, and bounds the cost
# (each look computes the days of every participant with such a rule).
ADHERENCE_INTERVAL_S = 60.0
# Events published per drain transaction: bounds how long outbox rows stay locked.
DRAIN_BATCH = 200
# How long to wait for the broker's PUBACK before leaving an event for the next drain.
PUBACK_TIMEOUT_S = 10.0
# A lost database connection in the service's loops: jittered backoff up to this ceiling.
RETRY_CEILING_S = 10.0
CONNECTION_ERRORS = (psycopg.OperationalError, DatabaseUnavailable, PoolTimeout)


class AlertEngine:
    """Judges readings and time against the alert rules; see the module doc."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        replay_lookback_s: int = REPLAY_LOOKBACK_S,
    ) -> None:
        self._clock = clock
        self._lookback_ms = replay_lookback_s * 1000
        self._next_adherence_ms = 0

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def __call__(self, conn: Conn, fresh: Sequence[AcceptedEnvelope]) -> None:
        """The ``also`` hook of ``BulkWriter.write``: runs inside the batch's transaction."""
        participants = {e.participant_id for e in fresh if e.readings}
        if not participants:
            return
        by_participant = await store.rules_for(conn, participants)
        if not by_participant:
            return
        await state_store.lock_participants(conn, by_participant)
        states = await state_store.load_states(conn, list(by_participant))
        # Adherence rules judge days, not readings: the sweep does (judge_adherence).
        wanted = {
            (p, r.metric)
            for p, rs in by_participant.items()
            for r in rs
            if r.kind is not RuleKind.ADHERENCE
        }
        columns: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        doubted: dict[tuple[str, str], int] = {}
        judging_doubtful: set[str] | None = None
        for env in fresh:
            for reading in env.readings:
                key = (env.participant_id, reading.metric)
                if key not in wanted:
                    continue
                if reading.flags and in_doubt(reading.flags):
                    if judging_doubtful is None:
                        judging_doubtful = await state_store.judging_doubtful(conn, by_participant)
                    if env.participant_id not in judging_doubtful:
                        doubted[key] = doubted.get(key, 0) + 1
                        continue
                times, values = columns.setdefault(key, ([], []))
                times.append(reading.t_ms)
                values.append(reading.value)
        judging = judging_doubtful or set()
        skipped = {
            (participant, rule.rule_id): doubted[(participant, rule.metric)]
            for participant, rs in by_participant.items()
            for rule in rs
            if (participant, rule.metric) in doubted
        }
        now_ms = self._now_ms()
        changed: dict[tuple[str, int], RuleState] = {}
        events: list[RuleEvent] = []
        for participant in sorted(by_participant):
            for rule in by_participant[participant]:
                got = columns.get((participant, rule.metric))
                if got is None or rule.kind is RuleKind.ADHERENCE:
                    continue
                prior = states.get((participant, rule.rule_id), RuleState())
                if rule.kind is RuleKind.MISSING_DATA:
                    result = rules.evaluate_missing(rule, prior, got[0], now_ms, participant)
                else:
                    series = Series.of(*got)
                    late = rules.late_from(prior, series)
                    if late is None:
                        result = rules.evaluate(rule, prior, series, participant)
                    else:
                        result = await self._replay(
                            conn, rule, prior, participant, late, doubtful=participant in judging
                        )
                if result.state != prior:
                    changed[(participant, rule.rule_id)] = result.state
                events.extend(result.events)
        await state_store.save_states(conn, changed)
        await state_store.count_skipped(conn, skipped)
        rules_by_id = {r.rule_id: r for rs in by_participant.values() for r in rs}
        recorded = await store.apply_events(conn, events, rules_by_id, now_ms)
        _log_recorded(recorded)

    async def _replay(
        self,
        conn: Conn,
        rule: Rule,
        prior: RuleState,
        participant: str,
        late_ms: int,
        *,
        doubtful: bool,
    ) -> rules.Evaluation:
        floor = late_ms - self._lookback_ms
        reset = await state_store.reset_point(
            conn,
            participant,
            rule.metric,
            rules.clear_band(rule),
            before_ms=late_ms,
            not_before_ms=floor,
            doubtful=doubtful,
        )
        start = RuleState()
        if reset is None and prior.active_since is not None and prior.active_since < floor:
            start = RuleState(active_since=prior.active_since)
        begin = floor if reset is None else reset
        window = Series.of(
            *await state_store.stored_series(
                conn, participant, rule.metric, begin, doubtful=doubtful
            )
        )
        known = await state_store.known_starts(conn, participant, rule.rule_id, begin)
        log.info(
            "late readings re-judged participant=%s rule_id=%d window_rows=%d",
            participant,
            rule.rule_id,
            len(window),
        )
        return rules.replay(rule, prior, window, known, participant, late_ms=late_ms, start=start)

    async def sweep(self, conn: Conn, now_ms: int) -> list[AlertEvent]:
        """Missing data, adherence (at most every ``ADHERENCE_INTERVAL_S``) and escalation,
        in the caller's transaction; returns the events recorded (none when another worker
        holds the sweep this round)."""
        if not await store.try_sweep_lock(conn):
            return []
        recorded = await self._sweep_missing(conn, now_ms)
        if now_ms >= self._next_adherence_ms:
            self._next_adherence_ms = now_ms + int(ADHERENCE_INTERVAL_S * 1000)
            recorded += await self._sweep_adherence(conn, now_ms)
        recorded += await store.escalate_due(conn, now_ms)
        _log_recorded(recorded)
        return recorded

    async def _sweep_missing(self, conn: Conn, now_ms: int) -> list[AlertEvent]:
        candidates = await store.swept_rules(conn, RuleKind.MISSING_DATA)
        states = await state_store.load_states(conn, {p for p, _, _ in candidates})
        due = [
            (p, rule, since)
            for p, rule, since in candidates
            if rules.sweep_missing(
                rule, states.get((p, rule.rule_id), RuleState()), since, now_ms, p
            ).events
        ]
        if not due:
            return []
        # Judge again under the participants' locks: a batch may have moved them on.
        await state_store.lock_participants(conn, {p for p, _, _ in due})
        states = await state_store.load_states(conn, {p for p, _, _ in due})
        changed: dict[tuple[str, int], RuleState] = {}
        events: list[RuleEvent] = []
        for p, rule, since in due:
            prior = states.get((p, rule.rule_id), RuleState())
            result = rules.sweep_missing(rule, prior, since, now_ms, p)
            if result.state != prior:
                changed[(p, rule.rule_id)] = result.state
            events.extend(result.events)
        await state_store.save_states(conn, changed)
        return await store.apply_events(
            conn, events, {rule.rule_id: rule for _, rule, _ in due}, now_ms
        )

    async def _sweep_adherence(self, conn: Conn, now_ms: int) -> list[AlertEvent]:
        """Adherence rules against the participants' complete local days (the readings'
        path leaves these rules alone: only this sweep writes their state)."""
        candidates = await store.swept_rules(conn, RuleKind.ADHERENCE)
        if not candidates:
            return []
        participants = {p for p, _, _ in candidates}
        # Twice the longest span: days the schedule expected nothing are passed over.
        span = max(rule.sustained_s // rules.DAY_S for _, rule, _ in candidates)
        days = await adherence.complete_days(conn, participants, 2 * span)
        states = await state_store.load_states(conn, participants)
        changed: dict[tuple[str, int], RuleState] = {}
        events: list[RuleEvent] = []
        for p, rule, _ in candidates:
            prior = states.get((p, rule.rule_id), RuleState())
            result = rules.judge_adherence(rule, prior, days.get((p, rule.metric), []), p)
            if result.state != prior:
                changed[(p, rule.rule_id)] = result.state
            events.extend(result.events)
        if not events:
            return []
        await state_store.save_states(conn, changed)
        by_id = {rule.rule_id: rule for _, rule, _ in candidates}
        return await store.apply_events(conn, events, by_id, now_ms)


def _log_recorded(recorded: Sequence[AlertEvent]) -> None:
    for ev in recorded:
        log.info(
            "alert %s alert_id=%d event_id=%d study=%s participant=%s rule_id=%d",
            ev.event,
            ev.alert_id,
            ev.event_id,
            ev.study_id,
            ev.participant_id,
            ev.rule_id,
        )


def alerts_topic(study_id: str) -> str:
    return ALERTS_TOPIC.format(study=study_id)


def event_message(event: AlertEvent) -> bytes:
    """The JSON published for one event: identifiers, times and the transition, no values."""
    return json.dumps(
        {
            "event_id": event.event_id,
            "alert_id": event.alert_id,
            "event": event.event,
            "at": event.at.isoformat(),
            "actor": event.actor,
            "study_id": event.study_id,
            "site_id": event.site_id,
            "participant_id": event.participant_id,
            "rule_id": event.rule_id,
            "severity": event.severity,
            "detail": dict(event.detail),
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()


class Publisher(Protocol):
    async def __call__(self, topic: str, payload: bytes) -> bool:
        """Publish with QoS 1; True once the broker acknowledged it."""
        ...


async def drain(conn: Conn, publish: Publisher, *, limit: int = DRAIN_BATCH) -> int:
    """Publish up to ``limit`` outbox events, in order, in one transaction; stop at the first
    the broker does not acknowledge. Returns how many were published."""
    async with conn.transaction():
        pending = await store.take_outbox(conn, limit)
        done: list[int] = []
        for event in pending:
            if not await publish(alerts_topic(event.study_id), event_message(event)):
                log.warning("alert event not published event_id=%d", event.event_id)
                break
            done.append(event.event_id)
        await store.published(conn, done)
    return len(done)


class MqttPublisher:
    """Publishes through a connected paho client and waits for the PUBACK off the loop."""

    def __init__(self, publish: Callable[[str, bytes], mqtt.MQTTMessageInfo]) -> None:
        self._publish = publish

    async def __call__(self, topic: str, payload: bytes) -> bool:
        info = self._publish(topic, payload)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        try:
            await asyncio.to_thread(info.wait_for_publish, PUBACK_TIMEOUT_S)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()


class AlertService:
    """The sweep and the outbox drain of one gateway worker, until cancelled."""

    def __init__(
        self,
        engine: AlertEngine,
        pool: AsyncConnectionPool,
        database_url: str,
        publish: Publisher,
        *,
        interval_s: float = SWEEP_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._pool = pool
        self._url = database_url
        self._publish = publish
        self._interval_s = interval_s
        self._clock = clock

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._sweep_loop(), name="alerts-sweep")
            tg.create_task(self._drain_loop(), name="alerts-publish")

    async def _sweep_loop(self) -> None:
        delay = 0.1
        while True:
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    await self._engine.sweep(conn, int(self._clock() * 1000))
                delay = 0.1
            except CONNECTION_ERRORS as exc:
                delay = await pause("alert sweep", delay, exc)
                continue
            await asyncio.sleep(self._interval_s)

    async def _drain_loop(self) -> None:
        delay = 0.1
        while True:
            try:
                async with db.connection(self._url, autocommit=True) as listener:
                    await listener.execute(f"LISTEN {store.NOTIFY_CHANNEL}")
                    while True:
                        async with self._pool.connection() as conn:
                            while await drain(conn, self._publish) == DRAIN_BATCH:
                                pass
                        delay = 0.1
                        async for _ in listener.notifies(timeout=self._interval_s, stop_after=1):
                            pass
            except CONNECTION_ERRORS as exc:
                delay = await pause("alert publication", delay, exc)


async def pause(what: str, delay: float, exc: BaseException) -> float:
    """After a lost database in a background loop: log, sleep ``delay`` with jitter, and
    return the next delay (doubled, up to ``RETRY_CEILING_S``)."""
    log.warning(
        "%s: database unavailable retry_in_s=%.1f error=%s", what, delay, type(exc).__name__
    )
    await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not crypto
    return min(delay * 2, RETRY_CEILING_S)
