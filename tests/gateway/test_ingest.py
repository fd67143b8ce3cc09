"""Envelopes through a real broker into the gateway: stored once, receipted, or rejected with
a reason on record."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Sequence

import pytest

from gateway.broker import MosquittoBroker
from ingest import keys
from ingest.envelope import MAX_ENVELOPE_BYTES, seal
from ingest.model import Payload, Reading, Receipt
from ingest.pipeline import down_topic, up_topic
from ingest.receipts import RECEIPT_ACCEPTED, RECEIPT_REJECTED, open_receipt
from storage import db, registry
from tests.fixtures.gateway import METRICS_HEADERS, RunningGateway
from tests.fixtures.mqtt import MqttProbe
from tests.fixtures.trial import Hub, Trial
from tests.fixtures.waiting import wait_until


def now_ms() -> int:
    return int(time.time() * 1000)


def hr_payload(
    dev: str,
    seq: int,
    n: int = 5,
    *,
    t0: int | None = None,
    value: float = 72.0,
    metric: str = "heart_rate",
    unit: str = "/min",
) -> Payload:
    t0 = t0 if t0 is not None else now_ms() - 60_000
    readings = tuple(Reading(t0 + i * 1000, metric, value, unit, "hr-strap") for i in range(n))
    return Payload(dev=dev, seq=seq, sent_ms=now_ms(), readings=readings)


@pytest.fixture
async def probe(mosquitto: MosquittoBroker, gateway: RunningGateway) -> AsyncIterator[MqttProbe]:
    p = MqttProbe(mosquitto, "test-probe")
    p.subscribe("dct/v1/+/down")
    yield p
    p.close()


async def receipt(probe: MqttProbe, gateway: RunningGateway) -> tuple[str, Receipt]:
    topic, data = await probe.next()
    return topic, open_receipt(data, gateway.receipt_public_key)


async def rows(url: str, query: str) -> Sequence[tuple[object, ...]]:
    async with db.connection(url) as conn:
        cur = await conn.execute(query.encode())
        return await cur.fetchall()


async def test_envelope_is_stored_once_and_receipted_after_commit(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    hub = trial.hubs["hub-1"]
    data = seal(hr_payload(hub.device_id, 1), hub.key)
    probe.publish(up_topic(hub.device_id), data)
    topic, r = await receipt(probe, gateway)
    assert topic == down_topic(hub.device_id)
    assert (r.dev, r.seq, r.status, r.stored, r.refused) == ("hub-1", 1, RECEIPT_ACCEPTED, 5, 0)
    stored = await rows(
        trial.url,
        "SELECT participant_id, metric, value, unit, seq, consent_id IS NOT NULL FROM readings",
    )
    assert stored == [("P1", "heart_rate", 72.0, "/min", 1, True)] * 5

    # A republish of the same envelope is receipted again and not stored twice.
    probe.publish(up_topic(hub.device_id), data)
    _, again = await receipt(probe, gateway)
    assert (again.seq, again.status, again.stored) == (1, RECEIPT_ACCEPTED, 5)
    assert await rows(trial.url, "SELECT count(*) FROM readings") == [(5,)]
    assert gateway.consumer.stats.envelopes_replayed == 1


async def assert_rejected(
    trial: Trial,
    gateway: RunningGateway,
    probe: MqttProbe,
    topic: str,
    data: bytes,
    reason: str,
    *,
    receipted: bool = True,
) -> None:
    probe.publish(topic, data)
    if receipted:
        _, r = await receipt(probe, gateway)
        assert (r.status, r.reason) == (RECEIPT_REJECTED, reason)
    else:
        await wait_until(lambda: gateway.consumer.stats.rejected_envelopes[reason] > 0, reason)
    assert await rows(trial.url, "SELECT reason FROM rejections") == [(reason,)]
    assert await rows(trial.url, "SELECT count(*) FROM readings") == [(0,)]


async def test_signature_from_another_devices_key_is_rejected(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    await trial.add_participant("P2", "hub-2")
    forged = seal(hr_payload("hub-1", 1), trial.hubs["hub-2"].key)
    await assert_rejected(trial, gateway, probe, up_topic("hub-1"), forged, "bad_signature")


async def test_flipped_bit_in_payload_is_rejected(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    hub = trial.hubs["hub-1"]
    data = bytearray(seal(hr_payload(hub.device_id, 1), hub.key))
    data[len(data) // 2] ^= 0x01
    probe.publish(up_topic(hub.device_id), bytes(data))
    await wait_until(
        lambda: sum(gateway.consumer.stats.rejected_envelopes.values()) > 0, "rejection"
    )
    reasons = await rows(trial.url, "SELECT reason FROM rejections")
    assert reasons in ([("bad_signature",)], [("malformed",)])
    assert await rows(trial.url, "SELECT count(*) FROM readings") == [(0,)]


async def test_topic_of_one_device_carrying_another_is_rejected(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    await trial.add_participant("P2", "hub-2")
    hub2 = trial.hubs["hub-2"]
    data = seal(hr_payload(hub2.device_id, 1), hub2.key)
    await assert_rejected(
        trial, gateway, probe, up_topic("hub-1"), data, "topic_mismatch", receipted=False
    )


async def test_unknown_device_is_rejected(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    stranger = keys.generate_private_key()
    data = seal(hr_payload("hub-x", 1), stranger)
    await assert_rejected(trial, gateway, probe, up_topic("hub-x"), data, "unknown_device")


async def test_malformed_and_oversized_payloads_are_rejected(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    """Past the envelope bound but inside the broker's packet bound: refused by the gateway.
    (The broker refuses anything larger at the door: test_packets_past_the_bound_...)"""
    probe.publish(up_topic("hub-1"), b"\xff\x00 not cbor")
    probe.publish(up_topic("hub-1"), b"\x00" * (MAX_ENVELOPE_BYTES + 512))
    await wait_until(
        lambda: sum(gateway.consumer.stats.rejected_envelopes.values()) >= 2, "rejections"
    )
    reasons = await rows(
        trial.url, "SELECT reason, device_id FROM rejections ORDER BY rejection_id"
    )
    assert reasons == [("malformed", "hub-1"), ("too_large", "hub-1")]


async def test_readings_outside_consent_or_plausibility_are_refused_with_reasons(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    await trial.add_participant("P2", "hub-2", scopes=frozenset({"heart_rate"}))
    await trial.add_participant("P3", "hub-3", scopes=frozenset())
    hub2, hub3 = trial.hubs["hub-2"], trial.hubs["hub-3"]
    t = now_ms() - 60_000
    mixed = Payload(
        dev="hub-2",
        seq=1,
        sent_ms=now_ms(),
        readings=(
            Reading(t, "heart_rate", 70.0, "/min", "s"),  # stored
            Reading(t, "spo2", 97.0, "%", "s"),  # scope_not_consented
            Reading(t, "heart_rate", math.nan, "/min", "s"),  # implausible_value
            Reading(t, "heart_rate", math.inf, "/min", "s"),  # implausible_value
            Reading(4_070_908_800_000, "heart_rate", 70.0, "/min", "s"),  # 2099: implausible_time
            Reading(t, "heart_rate", 70.0, "bpm", "s"),  # wrong_unit
            Reading(t, "mood", 3.0, "1", "s"),  # unknown_metric
        ),
    )
    probe.publish(up_topic("hub-2"), seal(mixed, hub2.key))
    _, r = await receipt(probe, gateway)
    assert (r.status, r.stored, r.refused) == (RECEIPT_ACCEPTED, 1, 6)
    probe.publish(up_topic("hub-3"), seal(hr_payload("hub-3", 1, n=3), hub3.key))
    _, r3 = await receipt(probe, gateway)
    assert (r3.status, r3.stored, r3.refused) == (RECEIPT_ACCEPTED, 0, 3)
    got = await rows(
        trial.url,
        "SELECT device_id, reason, metric, reading_count FROM rejections"
        " ORDER BY device_id, reason, metric",
    )
    assert got == [
        ("hub-2", "implausible_time", "heart_rate", 1),
        ("hub-2", "implausible_value", "heart_rate", 2),
        ("hub-2", "scope_not_consented", "spo2", 1),
        ("hub-2", "unknown_metric", None, 1),
        ("hub-2", "wrong_unit", "heart_rate", 1),
        ("hub-3", "no_consent", "heart_rate", 3),
    ]
    assert await rows(trial.url, "SELECT device_id, count(*) FROM readings GROUP BY 1") == [
        ("hub-2", 1)
    ]


async def test_healthz_and_metrics(trial: Trial, gateway: RunningGateway, probe: MqttProbe) -> None:
    resp = await gateway.client.get("/healthz")
    body = await resp.json()
    assert resp.status == 200
    assert body["database"] is True
    assert body["mqtt"] is True
    hub: Hub = trial.hubs["hub-1"]
    probe.publish(up_topic(hub.device_id), seal(hr_payload(hub.device_id, 1), hub.key))
    await receipt(probe, gateway)
    text = await (await gateway.client.get("/metrics", headers=METRICS_HEADERS)).text()
    assert 'trialstream_readings_stored_total{worker="0"} 5' in text
    samples = _samples(text)
    assert samples['trialstream_batches_total{worker="0"}'] >= 1
    batch = "trialstream_batch_duration_seconds"
    for name, labels in (
        (batch, 'worker="0",phase="judge"'),
        (batch, 'worker="0",phase="store"'),
        (batch, 'worker="0",phase="finish"'),
        ("trialstream_receipt_duration_seconds", 'worker="0"'),
    ):
        count = samples[f"{name}_count{{{labels}}}"]
        assert count >= 1
        buckets = [v for k, v in samples.items() if k.startswith(f"{name}_bucket{{{labels},le=")]
        assert buckets == sorted(buckets)  # cumulative
        assert buckets[-1] == samples[f'{name}_bucket{{{labels},le="+Inf"}}'] == count
        assert samples[f"{name}_sum{{{labels}}}"] >= 0


def _samples(text: str) -> dict[str, float]:
    """Prometheus text as ``{"name{labels}": value}`` (comments left out)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def test_reused_seq_with_different_content_is_rejected_as_duplicate(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    hub = trial.hubs["hub-1"]
    probe.publish(up_topic(hub.device_id), seal(hr_payload(hub.device_id, 7), hub.key))
    _, first = await receipt(probe, gateway)
    assert first.status == RECEIPT_ACCEPTED
    probe.publish(up_topic(hub.device_id), seal(hr_payload(hub.device_id, 7, value=99.0), hub.key))
    _, second = await receipt(probe, gateway)
    assert (second.status, second.reason, second.refused) == (RECEIPT_REJECTED, "duplicate", 5)
    assert await rows(trial.url, "SELECT count(*), min(value) FROM readings") == [(5, 72.0)]
    assert await rows(trial.url, "SELECT reason FROM rejections") == [("duplicate",)]


async def test_revoked_device_is_rejected_from_its_next_envelope(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    hub = trial.hubs["hub-1"]
    probe.publish(up_topic(hub.device_id), seal(hr_payload(hub.device_id, 1), hub.key))
    assert (await receipt(probe, gateway))[1].status == RECEIPT_ACCEPTED
    async with db.connection(trial.url) as conn:
        assert await registry.revoke_device(conn, hub.device_id, "lost hub")
        await conn.commit()
    data = seal(hr_payload(hub.device_id, 2), hub.key)
    probe.publish(up_topic(hub.device_id), data)
    _, r = await receipt(probe, gateway)
    assert (r.status, r.reason) == (RECEIPT_REJECTED, "device_revoked")
    assert await rows(trial.url, "SELECT count(*) FROM readings") == [(5,)]


async def test_a_device_key_changed_between_batches_is_the_one_that_counts(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    """The consumer checks signatures while a batch fills, with the key each device had in
    an earlier batch; the batch's fresh device read decides which check counts. The key is
    replaced in the database here as an operator re-keying the device would."""
    hub = trial.hubs["hub-1"]
    probe.publish(up_topic(hub.device_id), seal(hr_payload(hub.device_id, 1), hub.key))
    assert (await receipt(probe, gateway))[1].status == RECEIPT_ACCEPTED
    assert hub.device_id in gateway.consumer._known_keys
    new_key = keys.generate_private_key()
    async with db.connection(trial.url) as conn:
        await conn.execute(
            "UPDATE devices SET public_key = %s, key_fingerprint = %s WHERE device_id = %s",
            (
                keys.public_key_to_der(new_key.public_key()),
                keys.fingerprint(new_key.public_key()),
                hub.device_id,
            ),
        )
        await conn.commit()
    # Signed with the old key: checked ahead with it (and valid), refused all the same.
    probe.publish(up_topic(hub.device_id), seal(hr_payload(hub.device_id, 2), hub.key))
    _, r = await receipt(probe, gateway)
    assert (r.seq, r.status, r.reason) == (2, RECEIPT_REJECTED, "bad_signature")
    # Signed with the new key: the check ahead (old key) failed, the record's key verifies.
    probe.publish(up_topic(hub.device_id), seal(hr_payload(hub.device_id, 3), new_key))
    _, r = await receipt(probe, gateway)
    assert (r.seq, r.status) == (3, RECEIPT_ACCEPTED)
    assert await rows(trial.url, "SELECT count(*) FROM readings") == [(10,)]


async def test_packets_past_the_bound_are_refused_by_the_broker(
    trial: Trial, gateway: RunningGateway, mosquitto: MosquittoBroker
) -> None:
    """A publish far over the envelope bound never reaches a gateway: Mosquitto's
    max_packet_size disconnects the sender, and the gateway holds nothing of it."""
    flooder = MqttProbe(mosquitto, "flooder")
    reasons: list[str] = []
    flooder.client.on_disconnect = lambda _c, _u, _f, reason, _p: reasons.append(str(reason))
    try:
        info = flooder.client.publish(up_topic("hub-1"), b"\x00" * (300 * 1024), qos=1)
        await wait_until(lambda: bool(reasons), "the broker's disconnect")
        assert reasons[0] == "Packet too large"
        assert not info.is_published()
    finally:
        flooder.close()
    assert gateway.consumer.stats.messages == 0
    assert await rows(trial.url, "SELECT count(*) FROM rejections") == [(0,)]
