"""``storage.alerts.list_alerts`` joins alerts, rules and participants, two of which have a
``participant_id`` column (a rule's is its override's participant): every filter is run on
alerts of study rules and of a participant's override, and the columns come from the alert."""

from __future__ import annotations

import time

from ingest.rules import Change, RuleEvent
from storage import alerts, db
from tests.fixtures.trial import Trial


async def test_list_alerts_filters_over_study_rules_and_participant_overrides(
    trial: Trial,
) -> None:
    await trial.add_participant("P2", "hub-2")
    now = int(time.time() * 1000)
    async with db.connection(trial.url) as conn:
        study_rule = await alerts.add_rule(
            conn, study_id="S1", name="hr-high", metric="heart_rate", high=120.0, created_by="t"
        )
        override = await alerts.add_rule(
            conn,
            study_id="S1",
            name="hr-high",
            metric="heart_rate",
            high=140.0,
            participant_id="P1",
            created_by="t",
        )
        async with conn.transaction():
            opened = await alerts.apply_events(
                conn,
                [
                    RuleEvent(Change.OPENED, override.rule_id, "P1", now, now, 150.0),
                    RuleEvent(Change.OPENED, study_rule.rule_id, "P2", now, now, 130.0),
                ],
                {override.rule_id: override, study_rule.rule_id: study_rule},
                now,
            )
        await conn.commit()
        p1_alert, p2_alert = (e.alert_id for e in opened)
        await alerts.acknowledge(conn, p2_alert, by="monitor")

        every = await alerts.list_alerts(conn)
        assert [(a.alert_id, a.participant_id, a.rule_id) for a in every] == [
            (p1_alert, "P1", override.rule_id),
            (p2_alert, "P2", study_rule.rule_id),
        ]
        assert {a.site_id for a in every} == {"SITE-A"}
        assert [a.alert_id for a in await alerts.list_alerts(conn, study_id="S1")] == [
            p1_alert,
            p2_alert,
        ]
        assert await alerts.list_alerts(conn, study_id="S2") == []
        assert [a.alert_id for a in await alerts.list_alerts(conn, states=["open"])] == [p1_alert]
        assert [a.alert_id for a in await alerts.list_alerts(conn, states=["acknowledged"])] == [
            p2_alert
        ]
        (one,) = await alerts.list_alerts(conn, alert_id=p2_alert, study_id="S1")
        assert (one.participant_id, one.state, one.rule_name) == ("P2", "acknowledged", "hr-high")
