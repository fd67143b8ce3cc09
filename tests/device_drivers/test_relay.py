"""The hub relay against a real broker and gateway: every reading receipted exactly once,
across a broker killed with SIGKILL mid-stream; forged receipts change nothing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from device_drivers.outbox import Outbox
from device_drivers.relay import Relay, RelayConfig
from gateway.broker import MosquittoBroker
from ingest import keys
from ingest.model import Reading, Receipt
from ingest.receipts import RECEIPT_ACCEPTED, seal_receipt
from storage import db
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until


@dataclass
class RunningRelay:
    relay: Relay
    outbox: Outbox
    task: asyncio.Task[None]


@pytest.fixture
async def relay(
    trial: Trial, gateway: RunningGateway, mosquitto: MosquittoBroker, tmp_path: Path
) -> AsyncIterator[RunningRelay]:
    hub = trial.hubs["hub-1"]
    outbox = Outbox.open(tmp_path / "outbox.sqlite", hub.device_id)
    config = RelayConfig(
        hub.device_id,
        mosquitto.host,
        mosquitto.port,
        seal_max_readings=50,
        seal_max_age_s=0.2,
        resend_after_s=2.0,
        tick_s=0.05,
    )
    r = Relay(config, outbox, hub.key, gateway.receipt_public_key)
    task = asyncio.create_task(r.run(), name="test-relay")
    yield RunningRelay(r, outbox, task)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    outbox.close()


def readings(start: int, n: int) -> list[Reading]:
    t0 = int(time.time() * 1000) - 120_000
    return [
        Reading(t0 + (start + i) * 10, "heart_rate", 60.0 + i % 30, "/min", "hr") for i in range(n)
    ]


async def drained(outbox: Outbox, within: float = 60.0) -> None:
    def empty() -> bool:
        s = outbox.stats()
        return s.pending_readings == 0 and s.unreceipted_envelopes == 0

    await wait_until(empty, "outbox drained", within=within)


async def stored(url: str) -> tuple[int, int]:
    async with db.connection(url) as conn:
        cur = await conn.execute("SELECT count(*), count(DISTINCT (time, seq)) FROM readings")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def test_readings_are_receipted_and_leave_the_outbox(
    trial: Trial, relay: RunningRelay
) -> None:
    relay.outbox.add_readings(readings(0, 230))
    await drained(relay.outbox)
    assert await stored(trial.url) == (230, 230)
    assert relay.relay.stats.receipts_accepted == relay.outbox.stats().next_seq - 1
    assert relay.relay.stats.receipts_ignored == 0


@pytest.mark.slow
async def test_broker_killed_mid_stream_loses_and_duplicates_nothing(
    trial: Trial, relay: RunningRelay, mosquitto: MosquittoBroker
) -> None:
    produced = 0
    for step in range(40):
        relay.outbox.add_readings(readings(produced, 25))
        produced += 25
        if step == 10:
            mosquitto.kill()
        if step == 25:
            mosquitto.start()
        await asyncio.sleep(0.05)
    await drained(relay.outbox, within=90)
    assert await stored(trial.url) == (produced, produced)


async def test_forged_receipt_is_ignored(
    trial: Trial, gateway: RunningGateway, tmp_path: Path
) -> None:
    hub = trial.hubs["hub-1"]
    outbox = Outbox.open(tmp_path / "idle.sqlite", hub.device_id)
    idle = Relay(
        RelayConfig(hub.device_id, "127.0.0.1", 1), outbox, hub.key, gateway.receipt_public_key
    )
    outbox.add_readings(readings(0, 3))
    (sealed,) = outbox.seal_pending(hub.key, int(time.time() * 1000))
    at = int(time.time() * 1000)
    forged = seal_receipt(
        Receipt("hub-1", sealed.seq, RECEIPT_ACCEPTED, 3, 0, at), keys.generate_private_key()
    )
    await idle.apply_receipt(forged)
    assert idle.stats.receipts_ignored == 1
    assert outbox.stats().unreceipted_envelopes == 1
    gateway_key = keys.load_private_key(gateway.settings.gateway_key_path)
    other_device = seal_receipt(
        Receipt("hub-2", sealed.seq, RECEIPT_ACCEPTED, 3, 0, at), gateway_key
    )
    await idle.apply_receipt(other_device)
    assert idle.stats.receipts_ignored == 2
    assert outbox.stats().unreceipted_envelopes == 1
    genuine = seal_receipt(Receipt("hub-1", sealed.seq, RECEIPT_ACCEPTED, 3, 0, at), gateway_key)
    await idle.apply_receipt(genuine)
    assert idle.stats.receipts_accepted == 1
    assert outbox.stats().unreceipted_envelopes == 0
    outbox.close()


async def test_a_broker_with_several_addresses_is_reached_at_the_next_when_one_fails(
    trial: Trial, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """The first address refuses (nothing listens), the second is reached and takes an
    envelope; killed, the third is reached and the unreceipted envelope is sent there."""
    from gateway.broker import free_port
    from ingest.pipeline import up_topic
    from tests.fixtures.mqtt import MqttProbe

    third = MosquittoBroker(tmp_path / "third")
    third.start()
    probes = [MqttProbe(mosquitto, "probe-second"), MqttProbe(third, "probe-third")]
    for probe in probes:
        probe.subscribe(up_topic("hub-1"))
    hub = trial.hubs["hub-1"]
    outbox = Outbox.open(tmp_path / "outbox.sqlite", hub.device_id)
    config = RelayConfig(
        hub.device_id,
        "127.0.0.1",
        free_port(),
        seal_max_readings=5,
        seal_max_age_s=0.1,
        resend_after_s=1.0,
        tick_s=0.05,
        alternates=(("127.0.0.1", mosquitto.port), ("127.0.0.1", third.port)),
    )
    r = Relay(
        config,
        outbox,
        hub.key,
        hub.key.public_key(),
        configure_client=lambda c: c.reconnect_delay_set(1, 1),
    )
    task = asyncio.create_task(r.run(), name="test-relay-alternates")
    try:
        await wait_until(lambda: r.stats.connected, "connected at the second address")
        outbox.add_readings(readings(0, 5))
        topic, first = await probes[0].next()
        assert topic == up_topic("hub-1")
        mosquitto.kill()
        await wait_until(lambda: not r.stats.connected, "the second address lost")
        await wait_until(lambda: r.stats.connected, "connected at the third address")
        # Unreceipted (no gateway here), the envelope is sent again, now to the third.
        topic, again = await probes[1].next(within=30)
        assert (topic, again) == (up_topic("hub-1"), first)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for probe in probes:
            probe.close()
        outbox.close()
        third.kill()
