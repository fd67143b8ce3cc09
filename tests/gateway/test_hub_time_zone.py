"""A hub's time zone (protocol v3) through the real gateway: a new zone becomes the
participant's from the time the hub first saw it, audited; a repeat adds nothing; a zone the
database does not know, or a time that cannot be, is refused with an audit record that says
why while the envelope's readings are stored all the same."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from device_drivers.hub_factory import open_hub
from ingest.envelope import seal
from ingest.model import Payload, Reading, ZoneReport
from storage import db, time_zones
from storage.timeconv import from_ms
from tests.alerts.test_engine import rows
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.hubs import enrolled_hub
from tests.fixtures.trial import Trial
from tests.fixtures.uplink import Uplink
from tests.fixtures.waiting import wait_until

T = int(time.time() * 1000) - 3_600_000
BEAT = Reading(T, "heart_rate", 70.0, "/min", "strap")

ZONES = "SELECT time_zone, valid_from, recorded_by FROM participant_time_zones ORDER BY valid_from"
AUDIT = (
    "SELECT action, actor, detail->>'time_zone', reason FROM audit_log"
    " WHERE action LIKE 'participant.time_zone%%' ORDER BY audit_id"
)


def payload(seq: int, zone: ZoneReport | None, *readings: Reading) -> Payload:
    return Payload("hub-1", seq, T + seq * 1000, readings or (BEAT,), zone=zone)


async def test_a_reported_zone_is_the_participants_from_its_time_and_a_repeat_adds_nothing(
    trial: Trial, uplink: Uplink
) -> None:
    berlin = ZoneReport("Europe/Berlin", T - 86_400_000)
    first = payload(1, berlin)
    data = seal(first, trial.hubs["hub-1"].key)
    receipt = await uplink.send(first, data)
    assert (receipt.status, receipt.stored) == ("accepted", 1)
    assert await rows(trial.url, ZONES) == [
        ("Europe/Berlin", from_ms(berlin.since_ms), "hub:hub-1")
    ]
    assert await rows(trial.url, AUDIT) == [
        ("participant.time_zone_reported", "hub:hub-1", "Europe/Berlin", None)
    ]
    # The participant's local days moved: their adherence is summed again.
    assert await rows(trial.url, "SELECT participant_id FROM adherence_rebuilds") == [("P1",)]
    # The same zone again (a hub that lost its outbox), and a replay: nothing more.
    await uplink.send(payload(2, ZoneReport("Europe/Berlin", T)))
    await uplink.send(first, data)
    # A move: from its own time on.
    await uplink.send(payload(3, ZoneReport("America/New_York", T)))
    assert await rows(trial.url, ZONES) == [
        ("Europe/Berlin", from_ms(berlin.since_ms), "hub:hub-1"),
        ("America/New_York", from_ms(T), "hub:hub-1"),
    ]
    assert len(await rows(trial.url, AUDIT)) == 2
    async with db.connection(trial.url) as conn:
        assert [p.time_zone for p in await time_zones.history(conn, "P1")] == [
            "Europe/Berlin",
            "America/New_York",
        ]
    assert await rows(trial.url, "SELECT count(*) FROM readings") == [(3,)]


async def test_utc_reported_for_a_participant_without_a_zone_adds_nothing(
    trial: Trial, uplink: Uplink
) -> None:
    await uplink.send(payload(1, ZoneReport("UTC", T)))
    await uplink.send(payload(2, ZoneReport("Etc/UTC", T)))
    assert await rows(trial.url, ZONES) == []


async def test_a_zone_a_person_set_at_the_same_time_is_kept(trial: Trial, uplink: Uplink) -> None:
    async with db.connection(trial.url, autocommit=True) as conn:
        await time_zones.set_time_zone(conn, "P1", "Asia/Kolkata", from_ms(T), actor="coordinator")
    await uplink.send(payload(1, ZoneReport("Europe/Paris", T)))
    assert await rows(trial.url, ZONES) == [("Asia/Kolkata", from_ms(T), "coordinator")]


@pytest.mark.parametrize(
    ("zone", "reason"),
    [
        pytest.param(
            ZoneReport("Mars/Olympus_Mons", T), "not an IANA time zone name", id="unknown-zone"
        ),
        pytest.param(
            ZoneReport("Europe/Berlin", T + 3_600_000), "later than the envelope", id="future"
        ),
        pytest.param(ZoneReport("Europe/Berlin", -1), "outside 1970-2099", id="before-1970"),
        pytest.param(ZoneReport("Europe/Berlin", -(2**63)), "outside 1970-2099", id="int64-min"),
    ],
)
async def test_a_zone_that_cannot_be_is_refused_on_record_and_the_readings_stored(
    trial: Trial, uplink: Uplink, zone: ZoneReport, reason: str
) -> None:
    receipt = await uplink.send(payload(1, zone))
    assert (receipt.status, receipt.stored) == ("accepted", 1)
    assert await rows(trial.url, ZONES) == []
    ((action, actor, name, why),) = await rows(trial.url, AUDIT)
    assert (action, actor, name) == ("participant.time_zone_refused", "hub:hub-1", zone.time_zone)
    assert reason in why


async def test_a_real_hub_says_its_zone_and_a_change_of_it(
    trial: Trial, gateway: RunningGateway, tmp_path: Path
) -> None:
    """The hub as `trialstream-hub run` builds it, its zone read from a setting the test
    changes, against the real broker and gateway."""
    identity = await enrolled_hub(trial, gateway, tmp_path / "hub")
    (participant,) = await rows(
        trial.url, "SELECT participant_id FROM devices WHERE device_id = %s", (identity.device_id,)
    )
    zone = ["Europe/Berlin"]
    async with contextlib.AsyncExitStack() as stack:
        parts = await open_hub(identity, stack, seal_max_age_s=0.2, time_zone=lambda: zone[0])
        task = asyncio.create_task(parts.hub.run())
        stack.push_async_callback(stopped, task)

        async def recorded() -> list[tuple[object, ...]]:
            return await rows(
                trial.url,
                "SELECT time_zone, recorded_by FROM participant_time_zones"
                " WHERE participant_id = %s ORDER BY valid_from",
                participant,
            )

        async def says(*expected: str) -> bool:
            return [z for z, _ in await recorded()] == list(expected)

        await wait_until(lambda: says("Europe/Berlin"), "the hub's zone recorded", within=15)
        zone[0] = "America/New_York"
        await parts.hub.sink.note_time_zone(zone[0])  # as its next look would
        await wait_until(
            lambda: says("Europe/Berlin", "America/New_York"), "the move recorded", within=15
        )
        assert {by for _, by in await recorded()} == {f"hub:{identity.device_id}"}


async def stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
