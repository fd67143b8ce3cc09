"""``trialstream bench drivers``: the hub's BLE side, parsers and sessions.

Two figures, each against a baseline measured in the same run:

1. Parsers: readings/s that ``registry.decode_to_measurements`` gets out of one typical
   payload of every profile, against a bare ``struct.unpack`` of the same bytes into its
   raw fields (no flags, no IEEE 11073 numbers, no unit conversion, no checks). The ratio
   says what the real parsing costs over just touching the bytes.
2. End to end: N virtual heart-rate straps notifying at R Hz, each read by a
   :class:`~device_drivers.driver.WearableSession` into an in-memory sink, for a fixed
   time: notifications/s and readings/s delivered and the hub's CPU use. The simulation is
   split as a real hub is split between its Bluetooth controller (a dongle) and its host:
   a child process (:class:`~device_drivers.sim.RadioProcess`) runs the virtual radio,
   the straps with their bumble stacks and the hub's controller; this process runs only
   the hub, a bumble host talking HCI to that controller over TCP on loopback, bleak and
   the sessions. Each process's CPU time is read over the same wall window (psutil), so
   the hub's figure leaves the radio simulation out. Baseline: the same straps read by
   plain ``BleakClient`` subscriptions whose callback does nothing (host stack + bleak
   backend); the difference is what the sessions add (queueing, decoding, readings, sink
   hand-off). Target: the hub keeps up with 20 wearables at 10 Hz on under 10 % of one core.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import psutil  # type: ignore[import-untyped]
from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic

from bench.common import Progress, cpu_seconds, machine
from device_drivers.driver import SensorInfo, WearableSession, WearableSpec
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
from device_drivers.pairing import BleBackends
from device_drivers.sim import RadioProcess, SimAdapter, VirtualHeartRateStrap
from device_drivers.sim.process import WearableFactory
from gateway.broker import free_port
from gateway.processes import until
from ingest.model import Gap, Reading

# The target: a hub keeps up with 20 wearables at 10 Hz on under 10 % of one core.
TARGET_HUB_CPU_PCT = 10.0
# Share of the expected notifications that counts as keeping up over a window (the straps'
# ticks and the window's edges do not line up: about one notification per strap either way).
KEEP_UP_SHARE = 0.98
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


def _straps(count: int, rate_hz: float) -> list[WearableFactory]:
    return [
        functools.partial(VirtualHeartRateStrap, f"TS-HRM-{i:04d}", seed=i, rate_hz=rate_hz)
        for i in range(count)
    ]


@contextlib.asynccontextmanager
async def _split_radio(
    count: int, rate_hz: float, say: Progress
) -> AsyncIterator[tuple[RadioProcess, SimAdapter]]:
    """The straps and the hub's controller in a child process, the hub's host in this one."""
    async with RadioProcess(_straps(count, rate_hz), hci_port=free_port()) as radio:
        say(f"radio process {radio.pid}: {count} straps advertising, controller on HCI/TCP")
        adapter = await SimAdapter.connect_hci(radio.hci_spec)
        try:
            yield radio, adapter
        finally:
            await adapter.close()


@dataclass(frozen=True, slots=True)
class Window:
    """One measured window: what was counted, its wall time and each process's CPU time."""

    counts: dict[str, int]
    wall_s: float
    hub_cpu_s: float
    radio_cpu_s: float

    def figures(self) -> dict[str, Any]:
        return {
            **{f"{name}_per_s": round(n / self.wall_s, 1) for name, n in self.counts.items()},
            "wall_seconds": round(self.wall_s, 3),
            "hub_cpu_seconds": round(self.hub_cpu_s, 3),
            "radio_cpu_seconds": round(self.radio_cpu_s, 3),
            "hub_cpu_pct": round(100 * self.hub_cpu_s / self.wall_s, 2),
            "radio_cpu_pct": round(100 * self.radio_cpu_s / self.wall_s, 2),
        }


async def _measure(
    seconds: float, radio_pid: int, counters: dict[str, Callable[[], int]]
) -> Window:
    """Counts, wall time and CPU time of this process (the hub) and the radio's, over
    one window of ``seconds``."""
    hub, radio = psutil.Process(), psutil.Process(radio_pid)
    counts0 = {name: counter() for name, counter in counters.items()}
    hub0, radio0, wall0 = cpu_seconds([hub]), cpu_seconds([radio]), time.perf_counter()
    await asyncio.sleep(seconds)
    wall = time.perf_counter() - wall0
    hub_cpu, radio_cpu = cpu_seconds([hub]) - hub0, cpu_seconds([radio]) - radio0
    counts = {name: counter() - counts0[name] for name, counter in counters.items()}
    return Window(counts, wall, hub_cpu, radio_cpu)


