"""Alerts through the real gateway: a signed envelope of out-of-range heart rates over
Mosquitto raises one alert, one feed event, and one message on dct/v1/alerts/S1."""

from __future__ import annotations

import json
import time

from gateway.broker import MosquittoBroker
from ingest.envelope import seal
from ingest.model import Payload, Reading
from ingest.pipeline import up_topic
from ingest.receipts import RECEIPT_ACCEPTED, open_receipt
from storage import alerts, db
from tests.alerts.test_engine import rows
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.mqtt import MqttProbe
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until


async def test_out_of_range_envelope_raises_one_alert_event_and_mqtt_message(
    trial: Trial, gateway: RunningGateway, mosquitto: MosquittoBroker
) -> None:
    async with db.connection(trial.url) as conn:
        rule = await alerts.add_rule(
            conn,
            study_id="S1",
            name="hr-high",
            metric="heart_rate",
            high=120.0,
            sustained_s=3,
            created_by="tester",
        )
        await conn.commit()
    probe = MqttProbe(mosquitto, "alert-probe")
    try:
        probe.subscribe("dct/v1/alerts/#")
        probe.subscribe("dct/v1/+/down")
        hub = trial.hubs["hub-1"]
        t0 = int(time.time() * 1000) - 60_000
        readings = tuple(
            Reading(t0 + i * 1000, "heart_rate", 150.0, "/min", "strap") for i in range(5)
        )
        payload = Payload(dev=hub.device_id, seq=1, sent_ms=t0 + 5000, readings=readings)
        probe.publish(up_topic(hub.device_id), seal(payload, hub.key))
        got: dict[str, list[bytes]] = {}
        while not ({"dct/v1/alerts/S1", "dct/v1/hub-1/down"} <= got.keys()):
            topic, data = await probe.next()
            got.setdefault(topic, []).append(data)
    finally:
        probe.close()
    receipt = open_receipt(got["dct/v1/hub-1/down"][0], gateway.receipt_public_key)
    assert (receipt.status, receipt.stored) == (RECEIPT_ACCEPTED, 5)
    assert await rows(
        trial.url,
        "SELECT rule_id, participant_id, state, extract(epoch FROM first_time)"
        " * 1000, extract(epoch FROM condition_time) * 1000 FROM alerts",
    ) == [(rule.rule_id, "P1", "open", t0, t0 + 3000)]
    events = await rows(trial.url, "SELECT event_id, alert_id, event FROM alert_events")
    assert [e[2] for e in events] == ["opened"]
    (message,) = [json.loads(m) for m in got["dct/v1/alerts/S1"]]
    assert (message["event_id"], message["alert_id"], message["event"]) == events[0]
    assert (message["study_id"], message["site_id"], message["participant_id"]) == (
        "S1",
        "SITE-A",
        "P1",
    )
    assert message["rule_id"] == rule.rule_id
    # No reading value: none of the detail's values is the reading's (its times may hold
    # the digits "150" by chance, as in "...10.015000").
    assert 150 not in message["detail"].values()
    assert not any("150" in str(v) for k, v in message["detail"].items() if "time" not in k)

    async def outbox_empty() -> bool:
        return await rows(trial.url, "SELECT count(*) FROM alert_outbox") == [(0,)]

    await wait_until(outbox_empty, "the published event leaving the outbox")
