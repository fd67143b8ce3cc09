"""``trialstream bench drivers``: the hub's BLE side, parsers and sessions.

Two figures, each against a baseline measured in the same run:

1. Parsers: readings/s that ``registry.decode_to_measurements`` gets out of one typical
   payload of every profile, against a bare ``struct.unpack`` of the same bytes into its
   raw fields (no flags, no IEEE 11073 numbers, no unit conversion, no checks). The ratio
   says what the real parsing costs over just touching the bytes.
2. End to end: N virtual heart-rate straps notifying at R Hz over the bumble virtual radio,
   each read by a :class:`~device_drivers.driver.WearableSession` into an in-memory sink,
   for a fixed time: notifications/s and readings/s delivered, and the process's CPU use
   (``time.process_time`` over wall time). The wearables, their bumble controllers and the
   hub's bumble host all run in this process, so the total overstates what a hub spends
   (on a real hub the radio work is the controller's and BlueZ's). To separate the
   driver's own cost, the same wearables are read a second time by plain ``BleakClient``
   subscriptions whose callback does nothing (baseline: radio simulation + bleak backend);
   the difference is what the sessions add (queueing, decoding, readings, sink hand-off).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic

from bench.common import Progress, machine
from device_drivers.driver import BleBackends, SensorInfo, WearableSession, WearableSpec
from device_drivers.gatt import (
    blood_pressure,
    body_composition,
    glucose,
    heart_rate,
    pulse_oximeter,
    registry,
    temperature,
    weight_scale,
)
from device_drivers.gatt.date_time import DateTime
from device_drivers.sim import SimAdapter, VirtualHeartRateStrap, VirtualRadio
from ingest.model import Gap, Reading

STAMP = DateTime.from_datetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
HEART_RATE_MEASUREMENT = registry.full_uuid(0x2A37)


@dataclass(frozen=True, slots=True)
class Sample:
    profile: str
    char_id: int
    payload: bytes
    raw_layout: struct.Struct


def samples() -> list[Sample]:
    """One typical payload per profile, and the Struct of its raw fields."""
    out = [
        Sample(
            "heart_rate",
            0x2A37,
            heart_rate.encode(heart_rate.HeartRateMeasurement(72, True, None, (830.0, 845.0))),
            struct.Struct("<BBHH"),
        ),
        Sample(
            "temperature",
            0x2A1C,
            temperature.encode(temperature.TemperatureMeasurement(36.8, timestamp=STAMP)),
            struct.Struct("<BIHBBBBB"),
        ),
        Sample(
            "blood_pressure",
            0x2A35,
            blood_pressure.encode(
                blood_pressure.BloodPressureMeasurement(
                    121.0, 79.0, 93.0, timestamp=STAMP, pulse_rate=66.0
                )
            ),
            struct.Struct("<BHHHHBBBBBH"),
        ),
        Sample(
            "plx_spot_check",
            0x2A5E,
            pulse_oximeter.encode_spot_check(
                pulse_oximeter.SpotCheckMeasurement(97.0, 64.0, timestamp=STAMP)
            ),
            struct.Struct("<BHHHBBBBB"),
        ),
        Sample(
            "plx_continuous",
            0x2A5F,
            pulse_oximeter.encode_continuous(
                pulse_oximeter.ContinuousMeasurement(pulse_oximeter.SpO2PulseRate(97.0, 64.0))
            ),
            struct.Struct("<BHH"),
        ),
        Sample(
            "glucose",
            0x2A18,
            glucose.encode(
                glucose.GlucoseMeasurement(
                    17, STAMP, time_offset_minutes=0, sample=glucose.GlucoseSample(0.00095)
                )
            ),
            struct.Struct("<BHHBBBBBhHB"),
        ),
        Sample(
            "weight",
            0x2A9D,
            weight_scale.encode(weight_scale.WeightMeasurement(72.4, timestamp=STAMP)),
            struct.Struct("<BHHBBBBB"),
        ),
        Sample(
            "body_composition",
            0x2A9C,
            body_composition.encode(
                body_composition.BodyCompositionMeasurement(24.3, timestamp=STAMP)
            ),
            struct.Struct("<HHHBBBBB"),
        ),
    ]
    for s in out:
        if s.raw_layout.size != len(s.payload):
            raise AssertionError(f"{s.profile}: baseline layout does not cover the payload")
    return out


def _rate(work: Callable[[], object], iterations: int) -> float:
    work()  # warm
    started = time.perf_counter()
    for _ in range(iterations):
        work()
    return iterations / (time.perf_counter() - started)


def parser_rates(iterations: int, say: Progress) -> list[dict[str, Any]]:
    results = []
    for s in samples():
        readings = len(registry.decode_to_measurements(s.char_id, s.payload))

        def parse(s: Sample = s) -> object:
            return registry.decode_to_measurements(s.char_id, s.payload)

        def unpack(s: Sample = s) -> object:
            return s.raw_layout.unpack(s.payload)

        parsed = _rate(parse, iterations)
        bare = _rate(unpack, iterations)
        say(
            f"parse {s.profile}: {parsed:,.0f} payloads/s ({bare / parsed:.1f}x slower than unpack)"
        )
        results.append(
            {
                "profile": s.profile,
                "characteristic": f"0x{s.char_id:04X}",
                "payload_bytes": len(s.payload),
                "readings_per_payload": readings,
                "payloads_per_s": round(parsed),
                "readings_per_s": round(parsed * readings),
                "baseline_unpacks_per_s": round(bare),
                "ratio_to_baseline": round(parsed / bare, 3),
            }
        )
    return results


class CountingSink:
    """The hub's sink with the outbox taken out: counts what a session hands off."""

    def __init__(self) -> None:
        self.readings_in = 0
        self.gaps = 0

    async def readings(self, readings: Sequence[Reading]) -> None:
        self.readings_in += len(readings)

    async def gap(self, gap: Gap) -> None:
        self.gaps += 1

    async def sensor(self, info: SensorInfo) -> None:
        return None


