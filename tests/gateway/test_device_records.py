"""A glucose meter's stored records are stored once, through the real gateway: a hub that
asks the meter for everything again (a restart without its cursor, a replacement hub) gets
``duplicate_record`` for what the participant already has, and only new records are kept."""

from __future__ import annotations

import time

from ingest.envelope import seal
from ingest.model import Payload, Reading
from tests.alerts.test_engine import rows
from tests.fixtures.trial import Trial
from tests.fixtures.uplink import Uplink

T = int(time.time() * 1000) - 3_600_000


def record(n: int, value: float) -> Reading:
    t = T + n * 60_000
    return Reading(t, "glucose", value, "mg/dL", "meter", ("location_finger",), None, f"g:{n}:{t}")


async def test_a_meter_read_again_stores_only_its_new_records(trial: Trial, uplink: Uplink) -> None:
    first = Payload("hub-1", 1, T + 600_000, (record(1, 98.0), record(2, 131.0)))
    data = seal(first, trial.hubs["hub-1"].key)
    receipt = await uplink.send(first, data)
    assert (receipt.stored, receipt.refused) == (2, 0)
    # The hub restarted without its cursor: everything again, and one new record.
    again = Payload("hub-1", 2, T + 700_000, (record(1, 98.0), record(2, 131.0), record(3, 87.0)))
    receipt = await uplink.send(again)
    assert (receipt.stored, receipt.refused) == (1, 2)
    assert await rows(trial.url, "SELECT value FROM readings ORDER BY time") == [
        (98.0,),
        (131.0,),
        (87.0,),
    ]
    assert await rows(
        trial.url, "SELECT seq, reason, metric, reading_count FROM rejections ORDER BY seq"
    ) == [(2, "duplicate_record", "glucose", 2)]
    # The envelope row and a replay of it say what was stored.
    assert await rows(
        trial.url, "SELECT seq, stored_count, refused_count FROM envelopes ORDER BY seq"
    ) == [
        (1, 2, 0),
        (2, 1, 2),
    ]
    receipt = await uplink.send(first, data)
    assert (receipt.stored, receipt.refused) == (2, 0)
    assert await rows(trial.url, "SELECT count(*) FROM rejections") == [(1,)]
    assert await rows(
        trial.url, "SELECT record_key, seq FROM device_records ORDER BY record_key"
    ) == [(record(1, 0).record, 1), (record(2, 0).record, 1), (record(3, 0).record, 2)]


async def test_two_copies_in_one_envelope_store_one(trial: Trial, uplink: Uplink) -> None:
    payload = Payload("hub-1", 1, T + 600_000, (record(5, 110.0), record(5, 110.0)))
    receipt = await uplink.send(payload)
    assert (receipt.stored, receipt.refused) == (1, 1)
    assert await rows(trial.url, "SELECT count(*) FROM readings") == [(1,)]


async def test_readings_without_a_record_key_are_never_deduplicated(
    trial: Trial, uplink: Uplink
) -> None:
    """Two equal heart rates at the same time are two readings: only records are keyed."""
    beat = Reading(T, "heart_rate", 70.0, "/min", "strap")
    receipt = await uplink.send(Payload("hub-1", 1, T + 1000, (beat, beat)))
    assert (receipt.stored, receipt.refused) == (2, 0)


async def test_a_records_context_readings_are_each_stored_once(
    trial: Trial, uplink: Uplink
) -> None:
    """A record gives readings of several metrics under one key: each is stored once."""
    glucose = record(7, 140.0)
    carbs = Reading(glucose.t_ms, "carbohydrate_intake", 45.0, "g", "meter", record=glucose.record)
    receipt = await uplink.send(Payload("hub-1", 1, T + 600_000, (glucose, carbs)))
    assert (receipt.stored, receipt.refused) == (2, 0)
    receipt = await uplink.send(Payload("hub-1", 2, T + 700_000, (glucose, carbs)))
    assert (receipt.stored, receipt.refused) == (0, 2)
    assert await rows(trial.url, "SELECT metric FROM readings ORDER BY metric") == [
        ("carbohydrate_intake",),
        ("glucose",),
    ]
