"""A hub whose controller lives in another process, reached over HCI on TCP (as a dongle)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Sequence

import pytest

from device_drivers.driver import SensorInfo, WearableSession, WearableSpec
from device_drivers.pairing import BleBackends
from device_drivers.sim import HeartRateSignal, RadioProcess, SimAdapter, VirtualHeartRateStrap
from gateway.broker import free_port
from ingest.model import Gap, Reading
from tests.fixtures.waiting import wait_until

SEED = 11
RATE_HZ = 10.0
READINGS_WANTED = 20
# Samples of the strap's signal to look the received run up in: far more than the strap
# produces while the test runs (it samples from its start, connected or not).
SIGNAL_SPAN = 3_000


class ListSink:
    """The hub's sink reduced to a list of what the session handed off."""

    def __init__(self) -> None:
        self.readings_in: list[Reading] = []
        self.gaps: list[Gap] = []

    async def readings(self, readings: Sequence[Reading]) -> None:
        self.readings_in.extend(readings)

    async def gap(self, gap: Gap) -> None:
        self.gaps.append(gap)

    async def sensor(self, info: SensorInfo) -> None:
        return None

    def heart_rates(self) -> list[int]:
        return [round(r.value) for r in self.readings_in if r.metric == "heart_rate"]


@pytest.fixture
async def radio_process() -> AsyncIterator[RadioProcess]:
    strap = functools.partial(VirtualHeartRateStrap, "TS-HRM-REMOTE", seed=SEED, rate_hz=RATE_HZ)
    async with RadioProcess([strap], hci_port=free_port()) as radio:
        yield radio


@pytest.fixture
async def remote_adapter(radio_process: RadioProcess) -> AsyncIterator[SimAdapter]:
    adapter = await SimAdapter.connect_hci(radio_process.hci_spec)
    yield adapter
    await adapter.close()


def contiguous_in(run: list[int], signal: list[int]) -> bool:
    width = len(run)
    return any(signal[i : i + width] == run for i in range(len(signal) - width + 1))


async def test_a_session_over_a_controller_in_another_process_reads_the_strap(
    radio_process: RadioProcess, remote_adapter: SimAdapter
) -> None:
    assert radio_process.pid != os.getpid()
    sink = ListSink()
    session = WearableSession(
        WearableSpec(radio_process.addresses[0], "hr-remote"),
        sink,
        BleBackends(remote_adapter.scanner_backend, remote_adapter.client_backend),
        scan_timeout_s=1.0,
    )
    task = asyncio.create_task(session.run(), name="test-hr-remote")
    try:
        await wait_until(
            lambda: len(sink.heart_rates()) >= READINGS_WANTED, "readings", within=10.0
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    signal = HeartRateSignal(SEED, sample_period_s=1.0 / RATE_HZ)
    expected = [signal.next().bpm for _ in range(SIGNAL_SPAN)]
    received = sink.heart_rates()[:READINGS_WANTED]
    assert contiguous_in(received, expected), f"not the strap's signal: {received}"
    assert {r.sensor for r in sink.readings_in} == {"hr-remote"}
    assert session.stats.malformed == session.stats.errors == 0
    assert sink.gaps == []
