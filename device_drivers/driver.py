"""One wearable, one supervised session: connect, describe, subscribe, hand off, reconnect.

The session drives the wearable through bleak only (the backend decides whether that is
BlueZ, CoreBluetooth or the bumble simulation). On each connection it reads Device
Information and the battery into the sensor's provenance, sets the wearable's clock
(Current Time) where it allows writing, and subscribes to every standard measurement
characteristic it serves. Each notification is decoded by the pure parsers and handed to
the sink, which makes it durable (the hub's outbox) before the session goes on.

When the wearable drops (out of range, battery, interference) the session reconnects on its
own with jittered backoff and records the span without data as a gap, from the last moment
it was connected to the moment it is again: missing data is visible, never invented.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient
from bleak.backends.scanner import BaseBleakScanner
from bleak.exc import BleakError
from bleak_retry_connector import establish_connection

from device_drivers.gatt import current_time, date_time, device_information, registry
from device_drivers.gatt.errors import GattError
from ingest.model import Gap, Reading

log = logging.getLogger(__name__)

# Final measurements worth storing. Intermediate Temperature (0x2A1E) and Intermediate Cuff
# Pressure (0x2A36) describe a measurement in progress and are not readings.
MEASUREMENTS: frozenset[int] = frozenset(
    {
        0x2A37,  # Heart Rate Measurement
        0x2A1C,  # Temperature Measurement
        0x2A35,  # Blood Pressure Measurement
        0x2A5E,  # PLX Spot-check Measurement
        0x2A5F,  # PLX Continuous Measurement
        0x2A18,  # Glucose Measurement
        0x2A9D,  # Weight Measurement
        0x2A9C,  # Body Composition Measurement
    }
)
BATTERY_LEVEL = 0x2A19
CURRENT_TIME = 0x2A2B
DEVICE_INFORMATION = {
    "manufacturer": device_information.MANUFACTURER_NAME,
    "model": device_information.MODEL_NUMBER,
    "serial": device_information.SERIAL_NUMBER,
    "firmware": device_information.FIRMWARE_REVISION,
    "hardware": device_information.HARDWARE_REVISION,
}

# Reconnect backoff: first retry after 1 s (a wearable briefly out of reach comes back
# fast), doubling to 60 s (a strap left in another room should not drain the hub).
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 60.0
CONNECT_TIMEOUT_S = 10.0
# A wearable advertises every 20 ms to 1 s when it is connectable; 5 s of scanning finds it.
SCAN_TIMEOUT_S = 5.0
# bleak-retry-connector's attempts per connect: transient failures are common on real radios.
CONNECT_ATTEMPTS = 3
# Notifications waiting to be made durable; a burst (glucose backfill, 20 wearables at
# 10 Hz) fits many times over. When full, the callback waits: back-pressure, not loss.
QUEUE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class SensorInfo:
    """What a wearable says about itself: the provenance of its readings."""

    sensor: str
    address: str
    name: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    firmware: str | None = None
    hardware: str | None = None
    battery_level: int | None = None


class ReadingSink(Protocol):
    """Where a session hands its data; each call returns once the data is durable."""

    async def readings(self, readings: Sequence[Reading]) -> None: ...
    async def gap(self, gap: Gap) -> None: ...
    async def sensor(self, info: SensorInfo) -> None: ...


@dataclass(frozen=True, slots=True)
class WearableSpec:
    """A paired wearable: its address, and the stable name its readings carry as ``sensor``."""

    address: str
    sensor: str


@dataclass(frozen=True, slots=True)
class BleBackends:
    """bleak backend classes; None means the platform's own (BlueZ, CoreBluetooth, WinRT)."""

    scanner: type[BaseBleakScanner] | None = None
    client: type[BaseBleakClient] | None = None


def _setter(event: asyncio.Event) -> Callable[[BleakClient], None]:
    return lambda _client: event.set()


@dataclass
class SessionStats:
    connects: int = 0
    notifications: int = 0
    readings: int = 0
    malformed: int = 0
    gaps: int = 0
    connected: bool = False
    last_error: str | None = None
    info: SensorInfo | None = None


def _short_uuid(uuid: str) -> int | None:
    try:
        return registry.parse_characteristic_id(uuid)
    except GattError:
        return None


