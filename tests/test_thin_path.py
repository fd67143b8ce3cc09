"""The whole path in one test: a virtual heart-rate strap on bumble, the hub's driver,
outbox and relay, a private Mosquitto, the gateway, and rows in ``readings``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from device_drivers.driver import WearableSession, WearableSpec
from device_drivers.hub import Hub, OutboxSink
from device_drivers.outbox import Outbox
from device_drivers.pairing import BleBackends
from device_drivers.relay import Relay, RelayConfig
from device_drivers.sim import HeartRateSignal, SimAdapter, VirtualHeartRateStrap, VirtualRadio
from gateway.broker import MosquittoBroker
from storage import db
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until


@pytest.fixture
async def radio() -> AsyncIterator[VirtualRadio]:
    async with VirtualRadio() as r:
        yield r


async def test_heart_rate_from_a_virtual_strap_reaches_the_readings_table(
    trial: Trial,
    gateway: RunningGateway,
    mosquitto: MosquittoBroker,
    radio: VirtualRadio,
    tmp_path: Path,
) -> None:
    hub_identity = trial.hubs["hub-1"]
    adapter = await SimAdapter.create(radio)
    async with VirtualHeartRateStrap("TS-HRM-0001", seed=11, rate_hz=4.0).running(radio) as strap:
        outbox = Outbox.open(tmp_path / "outbox.sqlite", hub_identity.device_id)
        sink = OutboxSink(outbox)
        session = WearableSession(
            WearableSpec(strap.address, "hr-strap-1"),
            sink,
            BleBackends(adapter.scanner_backend, adapter.client_backend),
        )
        relay = Relay(
            RelayConfig(
                hub_identity.device_id,
                mosquitto.host,
                mosquitto.port,
                seal_max_age_s=0.5,
                tick_s=0.05,
            ),
            outbox,
            hub_identity.key,
            gateway.receipt_public_key,
        )
        hub = Hub(relay, [session])
        task = asyncio.create_task(hub.run(), name="test-hub")
        try:
            await wait_until(lambda: session.stats.readings >= 8, "8 heart-rate notifications")
            await wait_until(lambda: relay.stats.receipts_accepted >= 2, "two receipts")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    async with db.connection(trial.url) as conn:
        cur = await conn.execute(
            "SELECT r.participant_id, r.unit, r.sensor, r.value, r.consent_id IS NOT NULL,"
            " e.device_id FROM readings r"
            " JOIN envelopes e ON (e.device_id, e.seq) = (r.device_id, r.seq)"
            " WHERE r.metric = 'heart_rate' ORDER BY r.time"
        )
        rows = await cur.fetchall()
    assert len(rows) >= 2
    assert {(r[0], r[1], r[2], r[4], r[5]) for r in rows} == {
        ("P1", "/min", "hr-strap-1", True, "hub-1")
    }
    # What was stored is exactly a run of what the strap measured (its signal is seeded).
    reference = HeartRateSignal(11, sample_period_s=0.25)
    expected = [float(reference.next().bpm) for _ in range(400)]
    stored = [float(r[3]) for r in rows]
    assert any(expected[i : i + len(stored)] == stored for i in range(len(expected))), stored
    assert session.stats.info is not None
    assert session.stats.info.model == "TS-HRM-1"
    async with db.connection(trial.url) as conn:
        cur = await conn.execute(
            "SELECT model, serial, firmware, battery_level IS NOT NULL FROM sensors"
            " WHERE device_id = 'hub-1' AND sensor = 'hr-strap-1'"
        )
        assert await cur.fetchall() == [("TS-HRM-1", "HRM-00000011", "1.4.2", True)]
    outbox.close()
    await adapter.close()