@contextlib.asynccontextmanager
async def _straps(
    radio: VirtualRadio, count: int, rate_hz: float
) -> AsyncIterator[list[VirtualHeartRateStrap]]:
    straps = [
        VirtualHeartRateStrap(f"TS-HRM-{i:04d}", seed=i, rate_hz=rate_hz) for i in range(count)
    ]
    async with contextlib.AsyncExitStack() as stack:
        for strap in straps:
            await stack.enter_async_context(strap.running(radio))
        yield straps


async def _measure(seconds: float, counter: Callable[[], int]) -> tuple[int, float, float]:
    """Values counted, wall seconds and CPU seconds over a window of ``seconds``."""
    start_count = counter()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return counter() - start_count, wall, cpu


async def _wait(check: Callable[[], bool], what: str, within: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise TimeoutError(f"not within {within} s: {what}")
        await asyncio.sleep(0.05)


async def _with_sessions(
    count: int, rate_hz: float, seconds: float, say: Progress
) -> dict[str, Any]:
    async with VirtualRadio() as radio:
        adapter = await SimAdapter.create(radio)
        sink = CountingSink()
        async with _straps(radio, count, rate_hz) as straps:
            sessions = [
                WearableSession(
                    WearableSpec(strap.address, f"hr-{i}"),
                    sink,
                    BleBackends(adapter.scanner_backend, adapter.client_backend),
                )
                for i, strap in enumerate(straps)
            ]
            tasks = [asyncio.create_task(s.run(), name=f"bench-{s.spec.sensor}") for s in sessions]
            try:
                await _wait(
                    lambda: all(s.stats.notifications > 0 for s in sessions), "all streaming"
                )
                say(f"sessions: {count} wearables connected and streaming")
                readings0 = sink.readings_in
                notified, wall, cpu = await _measure(
                    seconds, lambda: sum(s.stats.notifications for s in sessions)
                )
                readings = sink.readings_in - readings0
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        malformed = sum(s.stats.malformed for s in sessions)
        dropped = sum(s.stats.dropped for s in sessions)
        await adapter.close()
    return {
        "notifications_per_s": round(notified / wall, 1),
        "readings_per_s": round(readings / wall, 1),
        "cpu_seconds": round(cpu, 3),
        "wall_seconds": round(wall, 3),
        "cpu_share_of_one_core": round(cpu / wall, 4),
        "malformed": malformed,
        "dropped": dropped,
        "gaps": sink.gaps,
    }


async def _bare_bleak(count: int, rate_hz: float, seconds: float, say: Progress) -> dict[str, Any]:
    async with VirtualRadio() as radio:
        adapter = await SimAdapter.create(radio)
        received = 0

        def on_value(_char: BleakGATTCharacteristic, _data: bytearray) -> None:
            nonlocal received
            received += 1

        async with _straps(radio, count, rate_hz) as straps:
            clients = [BleakClient(s.address, backend=adapter.client_backend) for s in straps]
            try:
                for client in clients:
                    await client.connect()
                    await client.start_notify(HEART_RATE_MEASUREMENT, on_value)
                await _wait(lambda: received > count, "all streaming")
                say(f"baseline: {count} plain bleak subscriptions streaming")
                notified, wall, cpu = await _measure(seconds, lambda: received)
            finally:
                for client in clients:
                    await client.disconnect()
        await adapter.close()
    return {
        "notifications_per_s": round(notified / wall, 1),
        "cpu_seconds": round(cpu, 3),
        "wall_seconds": round(wall, 3),
        "cpu_share_of_one_core": round(cpu / wall, 4),
    }


async def end_to_end(count: int, rate_hz: float, seconds: float, say: Progress) -> dict[str, Any]:
    baseline = await _bare_bleak(count, rate_hz, seconds, say)
    say(f"baseline: {baseline['cpu_share_of_one_core']:.1%} of one core")
    hub = await _with_sessions(count, rate_hz, seconds, say)
    say(f"sessions: {hub['cpu_share_of_one_core']:.1%} of one core")
    added = hub["cpu_share_of_one_core"] - baseline["cpu_share_of_one_core"]
    return {
        "wearables": count,
        "rate_hz": rate_hz,
        "expected_notifications_per_s": count * rate_hz,
        "seconds": seconds,
        "baseline": {"method": "plain BleakClient subscriptions, no-op callback", **baseline},
        "sessions": {"method": "WearableSession per wearable, in-memory sink", **hub},
        "sessions_added_cpu_share_of_one_core": round(added, 4),
        "target_cpu_share_of_one_core": 0.10,
        "note": (
            "bumble peripherals, controllers and the hub's bumble host run in this process: "
            "cpu_share figures include the radio simulation; the sessions' own cost is "
            "sessions minus baseline (an estimate: the two runs differ in timing too)"
        ),
    }


async def run(
    *,
    iterations: int = 20_000,
    wearables: int = 20,
    rate_hz: float = 10.0,
    seconds: float = 10.0,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    say = Progress(progress)
    parsers = parser_rates(iterations, say)
    link = await end_to_end(wearables, rate_hz, seconds, say)
    heart_rate_rate = next(p["payloads_per_s"] for p in parsers if p["profile"] == "heart_rate")
    # What decoding alone costs at this load, from the parser figure: a lower bound on the
    # sessions' own share, for when the measured difference drowns in the simulation's.
    link["parse_cpu_share_of_one_core_estimate"] = round(
        link["sessions"]["notifications_per_s"] / heart_rate_rate, 5
    )
    return {
        "benchmark": "drivers",
        "machine": machine(),
        "parsers": {
            "iterations": iterations,
            "baseline": {"method": "struct.Struct.unpack of the same bytes into raw fields"},
            "profiles": parsers,
        },
        "end_to_end": link,
    }
