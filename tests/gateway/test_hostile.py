"""Hostile and broken envelopes through a real broker into the gateway and PostgreSQL: each
ends as a rejection row with its reason, and the next valid envelope is still stored.

Each case publishes the bad message first and a valid envelope of another hub after it: the
valid one's receipt proves the consumer is alive and moved past the bad one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.broker import MosquittoBroker
from gateway.storing import POISON_AFTER
from ingest.envelope import seal
from ingest.model import Gap, Payload, Reading, Receipt
from ingest.pipeline import up_topic
from ingest.receipts import RECEIPT_ACCEPTED, RECEIPT_REJECTED, open_receipt
from storage import db
from tests.fixtures.envelopes import payload_obj, raw_sign1
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.mqtt import MqttProbe
from tests.fixtures.refusals import refuse_rows
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until

FAR = 2**62  # milliseconds: some 146 million years from now


def now_ms() -> int:
    return int(time.time() * 1000)


def reading(t: int, *, sensor: str = "hr-strap") -> list[Any]:
    return [t, "heart_rate", 72.0, "/min", sensor]


@pytest.fixture
async def probe(mosquitto: MosquittoBroker, gateway: RunningGateway) -> AsyncIterator[MqttProbe]:
    p = MqttProbe(mosquitto, "hostile-probe")
    p.subscribe("dct/v1/+/down")
    yield p
    p.close()


@pytest.fixture
async def hubs(trial: Trial) -> Trial:
    await trial.add_participant("P2", "hub-2")
    return trial


async def receipts(
    probe: MqttProbe, gateway: RunningGateway, n: int
) -> dict[tuple[str, int], Receipt]:
    out: dict[tuple[str, int], Receipt] = {}
    for _ in range(n):
        _, data = await probe.next()
        r = open_receipt(data, gateway.receipt_public_key)
        out[(r.dev, r.seq)] = r
    return out


async def rows(url: str, query: str) -> Sequence[tuple[object, ...]]:
    async with db.connection(url) as conn:
        cur = await conn.execute(query.encode())
        return await cur.fetchall()


async def send_then_valid(
    hubs: Trial, gateway: RunningGateway, probe: MqttProbe, bad: bytes, *, receipted: bool = True
) -> dict[tuple[str, int], Receipt]:
    """Publish ``bad`` as hub-1, then a valid envelope of hub-2; both receipts (or only the
    valid one's) by (device, seq). The valid envelope's five readings are stored."""
    probe.publish(up_topic("hub-1"), bad)
    hub2 = hubs.hubs["hub-2"]
    t = now_ms() - 60_000
    readings = tuple(Reading(t + i, "heart_rate", 70.0, "/min", "s") for i in range(5))
    valid = Payload("hub-2", 1, now_ms(), readings)
    probe.publish(up_topic("hub-2"), seal(valid, hub2.key))
    got = await receipts(probe, gateway, 2 if receipted else 1)
    assert got[("hub-2", 1)].status == RECEIPT_ACCEPTED
    assert await rows(hubs.url, "SELECT count(*) FROM readings WHERE device_id = 'hub-2'") == [(5,)]
    return got


async def test_one_bit_flipped_into_a_far_reading_time_is_refused_and_ingestion_goes_on(
    hubs: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    """The demo's failure: a flipped bit breaks the signature and moves a reading time to the
    year 10946; its rejection row once could not be written, which stopped the consumer."""
    t = now_ms() - 1000
    year_10946 = 283_250_000_000_000
    signed = raw_sign1(payload_obj("hub-1", 1, [reading(t)], sent=t), hubs.hubs["hub-1"].key)
    good_t = t.to_bytes(8, "big")
    assert signed.count(b"\x1b" + good_t) == 2  # sent and the reading time
    at = signed.rindex(b"\x1b" + good_t) + 1
    flipped = signed[:at] + year_10946.to_bytes(8, "big") + signed[at + 8 :]
    got = await send_then_valid(hubs, gateway, probe, flipped)
    assert (got[("hub-1", 1)].status, got[("hub-1", 1)].reason) == (
        RECEIPT_REJECTED,
        "bad_signature",
    )
    assert await rows(hubs.url, "SELECT reason, first_ms, last_ms, first_time FROM rejections") == [
        ("bad_signature", year_10946, year_10946, None)
    ]


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
async def test_a_reading_at_2_to_the_62_is_refused(
    hubs: Trial, gateway: RunningGateway, probe: MqttProbe, signed: bool
) -> None:
    t = now_ms() - 1000
    key = hubs.hubs["hub-1" if signed else "hub-2"].key
    data = raw_sign1(payload_obj("hub-1", 1, [reading(t), reading(FAR)], sent=t), key)
    got = await send_then_valid(hubs, gateway, probe, data)
    if signed:
        # The plausible reading is stored; the far one is refused on its own.
        assert (got[("hub-1", 1)].status, got[("hub-1", 1)].refused) == (RECEIPT_ACCEPTED, 1)
        expected = [("implausible_time", 1, FAR, FAR)]
    else:
        assert got[("hub-1", 1)].reason == "bad_signature"
        expected = [("bad_signature", 2, t, FAR)]
    assert (
        await rows(hubs.url, "SELECT reason, reading_count, first_ms, last_ms FROM rejections")
        == expected
    )


async def test_sent_at_2_to_the_62_refuses_the_envelope(
    hubs: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    t = now_ms() - 1000
    data = raw_sign1(payload_obj("hub-1", 1, [reading(t)], sent=FAR), hubs.hubs["hub-1"].key)
    got = await send_then_valid(hubs, gateway, probe, data)
    assert (got[("hub-1", 1)].status, got[("hub-1", 1)].reason) == (
        RECEIPT_REJECTED,
        "implausible_time",
    )
    assert await rows(hubs.url, "SELECT reason, reading_count, detail FROM rejections") == [
        ("implausible_time", 1, "sent time is in the future")
    ]


async def test_a_gap_at_2_to_the_62_is_refused_and_its_readings_kept(
    hubs: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    t = now_ms() - 1000
    obj = payload_obj("hub-1", 1, [reading(t)], sent=t, gaps=[[t, FAR, "out_of_range"]])
    got = await send_then_valid(hubs, gateway, probe, raw_sign1(obj, hubs.hubs["hub-1"].key))
    assert (got[("hub-1", 1)].status, got[("hub-1", 1)].stored) == (RECEIPT_ACCEPTED, 1)
    assert await rows(
        hubs.url, "SELECT reason, reading_count, first_ms, last_ms, metric FROM rejections"
    ) == [("implausible_time", 0, t, FAR, None)]
    assert await rows(hubs.url, "SELECT count(*) FROM gaps") == [(0,)]


@pytest.mark.parametrize(
    "where",
    ["gap_reason", "sensor_report", "reading_sensor", "reading_sensor_c1", "metric_escape"],
)
async def test_control_characters_in_text_are_malformed(
    hubs: Trial, gateway: RunningGateway, probe: MqttProbe, where: str
) -> None:
    t = now_ms() - 1000
    readings = [reading(t)]
    gaps: list[list[Any]] = []
    sensors = None
    if where == "gap_reason":
        gaps = [[t - 5000, t - 1000, "out\x00of_range"]]
    elif where == "sensor_report":
        sensors = [["hr-strap", "Acme\x00", None, None, None, None, 90]]
    elif where == "reading_sensor":
        readings = [reading(t, sensor="hr\x00strap")]
    elif where == "reading_sensor_c1":
        readings = [reading(t, sensor="hr\x85strap")]
    else:
        readings = [[t, "heart_rate\x1b", 72.0, "/min", "hr-strap"]]
    obj = payload_obj("hub-1", 1, readings, sent=t, gaps=gaps, sensors=sensors)
    # Refused while decoding, before its sequence number is known: no receipt to send.
    data = raw_sign1(obj, hubs.hubs["hub-1"].key)
    await send_then_valid(hubs, gateway, probe, data, receipted=False)
    ((reason, device, detail),) = await rows(
        hubs.url, "SELECT reason, device_id, detail FROM rejections"
    )
    assert (reason, device) == ("malformed", "hub-1")
    assert "control character" in str(detail)


# --- errors while storing: one envelope's failure never fails the others ---------------------


def with_gap(dev: str, seq: int, reason: str) -> Payload:
    t = now_ms() - 60_000
    return Payload(
        dev,
        seq,
        now_ms(),
        tuple(Reading(t + i, "heart_rate", 70.0, "/min", "s") for i in range(3)),
        (Gap(t - 10_000, t - 1000, reason),),
    )


@pytest.mark.parametrize(
    ("sqlstate", "reasons"),
    [("22023", {"storage_refused"}), ("XX000", {"storage_refused", "poison"})],
    ids=["content_error", "fault"],
)
async def test_an_envelope_the_database_refuses_is_left_out_and_the_batch_stored(
    hubs: Trial, gateway: RunningGateway, probe: MqttProbe, sqlstate: str, reasons: set[str]
) -> None:
    """A content error refuses its envelope at once; a fault (no cause in the data) refuses it
    when another envelope stored beside it, else after POISON_AFTER tries. Either way the
    other hub's envelope is stored and both are receipted."""
    await refuse_rows(hubs.url, "gaps", "NEW.reason = 'boom'", sqlstate)
    probe.publish(up_topic("hub-1"), seal(with_gap("hub-1", 1, "boom"), hubs.hubs["hub-1"].key))
    probe.publish(up_topic("hub-2"), seal(with_gap("hub-2", 1, "fine"), hubs.hubs["hub-2"].key))
    got = await receipts(probe, gateway, 2)
    bad, good = got[("hub-1", 1)], got[("hub-2", 1)]
    assert (good.status, good.stored) == (RECEIPT_ACCEPTED, 3)
    assert bad.status == RECEIPT_REJECTED
    assert bad.reason in reasons
    ((reason, count, detail),) = await rows(
        hubs.url, "SELECT reason, reading_count, detail FROM rejections"
    )
    assert (reason, count) == (bad.reason, 3)
    assert "refused for the test" in str(detail)
    assert await rows(hubs.url, "SELECT device_id, count(*) FROM readings GROUP BY 1") == [
        ("hub-2", 3)
    ]
    assert await rows(hubs.url, "SELECT count(*) FROM message_faults") == [(0,)]


async def test_a_fault_alone_is_held_then_refused_as_poison(
    hubs: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    await refuse_rows(hubs.url, "gaps", "NEW.reason = 'boom'", "XX000")
    poison = seal(with_gap("hub-1", 1, "boom"), hubs.hubs["hub-1"].key)
    probe.publish(up_topic("hub-1"), poison)
    (r,) = (await receipts(probe, gateway, 1)).values()
    assert (r.dev, r.status, r.reason) == ("hub-1", RECEIPT_REJECTED, "poison")
    assert gateway.consumer.stats.held_batches == POISON_AFTER
    assert await rows(hubs.url, "SELECT reason, device_id, seq FROM rejections") == [
        ("poison", "hub-1", 1)
    ]
    # Its count stays on record, and a copy (the hub republishing) is refused unread, at
    # once: no batch is held for it again.
    assert await rows(hubs.url, "SELECT attempts FROM message_faults") == [(POISON_AFTER,)]
    probe.publish(up_topic("hub-1"), poison)
    await wait_until(
        lambda: gateway.consumer.stats.rejected_envelopes["poison"] == 2, "the copy refused"
    )
    assert gateway.consumer.stats.held_batches == POISON_AFTER
    assert await rows(hubs.url, "SELECT detail FROM rejections WHERE seq IS NULL") == [
        ("a copy of a message refused as poison; not read",)
    ]
    probe.publish(up_topic("hub-1"), seal(with_gap("hub-1", 2, "fine"), hubs.hubs["hub-1"].key))
    (r,) = (await receipts(probe, gateway, 1)).values()
    assert (r.seq, r.status, r.stored) == (2, RECEIPT_ACCEPTED, 3)


async def test_a_rejection_row_the_database_refuses_is_stored_bare(
    hubs: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    """Even the row that records a refusal may be refused (here: any row naming a topic);
    its bare minimum (reason, digest, counts) is stored in its place."""
    await refuse_rows(hubs.url, "rejections", "NEW.topic <> ''", "22023")
    stranger = seal(
        Payload("hub-9", 1, now_ms(), (Reading(now_ms(), "heart_rate", 70.0, "/min", "s"),)),
        hubs.hubs["hub-1"].key,
    )
    probe.publish(up_topic("hub-9"), stranger)
    (r,) = (await receipts(probe, gateway, 1)).values()
    assert (r.dev, r.reason) == ("hub-9", "unknown_device")
    ((reason, dev, topic, detail),) = await rows(
        hubs.url, "SELECT reason, device_id, topic, detail FROM rejections"
    )
    assert (reason, dev, topic) == ("unknown_device", "hub-9", "")
    assert str(detail).startswith("row not stored as built:")
    assert "refused for the test" in str(detail)


@pytest.mark.parametrize("old", ["sent", "readings"])
async def test_a_replay_is_receipted_as_stored_after_the_window_moved(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe, old: str
) -> None:
    """A hub republishes an envelope until it has a receipt. Once stored, the same bytes are
    a replay, receipted with what was stored, even after the study's backfill horizon moved
    past its times (which would refuse it as new: ``implausible_time``)."""
    days_ago = datetime.now(UTC) - timedelta(days=3)
    hub = await trial.add_participant("P3", "hub-3", consent_at=days_ago, enrolled_at=days_ago)
    t = now_ms() - 36 * 3_600_000
    sent = t if old == "sent" else now_ms()
    data = raw_sign1(payload_obj("hub-3", 1, [reading(t)], sent=sent), hub.key, kid="hub-3")
    for replay in (False, True):
        if replay:
            async with db.connection(trial.url, autocommit=True) as conn:
                await conn.execute("UPDATE studies SET backfill_days = 1")
        probe.publish(up_topic("hub-3"), data)
        got = (await receipts(probe, gateway, 1))[("hub-3", 1)]
        assert (got.status, got.stored, got.refused, got.reason) == (RECEIPT_ACCEPTED, 1, 0, None)
    assert await rows(trial.url, "SELECT count(*) FROM rejections") == [(0,)]
    assert await rows(trial.url, "SELECT count(*) FROM readings") == [(1,)]
    assert gateway.consumer.stats.envelopes_replayed == 1
