"""Read queries behind the pages: hourly rollups kept up to date incrementally in plain mode,
reading windows and gaps with what the device said about each reading, and the live view's
incremental polls."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ingest.model import AcceptedEnvelope, Batch, Reading, SensorReport
from storage import db, deltas, partitions, reading_views, rollups
from storage.migrate import StorageMode
from storage.timeconv import from_ms, to_ms
from storage.writer import BulkWriter
from tests.fixtures.postgres import database_mode, ensure_test_partitions
from tests.fixtures.trial import Trial
from tests.web.conftest import Web


async def store(
    trial: Trial,
    rows: list[tuple[datetime, float]],
    received: datetime,
    *,
    flags: list[str] | None = None,
    device_user: int | None = None,
) -> None:
    """One envelope of heart rate from hub-1, received at ``received``; every reading carries
    ``flags`` and ``device_user`` (NULL: the device said nothing)."""
    async with db.connection(trial.url) as conn, conn.transaction():
        seq = int(received.timestamp() * 1000)
        await conn.execute(
            "INSERT INTO envelopes (device_id, seq, participant_id, sent_at, received_at,"
            " envelope_sha256, reading_count, stored_count, refused_count)"
            " VALUES ('hub-1', %s, 'P1', %s, %s, '\\x00', %s, %s, 0)",
            (seq, received, received, len(rows), len(rows)),
        )
        for t, v in rows:
            await conn.execute(
                "INSERT INTO readings (time, participant_id, metric, value, unit, device_id, seq,"
                " sensor, received_at, flags, device_user) VALUES (%s, 'P1', 'heart_rate', %s,"
                " '/min', 'hub-1', %s, 's', %s, %s, %s)",
                (t, v, seq, received, flags, device_user),
            )
        # As the gateway's writer does in the same transaction (plain mode).
        await deltas.add(
            conn,
            StorageMode.PLAIN,
            [("P1", [Reading(to_ms(t), "heart_rate", v, "/min", "s") for t, v in rows])],
        )


@pytest.mark.plain_only("plain mode's rollup refresh: TimescaleDB keeps a continuous aggregate")
async def test_rollups_merge_what_each_batch_added_into_its_hours(trial: Trial) -> None:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    now = datetime.now(UTC)
    async with db.connection(trial.url) as conn, conn.transaction():
        await ensure_test_partitions(
            conn, {partitions.partition_start_ms(to_ms(hour)), *partitions.ahead(to_ms(now))}
        )
    await store(
        trial, [(hour + timedelta(minutes=1), 60.0), (hour + timedelta(minutes=2), 80.0)], now
    )
    async with db.connection(trial.url) as conn:
        assert await rollups.refresh_rollups(conn, StorageMode.PLAIN) == 1
        (row,) = await rollups.hourly(conn, "P1", hour - timedelta(hours=1))
        assert (row.bucket, row.n, row.mean, row.min, row.max) == (hour, 2, 70.0, 60.0, 80.0)
        # Nothing new: nothing updated, same result.
        assert await rollups.refresh_rollups(conn, StorageMode.PLAIN) == 0
        assert await rollups.hourly(conn, "P1", hour - timedelta(hours=1)) == [row]
    # A late reading of the same hour, and one of the next hour, arrive later.
    later = datetime.now(UTC)
    await store(
        trial, [(hour + timedelta(minutes=30), 100.0), (hour + timedelta(hours=1), 90.0)], later
    )
    async with db.connection(trial.url) as conn:
        assert await rollups.refresh_rollups(conn, StorageMode.PLAIN) == 2
        got = await rollups.hourly(conn, "P1", hour)
    assert [(r.bucket, r.n, r.mean, r.max) for r in got] == [
        (hour, 3, 80.0, 100.0),
        (hour + timedelta(hours=1), 1, 90.0, 90.0),
    ]


async def test_reading_window_and_gaps_are_the_participants_own(trial: Trial) -> None:
    now = datetime.now(UTC)
    async with db.connection(trial.url) as conn, conn.transaction():
        await ensure_test_partitions(
            conn, {partitions.partition_start_ms(to_ms(now - timedelta(hours=1)))}
        )
    await store(
        trial, [(now - timedelta(minutes=20), 61.0), (now - timedelta(minutes=2), 62.0)], now
    )
    async with db.connection(trial.url) as conn:
        rows = await reading_views.readings_window(conn, "P1", now - timedelta(minutes=10))
        assert [r.value for r in rows] == [62.0]
        assert await reading_views.readings_window(conn, "P2", now - timedelta(hours=1)) == []
        assert (
            await reading_views.readings_window(
                conn, "P1", now - timedelta(hours=1), metrics=["spo2"]
            )
            == []
        )


async def test_a_poll_with_received_after_answers_only_what_arrived_since(trial: Trial) -> None:
    now = datetime.now(UTC)
    async with db.connection(trial.url) as conn, conn.transaction():
        await ensure_test_partitions(conn, {partitions.partition_start_ms(to_ms(now))})
    first = now - timedelta(seconds=30)
    await store(trial, [(now - timedelta(minutes=5), 61.0)], first)
    # Measured earlier than the first reading but received later (a hub catching up).
    await store(trial, [(now - timedelta(minutes=6), 62.0), (now, 63.0)], now)
    async with db.connection(trial.url) as conn:
        since = now - timedelta(minutes=10)
        everything = await reading_views.readings_window(conn, "P1", since)
        assert [r.value for r in everything] == [62.0, 61.0, 63.0]
        newer = await reading_views.readings_window(conn, "P1", since, received_after=first)
        assert [r.value for r in newer] == [62.0, 63.0]
        assert await reading_views.readings_window(conn, "P1", since, received_after=now) == []


async def test_the_live_view_api_hands_out_a_cursor_that_overlaps_the_commit_delay(
    web: Web,
) -> None:
    trial = web.trial
    now = datetime.now(UTC)
    async with db.connection(trial.url) as conn, conn.transaction():
        await ensure_test_partitions(conn, {partitions.partition_start_ms(to_ms(now))})
    path = "/api/v1/participants/P1/readings?minutes=10"
    await store(trial, [(now - timedelta(minutes=1), 70.0)], now - timedelta(minutes=2))

    resp = await web.call("clinician", "GET", path)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert [r["value"] for r in body["readings"]] == [70.0]
    cursor = body["cursor"]
    assert abs(cursor - (to_ms(now) - reading_views.RECEIVED_OVERLAP_MS)) < 5_000

    # A batch received just before the poll but committed after it is still in the next.
    await store(trial, [(now, 71.0)], now - timedelta(seconds=1))
    resp = await web.call("clinician", "GET", f"{path}&received_after={cursor}")
    assert [r["value"] for r in (await resp.json())["readings"]] == [71.0]

    for bad in ("-1", "soon", "253402300800000"):
        resp = await web.call("clinician", "GET", f"{path}&received_after={bad}")
        assert resp.status == 400, bad
        assert (await resp.json())["field"] == "received_after"


async def test_each_reading_comes_with_the_flags_and_user_its_device_stated(
    trial: Trial,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    async with db.connection(trial.url) as conn, conn.transaction():
        await ensure_test_partitions(conn, {partitions.partition_start_ms(to_ms(now))})
    t = [now - timedelta(seconds=s) for s in (40, 30, 20, 10)]
    await store(trial, [(t[0], 70.0)], now - timedelta(seconds=4))
    await store(
        trial,
        [(t[1], 71.0)],
        now - timedelta(seconds=3),
        flags=["body_movement", "poor_signal"],
        device_user=2,
    )
    await store(trial, [(t[2], 0.0)], now - timedelta(seconds=2), flags=["no_sensor_contact"])
    await store(trial, [(t[3], 72.0)], now - timedelta(seconds=1), flags=["location_finger"])
    async with db.connection(trial.url) as conn:
        window = await reading_views.readings_window(conn, "P1", now - timedelta(minutes=1))
        received = await reading_views.readings_received(
            conn, ["P1"], ["heart_rate"], now - timedelta(minutes=1), now - timedelta(seconds=5)
        )
    assert [(r.time, r.value, r.flags, r.device_user) for r in window] == [
        (t[0], 70.0, [], None),
        (t[1], 71.0, ["body_movement", "poor_signal"], 2),
        (t[2], 0.0, ["no_sensor_contact"], None),
        (t[3], 72.0, ["location_finger"], None),
    ]
    assert [
        (r.participant_id, r.received_at, r.value, r.flags, r.device_user) for r in received
    ] == [
        ("P1", now - timedelta(seconds=4), 70.0, [], None),
        ("P1", now - timedelta(seconds=3), 71.0, ["body_movement", "poor_signal"], 2),
        ("P1", now - timedelta(seconds=2), 0.0, ["no_sensor_contact"], None),
        ("P1", now - timedelta(seconds=1), 72.0, ["location_finger"], None),
    ]


async def test_the_readings_api_says_what_the_device_said_and_how_much_it_doubted_it(
    web: Web,
) -> None:
    trial = web.trial
    now = datetime.now(UTC).replace(microsecond=0)
    async with db.connection(trial.url) as conn, conn.transaction():
        await ensure_test_partitions(conn, {partitions.partition_start_ms(to_ms(now))})
    t = [now - timedelta(seconds=s) for s in (40, 30, 20, 10)]
    await store(trial, [(t[0], 70.0)], now - timedelta(seconds=4))
    await store(
        trial,
        [(t[1], 71.0)],
        now - timedelta(seconds=3),
        flags=["body_movement", "poor_signal"],
        device_user=2,
    )
    # Invalid outranks the info flag beside it.
    await store(
        trial,
        [(t[2], 30.0)],
        now - timedelta(seconds=2),
        flags=["no_sensor_contact", "site_armpit"],
    )
    # A code outside the registry is context: info.
    await store(trial, [(t[3], 72.0)], now - timedelta(seconds=1), flags=["zz_future_code"])

    resp = await web.call("clinician", "GET", "/api/v1/participants/P1/readings?minutes=10")
    assert resp.status == 200, await resp.text()
    common = {"metric": "heart_rate", "unit": "/min", "device_id": "hub-1", "sensor": "s"}
    assert (await resp.json())["readings"] == [
        {
            "t": to_ms(t[0]),
            "value": 70.0,
            **common,
            "flags": [],
            "quality": None,
            "device_user": None,
        },
        {
            "t": to_ms(t[1]),
            "value": 71.0,
            **common,
            "flags": ["body_movement", "poor_signal"],
            "quality": "questionable",
            "device_user": 2,
        },
        {
            "t": to_ms(t[2]),
            "value": 30.0,
            **common,
            "flags": ["no_sensor_contact", "site_armpit"],
            "quality": "invalid",
            "device_user": None,
        },
        {
            "t": to_ms(t[3]),
            "value": 72.0,
            **common,
            "flags": ["zz_future_code"],
            "quality": "info",
            "device_user": None,
        },
    ]


async def test_the_participant_api_lists_which_wearable_described_how_from_when_to_when(
    web: Web,
) -> None:
    """A strap replaced under the same sensor name: both straps, each with its span."""
    t1, t2 = to_ms(datetime.now(UTC) - timedelta(hours=2)), to_ms(datetime.now(UTC))
    strap_a = SensorReport("hr-strap", "Acme", "HRM-2", "S1", "1.0", "rev-B", 90)
    strap_b = SensorReport("hr-strap", None, "HRM-3", "S2", "2.0", None, 80)
    pool = await db.open_pool(web.trial.url, min_size=1, max_size=1)
    try:
        writer = BulkWriter(pool, database_mode(web.trial.url))
        for seq, sent, strap in ((1, t1, strap_a), (2, t2, strap_b), (3, t2 + 1, strap_b)):
            await writer.write(
                Batch(
                    (
                        AcceptedEnvelope(
                            "hub-1", seq, "P1", sent, bytes([seq]) * 32, 0, (), (), sensors=(strap,)
                        ),
                    ),
                    (),
                    t2 + 1000,
                )
            )
    finally:
        await pool.close()
    resp = await web.call("clinician", "GET", "/api/v1/participants/P1")
    assert resp.status == 200, await resp.text()
    swap = from_ms(t2).isoformat()
    assert (await resp.json())["sensor_history"] == [
        {
            "device_id": "hub-1",
            "sensor": "hr-strap",
            "manufacturer": "Acme",
            "model": "HRM-2",
            "serial": "S1",
            "firmware": "1.0",
            "hardware": "rev-B",
            "reported_at": from_ms(t1).isoformat(),
            "valid_from": None,
            "valid_to": swap,
        },
        {
            "device_id": "hub-1",
            "sensor": "hr-strap",
            "manufacturer": None,
            "model": "HRM-3",
            "serial": "S2",
            "firmware": "2.0",
            "hardware": None,
            "reported_at": swap,
            "valid_from": swap,
            "valid_to": None,
        },
    ]
    # A participant of the same study sees none of it.
    assert (await web.call("other_participant", "GET", "/api/v1/participants/P1")).status == 404
