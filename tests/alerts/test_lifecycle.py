"""Alert lifecycle (acknowledge, resolve, escalate), missing data, the event feed, the MQTT
outbox, and rule definitions, against a real database."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from consent import records
from gateway.alerts import AlertEngine, drain, event_message
from ingest.rules import Rule, RuleKind, Severity
from storage import alerts, db, registry, users
from storage.errors import UnknownStudy
from storage.timeconv import from_ms, to_ms
from tests.alerts.conftest import Clock, Ingest, S, base_ms
from tests.alerts.test_engine import add_hr_rule, rows, steps
from tests.fixtures import signers
from tests.fixtures.trial import Trial


async def open_alert(trial: Trial, ingest: Ingest, value: float = 130.0, **rule: object) -> int:
    await add_hr_rule(trial.url, **rule)
    await ingest(steps(base_ms(), 0, 2, 1, value))
    (alert_id,) = (await rows(trial.url, "SELECT alert_id FROM alerts WHERE state = 'open'"))[0]
    assert isinstance(alert_id, int)
    return alert_id


async def audit_actions(url: str) -> list[tuple[object, ...]]:
    return await rows(
        url,
        "SELECT actor, action, entity_id, reason FROM audit_log WHERE entity = 'alert'"
        " ORDER BY audit_id",
    )


# --- acknowledge and resolve ----------------------------------------------------------------


async def test_acknowledge_then_resolve_each_audited_and_in_the_feed(
    trial: Trial, ingest: Ingest
) -> None:
    alert_id = await open_alert(trial, ingest)
    async with db.connection(trial.url) as conn:
        ack = await alerts.acknowledge(conn, alert_id, by="monitor.ann", note="called the site")
        done = await alerts.resolve(conn, alert_id, by="monitor.ann", note="sensor slipped")
    assert (ack.event, ack.actor, dict(ack.detail)) == (
        "acknowledged",
        "monitor.ann",
        {"note": "called the site"},
    )
    assert (done.event, done.actor) == ("resolved", "monitor.ann")
    (alert,) = await _list(trial.url)
    assert (alert.state, alert.acknowledged_by, alert.ack_note) == (
        "resolved",
        "monitor.ann",
        "called the site",
    )
    assert (alert.resolved_by, alert.resolve_note, alert.cleared_time) == (
        "monitor.ann",
        "sensor slipped",
        None,
    )
    assert await audit_actions(trial.url) == [
        ("system:alerts", "alert.opened", str(alert_id), None),
        ("monitor.ann", "alert.acknowledged", str(alert_id), "called the site"),
        ("monitor.ann", "alert.resolved", str(alert_id), "sensor slipped"),
    ]
    async with db.connection(trial.url) as conn:
        feed = await alerts.alert_events_since(conn, 0, ["SITE-A"])
    assert [(e.event, e.alert_id) for e in feed] == [
        ("opened", alert_id),
        ("acknowledged", alert_id),
        ("resolved", alert_id),
    ]
    assert [e.event_id for e in feed] == sorted(e.event_id for e in feed)


async def _list(url: str, **kw: object) -> list[alerts.Alert]:
    async with db.connection(url) as conn:
        return await alerts.list_alerts(conn, **kw)  # type: ignore[arg-type]


async def test_bad_transitions_are_refused_and_change_nothing(trial: Trial, ingest: Ingest) -> None:
    alert_id = await open_alert(trial, ingest)
    async with db.connection(trial.url) as conn:
        with pytest.raises(alerts.AlertTransitionError, match="acknowledge it before"):
            await alerts.resolve(conn, alert_id, by="ann")
        with pytest.raises(alerts.AlertTransitionError, match="user name"):
            await alerts.acknowledge(conn, alert_id, by="  ")
        with pytest.raises(alerts.AlertNotFound):
            await alerts.acknowledge(conn, alert_id + 100, by="ann")
        with pytest.raises(alerts.AlertNotFound):
            await alerts.resolve(conn, alert_id + 100, by="ann")
        await alerts.acknowledge(conn, alert_id, by="ann")
        with pytest.raises(alerts.AlertTransitionError, match="only an open alert"):
            await alerts.acknowledge(conn, alert_id, by="bob")
        with pytest.raises(alerts.AlertTransitionError, match="user name"):
            await alerts.resolve(conn, alert_id, by="")
        await alerts.resolve(conn, alert_id, by="ann")
        with pytest.raises(alerts.AlertTransitionError, match="resolved"):
            await alerts.resolve(conn, alert_id, by="ann")
        with pytest.raises(alerts.AlertTransitionError, match="resolved"):
            await alerts.acknowledge(conn, alert_id, by="ann")
    assert await rows(trial.url, "SELECT event FROM alert_events ORDER BY event_id") == [
        ("opened",),
        ("acknowledged",),
        ("resolved",),
    ]


async def test_alert_events_cannot_be_changed(trial: Trial, ingest: Ingest) -> None:
    await open_alert(trial, ingest)
    async with db.connection(trial.url) as conn:
        with pytest.raises(Exception, match="append-only"):
            await conn.execute("UPDATE alert_events SET actor = 'someone else'")
        await conn.rollback()
        with pytest.raises(Exception, match="append-only"):
            await conn.execute("DELETE FROM alert_events")


async def test_data_resolves_an_acknowledged_alert(trial: Trial, ingest: Ingest) -> None:
    alert_id = await open_alert(trial, ingest)
    async with db.connection(trial.url) as conn:
        await alerts.acknowledge(conn, alert_id, by="ann")
    await ingest([(base_ms() + 10 * S, 80.0)])
    (alert,) = await _list(trial.url)
    assert (alert.state, alert.acknowledged_by, alert.resolved_by) == (
        "resolved",
        "ann",
        "system:alerts",
    )


async def test_a_manually_resolved_alert_is_not_reopened_while_the_breach_goes_on(
    trial: Trial, ingest: Ingest
) -> None:
    alert_id = await open_alert(trial, ingest)
    async with db.connection(trial.url) as conn:
        await alerts.acknowledge(conn, alert_id, by="ann")
        await alerts.resolve(conn, alert_id, by="ann", note="known tachycardia")
    t0 = base_ms()
    await ingest(steps(t0, 10, 12, 1, 135.0))
    assert await rows(trial.url, "SELECT count(*) FROM alerts") == [(1,)]
    await ingest([(t0 + 13 * S, 80.0)])  # clears: nothing open to resolve
    await ingest([(t0 + 14 * S, 140.0)])  # breaches again: a new alert
    assert await rows(trial.url, "SELECT state FROM alerts ORDER BY alert_id") == [
        ("resolved",),
        ("open",),
    ]


# --- the feed ---------------------------------------------------------------------------------


async def test_alert_events_since_filters_by_site_and_resumes_after_an_id(
    trial: Trial, ingest: Ingest
) -> None:
    async with db.connection(trial.url) as conn, conn.transaction():
        await registry.create_site(conn, "SITE-B", "S1", "Site B")
        await registry.create_participant(conn, "P9", "S1", "SITE-B")
    await add_hr_rule(trial.url)
    t0 = base_ms()
    await ingest(steps(t0, 0, 1, 1, 130.0), participant="P1")
    await ingest(steps(t0, 0, 1, 1, 130.0), participant="P9")
    await ingest([(t0 + 5 * S, 80.0)], participant="P1")
    async with db.connection(trial.url) as conn:
        everything = await alerts.alert_events_since(conn, 0, ["SITE-A", "SITE-B"])
        site_a = await alerts.alert_events_since(conn, 0, ["SITE-A"])
        after_first = await alerts.alert_events_since(conn, everything[0].event_id, ["SITE-A"])
        paged = await alerts.alert_events_since(conn, 0, ["SITE-A", "SITE-B"], limit=2)
        nothing = await alerts.alert_events_since(conn, 0, [])
        unknown = await alerts.alert_events_since(conn, 0, ["NO-SUCH-SITE"])
    assert [(e.participant_id, e.event) for e in everything] == [
        ("P1", "opened"),
        ("P9", "opened"),
        ("P1", "resolved"),
    ]
    assert [(e.site_id, e.event) for e in site_a] == [("SITE-A", "opened"), ("SITE-A", "resolved")]
    assert [e.event for e in after_first] == ["resolved"]
    assert paged == everything[:2]
    assert nothing == unknown == []


# --- escalation -------------------------------------------------------------------------------


async def set_escalation(url: str, seconds: int | None) -> None:
    async with db.connection(url) as conn:
        await alerts.set_study_escalation(conn, "S1", seconds, actor="admin")


async def sweep(url: str, engine: AlertEngine, now_ms: int) -> list[alerts.AlertEvent]:
    async with db.connection(url) as conn, conn.transaction():
        return await engine.sweep(conn, now_ms)


async def test_unacknowledged_alert_escalates_once_after_the_study_time(
    trial: Trial, ingest: Ingest
) -> None:
    await set_escalation(trial.url, 600)
    alert_id = await open_alert(trial, ingest)
    opened = ingest.clock.now_ms
    assert await sweep(trial.url, ingest.engine, opened + 599 * S) == []
    escalated = await sweep(trial.url, ingest.engine, opened + 600 * S)
    assert [(e.event, e.alert_id, dict(e.detail)) for e in escalated] == [
        ("escalated", alert_id, {"unacknowledged_s": 600})
    ]
    assert await sweep(trial.url, ingest.engine, opened + 6000 * S) == []
    (alert,) = await _list(trial.url)
    assert alert.escalated_at == from_ms(opened + 600 * S)
    assert alert.state == "open"
    assert (await audit_actions(trial.url))[-1] == (
        "system:alerts",
        "alert.escalated",
        str(alert_id),
        "unacknowledged for 600 s",
    )


async def test_rule_escalation_time_wins_and_acknowledged_alerts_do_not_escalate(
    trial: Trial, ingest: Ingest
) -> None:
    await trial.add_participant("P2", "hub-2")
    await set_escalation(trial.url, 600)
    await add_hr_rule(trial.url, escalate_after_s=60)
    t0 = base_ms()
    await ingest(steps(t0, 0, 1, 1, 130.0), participant="P1")
    await ingest(steps(t0, 0, 1, 1, 130.0), participant="P2", dev="hub-2")
    p1, p2 = (a.alert_id for a in await _list(trial.url))
    async with db.connection(trial.url) as conn:
        await alerts.acknowledge(conn, p2, by="ann")
    escalated = await sweep(trial.url, ingest.engine, ingest.clock.now_ms + 60 * S)
    assert [(e.event, e.alert_id) for e in escalated] == [("escalated", p1)]


async def test_no_escalation_time_means_no_escalation(trial: Trial, ingest: Ingest) -> None:
    await open_alert(trial, ingest)
    assert await sweep(trial.url, ingest.engine, ingest.clock.now_ms + 86_400 * S) == []


async def test_escalation_time_must_be_positive_and_the_study_known(trial: Trial) -> None:
    async with db.connection(trial.url) as conn:
        with pytest.raises(alerts.InvalidRule, match="> 0"):
            await alerts.set_study_escalation(conn, "S1", 0, actor="admin")
        with pytest.raises(UnknownStudy, match="no study"):
            await alerts.set_study_escalation(conn, "S-none", 60, actor="admin")
    await set_escalation(trial.url, None)
    assert await rows(trial.url, "SELECT alert_escalation_s FROM studies") == [(None,)]


async def test_one_sweeper_at_a_time(trial: Trial, ingest: Ingest) -> None:
    await set_escalation(trial.url, 60)
    await open_alert(trial, ingest)
    later = ingest.clock.now_ms + 120 * S
    async with db.connection(trial.url) as a, db.connection(trial.url) as b:
        assert await alerts.try_sweep_lock(a)
        assert await ingest.engine.sweep(b, later) == []
        await b.rollback()
        await a.rollback()
    assert len(await sweep(trial.url, ingest.engine, later)) == 1


# --- missing data -----------------------------------------------------------------------------


async def add_missing_rule(url: str, seconds: int = 300) -> Rule:
    return await add_hr_rule(
        url, name="no-hr", kind=RuleKind.MISSING_DATA, high=None, sustained_s=seconds
    )


async def test_missing_data_opens_for_a_silent_participant_and_clears_on_recent_data(
    trial: Trial, ingest: Ingest, clock: Clock
) -> None:
    rule = await add_missing_rule(trial.url)
    t0 = base_ms()
    await ingest([(t0, 72.0)])
    assert await sweep(trial.url, ingest.engine, t0 + 299 * S) == []
    opened = await sweep(trial.url, ingest.engine, t0 + 300 * S)
    assert [(e.event, e.participant_id, e.rule_id) for e in opened] == [
        ("opened", "P1", rule.rule_id)
    ]
    (alert,) = await _list(trial.url)
    assert (alert.first_time, alert.condition_time) == (from_ms(t0), from_ms(t0 + 300 * S))
    assert await sweep(trial.url, ingest.engine, t0 + 900 * S) == []
    # Old backfill does not end the silence as of now; recent data does.
    clock.now_ms = t0 + 1000 * S
    await ingest([(t0 + 100 * S, 72.0)])
    assert (await _list(trial.url))[0].state == "open"
    await ingest([(t0 + 990 * S, 72.0)])
    (alert,) = await _list(trial.url)
    assert (alert.state, alert.cleared_time) == ("resolved", from_ms(t0 + 990 * S))


async def test_missing_data_counts_from_enrolment_when_nothing_arrived(
    trial: Trial, ingest: Ingest
) -> None:
    rule = await add_missing_rule(trial.url)
    ((enrolled, created),) = await rows(
        trial.url,
        "SELECT p.enrolled_at, r.created_at FROM participants p, alert_rules r"
        " WHERE p.participant_id = 'P1'",
    )
    assert isinstance(enrolled, datetime)
    assert isinstance(created, datetime)
    baseline = max(to_ms(enrolled), to_ms(created))
    assert await sweep(trial.url, ingest.engine, baseline + 299 * S) == []
    opened = await sweep(trial.url, ingest.engine, baseline + 300 * S)
    assert [(e.event, e.rule_id) for e in opened] == [("opened", rule.rule_id)]


async def test_missing_data_skips_withdrawn_participants(trial: Trial, ingest: Ingest) -> None:
    await add_missing_rule(trial.url)
    site = records.Actor("coord", users.Role.SITE_COORDINATOR, frozenset({trial.site_id}))
    async with db.connection(trial.url, autocommit=True) as conn:
        await signers.withdraw(conn, site, participant_id="P1", initiated_by=records.Initiator.SITE)
    assert await sweep(trial.url, ingest.engine, ingest.clock.now_ms + 86_400 * S) == []


# --- the MQTT outbox --------------------------------------------------------------------------


class RecordingPublisher:
    """Publisher protocol over a list; refuses from the n-th message when told to."""

    def __init__(self, refuse_from: int | None = None) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self._refuse_from = refuse_from

    async def __call__(self, topic: str, payload: bytes) -> bool:
        if self._refuse_from is not None and len(self.sent) >= self._refuse_from:
            return False
        self.sent.append((topic, payload))
        return True


async def test_outbox_is_published_in_order_and_emptied(trial: Trial, ingest: Ingest) -> None:
    alert_id = await open_alert(trial, ingest)
    async with db.connection(trial.url, autocommit=True) as conn:
        await alerts.acknowledge(conn, alert_id, by="ann")
        feed = await alerts.alert_events_since(conn, 0, ["SITE-A"])
        publish = RecordingPublisher()
        assert await drain(conn, publish) == 2
        assert await drain(conn, publish) == 0
    assert publish.sent == [("dct/v1/alerts/S1", event_message(e)) for e in feed]
    assert await rows(trial.url, "SELECT count(*) FROM alert_outbox") == [(0,)]


async def test_unacknowledged_publication_stays_in_the_outbox(trial: Trial, ingest: Ingest) -> None:
    alert_id = await open_alert(trial, ingest)
    async with db.connection(trial.url, autocommit=True) as conn:
        await alerts.acknowledge(conn, alert_id, by="ann")
        failing = RecordingPublisher(refuse_from=1)
        assert await drain(conn, failing) == 1
        assert len(failing.sent) == 1
        retry = RecordingPublisher()
        assert await drain(conn, retry) == 1
    assert [t for t, _ in retry.sent] == ["dct/v1/alerts/S1"]
    assert failing.sent[0] != retry.sent[0]


async def test_two_drainers_do_not_take_the_same_events(trial: Trial, ingest: Ingest) -> None:
    await open_alert(trial, ingest)
    started = asyncio.Event()
    release = asyncio.Event()

    class SlowPublisher(RecordingPublisher):
        async def __call__(self, topic: str, payload: bytes) -> bool:
            started.set()
            await release.wait()
            return await super().__call__(topic, payload)

    slow, quick = SlowPublisher(), RecordingPublisher()
    async with (
        db.connection(trial.url, autocommit=True) as a,
        db.connection(trial.url, autocommit=True) as b,
    ):
        first = asyncio.create_task(drain(a, slow))
        await started.wait()
        assert await drain(b, quick) == 0
        release.set()
        assert await first == 1
    assert quick.sent == []


# --- rule definitions -------------------------------------------------------------------------


async def test_rules_are_added_listed_and_audited(trial: Trial) -> None:
    hr = await add_hr_rule(trial.url, sustained_s=60, hysteresis=5.0, severity=Severity.CRITICAL)
    override = await add_hr_rule(trial.url, high=140.0, participant_id="P1")
    async with db.connection(trial.url) as conn:
        listed = await alerts.list_rules(conn, "S1")
        everywhere = await alerts.list_rules(conn)
        other = await alerts.list_rules(conn, "S2")
    assert listed == everywhere == [hr, override]
    assert other == []
    assert (hr.sustained_s, hr.hysteresis, hr.severity, hr.max_gap_s) == (
        60,
        5.0,
        Severity.CRITICAL,
        60,
    )
    assert await rows(
        trial.url,
        "SELECT actor, action, entity_id FROM audit_log WHERE entity = 'alert_rule'"
        " ORDER BY audit_id",
    ) == [
        ("tester", "alert_rule.created", str(hr.rule_id)),
        ("tester", "alert_rule.created", str(override.rule_id)),
    ]


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"high": None}, alerts.InvalidRule, "needs low, high or both"),
        ({"low": 130.0, "high": 120.0}, alerts.InvalidRule, "never clear"),
        ({"name": " "}, alerts.InvalidRule, "needs a name"),
        ({"metric": "mood"}, alerts.InvalidRule, "unknown metric 'mood'"),
        ({"study_id": "S-none"}, alerts.InvalidRule, "no study"),
        ({"participant_id": "P-none"}, alerts.InvalidRule, "not in study"),
        ({"kind": RuleKind.MISSING_DATA, "sustained_s": 0}, alerts.InvalidRule, "sustained_s"),
        ({}, alerts.DuplicateRule, "already has a rule named 'hr-high'"),
    ],
)
async def test_bad_rules_are_refused(
    trial: Trial, fields: dict[str, object], error: type[Exception], message: str
) -> None:
    await add_hr_rule(trial.url)
    with pytest.raises(error, match=message):
        await add_hr_rule(trial.url, **fields)
    assert await rows(trial.url, "SELECT count(*) FROM alert_rules") == [(1,)]


async def test_override_for_a_participant_of_another_study_is_refused(trial: Trial) -> None:
    async with db.connection(trial.url) as conn, conn.transaction():
        await registry.create_study(conn, "S2", "Other study")
    with pytest.raises(alerts.InvalidRule, match="not in study S2"):
        await add_hr_rule(trial.url, study_id="S2", participant_id="P1")