@contextlib.asynccontextmanager
async def _running(sessions: Sequence[WearableSession]) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.run(), name=f"bench-{s.spec.sensor}") for s in sessions]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _with_sessions(
    count: int, rate_hz: float, seconds: float, say: Progress
) -> dict[str, Any]:
    sink = CountingSink()
    async with _split_radio(count, rate_hz, say) as (radio, adapter):
        backends = BleBackends(adapter.scanner_backend, adapter.client_backend)
        sessions = [
            WearableSession(WearableSpec(address, f"hr-{i}"), sink, backends)
            for i, address in enumerate(radio.addresses)
        ]
        async with _running(sessions):
            await until(
                lambda: all(s.stats.notifications > 0 for s in sessions), "all streaming", 60, 0.05
            )
            say(f"sessions: {count} wearables connected and streaming; measuring {seconds} s")
            window = await _measure(
                seconds,
                radio.pid,
                {
                    "notifications": lambda: sum(s.stats.notifications for s in sessions),
                    "readings": lambda: sink.readings_in,
                },
            )
    return {
        **window.figures(),
        "malformed": sum(s.stats.malformed for s in sessions),
        "dropped": sum(s.stats.dropped for s in sessions),
        "gaps": sink.gaps,
    }


async def _bare_bleak(count: int, rate_hz: float, seconds: float, say: Progress) -> dict[str, Any]:
    received = 0

    def on_value(_char: BleakGATTCharacteristic, _data: bytearray) -> None:
        nonlocal received
        received += 1

    async with _split_radio(count, rate_hz, say) as (radio, adapter):
        clients = [BleakClient(a, backend=adapter.client_backend) for a in radio.addresses]
        try:
            for client in clients:
                await client.connect()
                await client.start_notify(HEART_RATE_MEASUREMENT, on_value)
            await until(lambda: received > count, "all streaming", 60, 0.05)
            say(f"baseline: {count} plain bleak subscriptions streaming; measuring {seconds} s")
            window = await _measure(seconds, radio.pid, {"notifications": lambda: received})
        finally:
            for client in clients:
                await client.disconnect()
    return window.figures()


async def end_to_end(count: int, rate_hz: float, seconds: float, say: Progress) -> dict[str, Any]:
    baseline = await _bare_bleak(count, rate_hz, seconds, say)
    say(
        f"baseline: hub {baseline['hub_cpu_pct']:.1f} % of one core, "
        f"radio {baseline['radio_cpu_pct']:.1f} %"
    )
    hub = await _with_sessions(count, rate_hz, seconds, say)
    say(f"sessions: hub {hub['hub_cpu_pct']:.1f} % of one core, radio {hub['radio_cpu_pct']:.1f} %")
    expected = count * rate_hz
    keeps_up = hub["notifications_per_s"] >= KEEP_UP_SHARE * expected and hub["dropped"] == 0
    return {
        "wearables": count,
        "rate_hz": rate_hz,
        "expected_notifications_per_s": expected,
        "seconds": seconds,
        "method": (
            "straps, their bumble stacks and the hub's controller in a child process (the "
            "radio); the hub's bumble host, bleak and the readers in this process, talking "
            "HCI to that controller over TCP on loopback; user+system CPU time of each "
            "process over the same wall window (psutil), as % of one core"
        ),
        "baseline": {"method": "plain BleakClient subscriptions, no-op callback", **baseline},
        "sessions": {"method": "WearableSession per wearable, in-memory sink", **hub},
        "sessions_added_hub_cpu_pct": round(hub["hub_cpu_pct"] - baseline["hub_cpu_pct"], 2),
        "hub_cpu_pct": hub["hub_cpu_pct"],
        "keeps_up": keeps_up,
        "target": f"keeps up and hub_cpu_pct < {TARGET_HUB_CPU_PCT:g}",
        "target_met": keeps_up and hub["hub_cpu_pct"] < TARGET_HUB_CPU_PCT,
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
    # sessions' own share, for when the measured difference is within the runs' noise.
    link["parse_cpu_pct_estimate"] = round(
        100 * link["sessions"]["notifications_per_s"] / heart_rate_rate, 3
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
