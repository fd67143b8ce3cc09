"""Time on the hub: each RR interval of a notification gets its own time, and a wall clock
that jumps backwards is recorded as a clock_jump gap while every reading is kept."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_drivers.clock import CLOCK_JUMP, CLOCK_JUMP_TOLERANCE_S, MAX_PENDING_JUMPS, HubClock
from device_drivers.driver import (
    ReadingSink,
    SensorInfo,
    WearableSession,
    WearableSpec,
    to_readings,
)
from device_drivers.gatt import heart_rate, registry
from device_drivers.gatt.base import Measurement
from device_drivers.gatt.heart_rate import HeartRateMeasurement
from device_drivers.gatt.heart_rate import encode as encode_heart_rate
from device_drivers.hub import OutboxSink
from device_drivers.outbox import Outbox
from device_drivers.pairing import BleBackends
from device_drivers.sim import HeartRateSignal, SimAdapter, VirtualHeartRateStrap, VirtualRadio
from ingest.envelope import open_envelope
from ingest.model import Gap, Reading
from tests.fixtures.waiting import wait_until

DEV = "hub-0001"
T0 = 1_700_000_000.0


class ScriptedTime:
    """A wall clock that reads what the test set (seconds)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ShiftedTime:
    """The real wall clock plus an offset the test moves, as a hub's clock being reset."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


# --- RR intervals --------------------------------------------------------------------------


def test_each_rr_interval_ends_its_own_interval_earlier() -> None:
    payload = encode_heart_rate(HeartRateMeasurement(72, True, None, (800.78125, 601.5625, 1000.0)))
    measured = registry.decode_to_measurements(heart_rate.CHARACTERISTIC, payload)
    out = to_readings(measured, 10_000, "hr")
    assert [(r.metric, r.t_ms, r.value) for r in out] == [
        ("heart_rate", 10_000, 72.0),
        ("rr_interval", 10_000 - 1602, 800.78125),  # 601.5625 + 1000 after it, rounded
        ("rr_interval", 10_000 - 1000, 601.5625),
        ("rr_interval", 10_000, 1000.0),
    ]
    assert {r.sensor for r in out} == {"hr"}


def test_a_single_rr_interval_ends_at_the_notification() -> None:
    m = heart_rate.measurements(heart_rate.decode(bytes.fromhex("10 48 40 03")))
    assert [(r.metric, r.t_ms) for r in to_readings(m, 5_000, "hr")] == [
        ("heart_rate", 5_000),
        ("rr_interval", 5_000),
    ]


def test_device_times_are_kept_and_other_metrics_get_the_arrival() -> None:
    at = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    measured = [
        Measurement("rr_interval", 500.0, "ms", at),
        Measurement("systolic_bp", 120.0, "mm[Hg]"),
        Measurement("rr_interval", 700.0, "ms"),
        Measurement("rr_interval", 900.0, "ms", at),
    ]
    out = to_readings(measured, 9_000, "x")
    device_ms = int(at.timestamp() * 1000)
    # A device-timed interval keeps its time and does not shift the hub-timed ones.
    assert [r.t_ms for r in out] == [device_ms, 9_000, 9_000, device_ms]


def test_no_measurements_no_readings() -> None:
    assert to_readings([], 1, "x") == []


@contextlib.asynccontextmanager
async def running(session: WearableSession) -> AsyncIterator[None]:
    """Run a session in a task for the duration of the block; it must not end on its own."""
    task = asyncio.create_task(session.run(), name="test-session")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert task.cancelled(), "the session ended on its own"


@dataclass
class BatchSink(ReadingSink):
    """Keeps each hand-off apart: one batch is one notification."""

    batches: list[list[Reading]] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)

    async def readings(self, readings: Sequence[Reading]) -> None:
        self.batches.append(list(readings))

    async def gap(self, gap: Gap) -> None:
        self.gaps.append(gap)

    async def sensor(self, info: SensorInfo) -> None:
        return None


@pytest.fixture
async def radio() -> AsyncIterator[VirtualRadio]:
    async with VirtualRadio() as radio:
        yield radio


@pytest.fixture
async def adapter(radio: VirtualRadio) -> AsyncIterator[SimAdapter]:
    adapter = await SimAdapter.create(radio)
    yield adapter
    await adapter.close()


async def test_a_strap_notifying_several_beats_gives_each_its_own_time(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    strap = VirtualHeartRateStrap("TS-HRM-RR", seed=3, rate_hz=5.0)
    # Three seconds of beats per notification: several RR intervals in each.
    strap.signal = HeartRateSignal(3, sample_period_s=3.0)
    sink = BatchSink()
    multi = 0
    async with strap.running(radio):
        s = WearableSession(
            WearableSpec(strap.address, "hr"),
            sink,
            BleBackends(adapter.scanner_backend, adapter.client_backend),
            scan_timeout_s=1.0,
        )
        async with running(s):
            await wait_until(
                lambda: sum(len(_rr(b)) >= 2 for b in sink.batches) >= 3,
                "three notifications with several RR intervals",
                within=20,
            )
    for batch in sink.batches:
        (hr,) = [r for r in batch if r.metric == "heart_rate"]
        rr = _rr(batch)
        if not rr:
            continue
        multi += len(rr) >= 2
        assert rr[-1].t_ms == hr.t_ms
        for earlier, later in itertools.pairwise(rr):
            assert later.t_ms - earlier.t_ms == pytest.approx(later.value, abs=1)
        assert len({r.t_ms for r in rr}) == len(rr)
    assert multi >= 3
    assert sink.gaps == []
    assert s.stats.errors == 0


def _rr(batch: list[Reading]) -> list[Reading]:
    return [r for r in batch if r.metric == "rr_interval"]


# --- the hub clock -------------------------------------------------------------------------


def test_clock_returns_the_wall_time_and_notices_a_jump_back() -> None:
    wall = ScriptedTime()
    clock = HubClock(wall)
    assert clock() == T0
    wall.now = T0 + 10
    assert clock() == T0 + 10
    wall.now = T0 + 10 - CLOCK_JUMP_TOLERANCE_S + 0.5  # an NTP-sized step: not a jump
    assert clock() == wall.now
    assert clock.take_jumps() == []
    wall.now = T0 - 3600  # an hour back
    assert clock() == T0 - 3600
    assert clock.take_jumps() == [Gap(int((T0 - 3600) * 1000), int((T0 + 10) * 1000), CLOCK_JUMP)]
    assert clock.take_jumps() == []
    assert clock.jumps_seen == 1


def test_small_steps_back_add_up_to_a_jump() -> None:
    wall = ScriptedTime()
    clock = HubClock(wall, tolerance_s=2.0)
    clock()
    for step in (1.5, 3.0):  # each step is small; together they go back 3 s from the top
        wall.now = T0 - step
        clock()
    assert clock.take_jumps() == [Gap(int((T0 - 3) * 1000), int(T0 * 1000), CLOCK_JUMP)]


def test_a_second_jump_is_measured_from_the_new_time() -> None:
    wall = ScriptedTime()
    clock = HubClock(wall)
    clock()
    wall.now = T0 - 100
    clock()
    wall.now = T0 - 90
    clock()
    wall.now = T0 - 200
    clock()
    ms = 1000
    assert clock.take_jumps() == [
        Gap(int(T0 - 100) * ms, int(T0) * ms, CLOCK_JUMP),
        Gap(int(T0 - 200) * ms, int(T0 - 90) * ms, CLOCK_JUMP),
    ]


def test_pending_jumps_are_bounded_without_losing_a_span() -> None:
    wall = ScriptedTime()
    clock = HubClock(wall)
    for i in range(MAX_PENDING_JUMPS + 5):
        wall.now = T0 + 100 * i
        clock()
        wall.now = T0 + 100 * i - 50
        clock()
    jumps = clock.take_jumps()
    assert len(jumps) == MAX_PENDING_JUMPS
    last = MAX_PENDING_JUMPS + 4
    # The last kept one was widened over the ones past the bound.
    assert jumps[-1] == Gap(
        int(T0 + 100 * (MAX_PENDING_JUMPS - 1) - 50) * 1000, int(T0 + 100 * last) * 1000, CLOCK_JUMP
    )


def test_jumps_given_back_come_first() -> None:
    wall = ScriptedTime()
    clock = HubClock(wall)
    clock()
    wall.now = T0 - 100
    clock()
    first = clock.take_jumps()
    wall.now = T0 - 200
    clock()
    clock.give_back(first)
    assert [g.from_ms for g in clock.take_jumps()] == [int(T0 - 100) * 1000, int(T0 - 200) * 1000]


def test_negative_tolerance_is_refused() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        HubClock(tolerance_s=-1)


# --- the sink records jumps ----------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


async def test_sink_records_the_jump_and_keeps_every_reading(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    wall = ScriptedTime()
    with Outbox.open(tmp_path / "outbox.sqlite", DEV) as outbox:
        sink = OutboxSink(outbox, HubClock(wall))

        def stamped(value: float) -> Reading:
            return Reading(int(sink.clock() * 1000), "heart_rate", value, "/min", "hr")

        await sink.readings([stamped(60.0)])
        wall.now = T0 + 5
        await sink.readings([stamped(61.0)])
        wall.now = T0 - 7200
        await sink.readings([stamped(62.0)])
        wall.now = T0 - 7195
        await sink.readings([stamped(63.0)])
        envelopes = outbox.seal_pending(key, int(wall.now * 1000))
    payloads = [open_envelope(e.data).payload for e in envelopes]
    readings = [r for p in payloads for r in p.readings]
    gaps = [g for p in payloads for g in p.gaps]
    assert [r.value for r in readings] == [60.0, 61.0, 62.0, 63.0]
    assert [r.t_ms for r in readings] == [
        int(T0 * 1000),
        int((T0 + 5) * 1000),
        int((T0 - 7200) * 1000),
        int((T0 - 7195) * 1000),
    ]
    assert gaps == [Gap(int((T0 - 7200) * 1000), int((T0 + 5) * 1000), CLOCK_JUMP)]
    # The times that may repeat are inside the gap: the first reading after the jump and
    # the last one before it.
    assert gaps[0].from_ms <= readings[2].t_ms <= readings[1].t_ms <= gaps[0].to_ms


async def test_jump_while_the_wearable_is_away_orders_its_gap(
    radio: VirtualRadio, adapter: SimAdapter, tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    wall = ShiftedTime()
    strap = VirtualHeartRateStrap("TS-HRM-JUMP", seed=4, rate_hz=5.0)
    with Outbox.open(tmp_path / "outbox.sqlite", DEV) as outbox:
        sink = OutboxSink(outbox, HubClock(wall))
        async with strap.running(radio):
            s = WearableSession(
                WearableSpec(strap.address, "hr"),
                sink,
                BleBackends(adapter.scanner_backend, adapter.client_backend),
                scan_timeout_s=1.0,
                clock=sink.clock,
            )
            async with running(s):
                await wait_until(lambda: s.stats.readings >= 3, "streaming")
                await strap.go_out_of_range()
                await wait_until(lambda: not s.stats.connected, "the strap gone")
                before = s.stats.readings
                wall.offset_s = -3600.0
                await strap.come_back()
                await wait_until(lambda: s.stats.readings >= before + 3, "streaming again")
        produced = s.stats.readings
        envelopes = outbox.seal_pending(key, int(time.time() * 1000))
    payloads = [open_envelope(e.data).payload for e in envelopes]
    readings = [r for p in payloads for r in p.readings]
    gaps = {g.reason: g for p in payloads for g in p.gaps}
    assert len(readings) == produced
    assert set(gaps) == {CLOCK_JUMP, "out_of_range"}
    jump, away = gaps[CLOCK_JUMP], gaps["out_of_range"]
    assert 3_598_000 <= jump.to_ms - jump.from_ms <= 3_602_000
    assert away.from_ms <= away.to_ms
    hub_timed = [r.t_ms for r in readings if r.metric == "heart_rate"]
    minute = 60_000
    # In arrival order: the old timeline up to the gap's end, then from the gap's start on.
    n_old = sum(t > jump.from_ms + minute for t in hub_timed)
    old, new = hub_timed[:n_old], hub_timed[n_old:]
    assert old
    assert new
    assert all(jump.to_ms - minute < t <= jump.to_ms for t in old)
    assert all(jump.from_ms <= t < jump.from_ms + minute for t in new)