@dataclass
class WearableSession:
    spec: WearableSpec
    sink: ReadingSink
    backends: BleBackends = field(default_factory=lambda: BleBackends())
    scan_timeout_s: float = SCAN_TIMEOUT_S
    clock: Callable[[], float] = time.time
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    stats: SessionStats = field(default_factory=SessionStats)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def run(self) -> None:
        """Keep the wearable connected and its data flowing until cancelled."""
        delay = RECONNECT_MIN_S
        lost_at: int | None = None
        while True:
            disconnected = asyncio.Event()
            try:
                client = await self._connect(disconnected)
            except (BleakError, TimeoutError, OSError) as exc:
                self.stats.last_error = f"connect: {type(exc).__name__}"
                log.info("wearable unreachable sensor=%s retry_in_s=%.0f", self.spec.sensor, delay)
                if lost_at is None:
                    lost_at = self._now_ms()
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            delay = RECONNECT_MIN_S
            try:
                if lost_at is not None:
                    await self._gap(lost_at, self._now_ms(), "out_of_range")
                    lost_at = None
                await self._serve(client, disconnected)
            except (BleakError, TimeoutError, OSError) as exc:
                self.stats.last_error = f"session: {type(exc).__name__}"
                log.warning(
                    "wearable session ended sensor=%s error=%s",
                    self.spec.sensor,
                    type(exc).__name__,
                )
            finally:
                self.stats.connected = False
                lost_at = lost_at or self._now_ms()
                with contextlib.suppress(BleakError, TimeoutError, OSError):
                    await client.disconnect()

    async def _connect(self, disconnected: asyncio.Event) -> BleakClient:
        """Find the wearable advertising, then connect through bleak-retry-connector."""
        scan_kwargs: dict[str, Any] = {}
        if self.backends.scanner is not None:
            scan_kwargs["backend"] = self.backends.scanner
        device = await BleakScanner.find_device_by_address(
            self.spec.address, timeout=self.scan_timeout_s, **scan_kwargs
        )
        if device is None:
            raise TimeoutError(f"{self.spec.sensor} not advertising")
        async with asyncio.timeout(self.connect_timeout_s * CONNECT_ATTEMPTS):
            return await establish_connection(
                BleakClient,
                device,
                self.spec.sensor,
                disconnected_callback=_setter(disconnected),
                max_attempts=CONNECT_ATTEMPTS,
                backend=self.backends.client,
            )

    async def _serve(self, client: BleakClient, disconnected: asyncio.Event) -> None:
        self.stats.connects += 1
        self.stats.connected = True
        info = await self._describe(client)
        self.stats.info = info
        await self.sink.sensor(info)
        await self._set_clock(client)
        queue: asyncio.Queue[list[Reading]] = asyncio.Queue(maxsize=QUEUE_SIZE)
        subscribed = []
        for service in client.services:
            for char in service.characteristics:
                short = _short_uuid(char.uuid)
                if short in MEASUREMENTS and ({"notify", "indicate"} & set(char.properties)):
                    await client.start_notify(char, self._handler(short, queue))
                    subscribed.append(short)
        log.info(
            "wearable connected sensor=%s subscribed=%s",
            self.spec.sensor,
            ",".join(f"0x{c:04X}" for c in subscribed),
        )
        waiter = asyncio.ensure_future(disconnected.wait())
        try:
            while not disconnected.is_set():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    await self.sink.readings(getter.result())
                else:
                    getter.cancel()
            while not queue.empty():  # what arrived before the drop is still data
                await self.sink.readings(queue.get_nowait())
        finally:
            waiter.cancel()

    def _handler(
        self, char_id: int, queue: asyncio.Queue[list[Reading]]
    ) -> Callable[[BleakGATTCharacteristic, bytearray], Any]:
        async def on_notify(_char: BleakGATTCharacteristic, data: bytearray) -> None:
            self.stats.notifications += 1
            now = self._now_ms()
            try:
                measured = registry.decode_to_measurements(char_id, bytes(data))
            except GattError as exc:
                self.stats.malformed += 1
                log.warning(
                    "malformed notification sensor=%s char=0x%04X: %s",
                    self.spec.sensor,
                    char_id,
                    exc,
                )
                await self._gap(now, now, f"malformed_0x{char_id:04X}")
                return
            batch = [
                Reading(
                    int(m.time.timestamp() * 1000) if m.time is not None else now,
                    m.metric,
                    m.value,
                    m.unit,
                    self.spec.sensor,
                )
                for m in measured
            ]
            if batch:
                self.stats.readings += len(batch)
                await queue.put(batch)

        return on_notify

    async def _describe(self, client: BleakClient) -> SensorInfo:
        fields: dict[str, Any] = {}
        for name, char_id in DEVICE_INFORMATION.items():
            with contextlib.suppress(BleakError, GattError):
                raw = await client.read_gatt_char(registry.full_uuid(char_id))
                fields[name] = device_information.decode(bytes(raw), char_id)
        with contextlib.suppress(BleakError, GattError):
            raw = await client.read_gatt_char(registry.full_uuid(BATTERY_LEVEL))
            fields["battery_level"] = int(raw[0]) if raw else None
        return SensorInfo(self.spec.sensor, self.spec.address, client.name, **fields)

    async def _set_clock(self, client: BleakClient) -> None:
        char = client.services.get_characteristic(registry.full_uuid(CURRENT_TIME))
        if char is None or not ({"write", "write-without-response"} & set(char.properties)):
            return
        now = datetime.fromtimestamp(self.clock(), UTC)
        value = current_time.CurrentTime(
            date_time.DateTime(now.year, now.month, now.day, now.hour, now.minute, now.second),
            day_of_week=now.isoweekday(),
        )
        try:
            await client.write_gatt_char(char, current_time.encode(value), response=True)
        except BleakError as exc:
            log.info("wearable refused the clock sensor=%s: %s", self.spec.sensor, exc)

    async def _gap(self, from_ms: int, to_ms: int, reason: str) -> None:
        self.stats.gaps += 1
        await self.sink.gap(Gap(from_ms, to_ms, reason))
