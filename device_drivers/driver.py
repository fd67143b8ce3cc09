"""One wearable, one supervised session: connect, describe, subscribe, hand off, reconnect.

The session drives the wearable through bleak only (the backend decides whether that is
BlueZ, CoreBluetooth or the bumble simulation). On each connection it reads Device
Information and the battery into the sensor's provenance, sets the wearable's clock
(Current Time) where it allows writing, and subscribes to every standard measurement
characteristic it serves (notifications and indications alike) and to Battery Level
notifications. A glucose meter is asked through its Record Access Control Point for the
stored records newer than the last one already held; that cursor is written to the hub's
state file only once the records' readings are durable. With a cursor, the meter is first
asked for its newest record: one numbered below the cursor means the meter's numbering
started again (a reset, a replaced battery, a wrap past 65535), which is recorded as a
``record_sequence_reset`` event (a gap of no length) and answered by asking for every
record. Each record's readings carry its key (sequence number and time), by which the
gateway stores a record once however often it is read. Each value is decoded by the pure
parsers and handed to the sink, which makes it durable (the hub's outbox) before the
session goes on.

Bleak's callbacks only enqueue (with the time of arrival); one loop per session decodes and
hands off, so a burst never runs ahead of the sink and the order of a wearable's values is
kept. A payload the parsers refuse is counted and recorded as a gap with its reason; any
other fault ends that connection only, and the session reconnects.

When the wearable drops (out of range, battery, interference) the session reconnects on its
own with jittered backoff and records the span without data as a gap, from the last moment
it was connected to the moment it is again: missing data is visible, never invented.

That holds across a restart of the hub too: where the link stands (watched up to a moment,
or lost since one) is kept in the hub's state file (``LinkKeeper``), so an outage still open
when the hub stopped keeps its start and reason, and a wearable connected when the hub
stopped (Ctrl-C, a crash, a power cut) gives a ``hub_stopped`` gap from the last moment it
was watched.

Pairing and discovery are device_drivers.pairing's; the hub's clock is device_drivers.clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.exc import BleakError
from bleak_retry_connector import establish_connection

from device_drivers.disk import on_disk
from device_drivers.gatt import (
    battery,
    body_composition,
    device_information,
    glucose,
    racp,
    registry,
)
from device_drivers.gatt.errors import GattError
from device_drivers.glucose_records import StoredRecords
from device_drivers.pairing import (
    SCAN_TIMEOUT_S,
    BleBackends,
    DriverError,
    find,
    read_details,
    set_current_time,
    short_service,
)
from device_drivers.stamping import to_readings
from device_drivers.state import HubState, LinkMark, PairedWearable, StateError
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
        0x2A34,  # Glucose Measurement Context
        0x2A9D,  # Weight Measurement
        0x2A9C,  # Body Composition Measurement
    }
)
BATTERY_LEVEL = 0x2A19
CURRENT_TIME = 0x2A2B
GLUCOSE_MEASUREMENT = glucose.MEASUREMENT_CHARACTERISTIC
GLUCOSE_CONTEXT = glucose.CONTEXT_CHARACTERISTIC
BODY_COMPOSITION = body_composition.CHARACTERISTIC
RECORD_ACCESS_CONTROL_POINT = racp.CHARACTERISTIC
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
# bleak-retry-connector's attempts per connect: transient failures are common on real radios.
CONNECT_ATTEMPTS = 3
# Why a span has no data (gap reasons; docs/drivers.md, "Gaps").
OUT_OF_RANGE: Final = "out_of_range"
DRIVER_ERROR: Final = "driver_error"
HUB_STOPPED: Final = "hub_stopped"
# While connected, the moment the hub last watched a wearable is written to the state file at
# most this often, not per reading (a write is a fsync on the hub's SD card): after a power
# cut, the hub_stopped gap starts at most this long before the last reading kept.
LINK_MARK_INTERVAL_S: Final = 60.0
# Values waiting to be decoded and made durable. A glucose backfill (up to 1000 records)
# or 20 wearables at 10 Hz fit many times over. A callback cannot wait (the radio does not
# pause), so past this bound values are counted as dropped and the span becomes a gap.
QUEUE_SIZE = 4096
# Values handled together when several wait (their readings are stored in one call).
HANDLE_BATCH = 256
# Characteristics handled one value at a time, not decoded as plain measurements.
_OWN_HANDLING: Final = frozenset(
    {
        BATTERY_LEVEL,
        RECORD_ACCESS_CONTROL_POINT,
        GLUCOSE_MEASUREMENT,
        GLUCOSE_CONTEXT,
        BODY_COMPOSITION,
    }
)


@dataclass(frozen=True, slots=True)
class SensorInfo:
    """What a wearable says about itself: the provenance of its readings. ``paired_user`` is
    the hub's: the participant's user index on a shared wearable, as it was paired."""

    sensor: str
    address: str
    name: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    firmware: str | None = None
    hardware: str | None = None
    battery_level: int | None = None
    paired_user: int | None = None


class ReadingSink(Protocol):
    """Where a session hands its data; each call returns once the data is durable."""

    async def readings(self, readings: Sequence[Reading]) -> None: ...
    async def gap(self, gap: Gap) -> None: ...
    async def sensor(self, info: SensorInfo) -> None: ...


@dataclass(frozen=True, slots=True)
class WearableSpec:
    """A paired wearable: its address, and the stable name its readings carry as ``sensor``.

    ``pair``: secure the link on connecting (with the bond, or by pairing if there is
    none); a session with a state file also does so for a wearable recorded as bonded.
    ``user``: the participant's user index on a wearable shared by several people; its
    readings of other users are refused by the gateway (``other_user``).
    """

    address: str
    sensor: str
    pair: bool = False
    user: int | None = None


def _setter(event: asyncio.Event) -> Callable[[BleakClient], None]:
    return lambda _client: event.set()


def _wake(queue: asyncio.Queue[Arrival | None]) -> None:
    """Wake a session's loop waiting on ``queue``. A full queue needs no wake-up: the loop
    is busy with it and looks at the link and the drop after each batch."""
    with contextlib.suppress(asyncio.QueueFull):
        queue.put_nowait(None)


@dataclass
class SessionStats:
    """Counters of one session (read by the hub's status and by tests)."""

    connects: int = 0
    connect_failures: int = 0
    notifications: int = 0
    readings: int = 0
    malformed: int = 0
    dropped: int = 0
    gaps: int = 0
    errors: int = 0
    battery_updates: int = 0
    clock_writes: int = 0
    records_fetched: int = 0
    records_already_held: int = 0
    racp_requests: int = 0
    racp_completed: int = 0
    racp_errors: int = 0
    sequence_resets: int = 0
    contexts_linked: int = 0
    contexts_unmatched: int = 0
    connected: bool = False
    last_error: str | None = None
    info: SensorInfo | None = None


@dataclass(frozen=True, slots=True)
class Arrival:
    """One notified or indicated value, as the callback saw it."""

    char_id: int
    t_ms: int
    data: bytes


GapRecorder = Callable[[int, int, str], Awaitable[None]]


@dataclass
class LinkKeeper:
    """A session's link as the hub's state file keeps it across restarts of the hub.

    An outage is open from the moment the link was lost until the session records it as a
    gap on reconnecting. Its start and reason are written when it opens, and the moment a
    connected wearable was last watched is written on a clean stop and at most every
    ``interval_s`` while connected (and on resuming), so a restart takes up the open
    outage, or a ``hub_stopped`` one from that moment, instead of leaving a hole no row
    explains. Without a state, only memory keeps it.
    """

    sensor: str
    state: HubState | None
    interval_s: float = LINK_MARK_INTERVAL_S
    monotonic: Callable[[], float] = time.monotonic
    lost_at: int | None = None
    reason: str = OUT_OF_RANGE
    _next_mark: float = field(default=0.0, init=False, repr=False)

    async def restore(self, now_ms: int) -> None:
        """Take up the link where the hub's previous run left it."""
        mark = await self._read()
        if mark is None:
            return
        if mark.at_ms > now_ms:  # no span can be said: the clock is behind the mark
            log.warning("link mark later than the clock ignored sensor=%s", self.sensor)
            return
        self.lost_at, self.reason = mark.at_ms, mark.outage or HUB_STOPPED

    async def lost(self, now_ms: int, reason: str) -> None:
        """The link is down: an outage opens now, unless one is open (its start stands)."""
        if self.lost_at is None:
            self.lost_at, self.reason = now_ms, reason
        await self._write(LinkMark(self.lost_at, self.reason))

    async def resumed(self, now_ms: int, gap: GapRecorder) -> None:
        """Connected: the open outage becomes a gap, and only then is the link written as
        up (a stop in between records the gap again rather than never)."""
        if self.lost_at is not None:
            await gap(self.lost_at, now_ms, self.reason)
            self.lost_at, self.reason = None, OUT_OF_RANGE
        await self._watched(now_ms)

    def due_in(self) -> float:
        """Seconds until the connected link is due to be written again."""
        return max(0.0, self._next_mark - self.monotonic())

    async def watching(self, now_ms: int) -> None:
        """Connected and watched up to now: written when due."""
        if self.due_in() == 0.0:
            await self._watched(now_ms)

    async def stopped(self, now_ms: int) -> None:
        """The hub stops: a link that is up was watched up to now; an open outage stands."""
        if self.lost_at is None:
            await self._write(LinkMark(now_ms, None))

    async def _watched(self, now_ms: int) -> None:
        self._next_mark = self.monotonic() + self.interval_s
        await self._write(LinkMark(now_ms, None))

    async def _read(self) -> LinkMark | None:
        if self.state is None:
            return None
        return await on_disk(self.state.link, self.sensor)

    async def _write(self, mark: LinkMark) -> None:
        """Write ``mark``; a state file that cannot be written (a full disk) costs at most
        a gap's start after a restart, so it is logged and the readings go on."""
        if self.state is None:
            return
        try:
            await on_disk(self.state.set_link, self.sensor, mark)
        except StateError as exc:
            log.warning("link mark not written sensor=%s error=%s", self.sensor, exc)


async def _backoff(delay: float) -> float:
    """Wait about ``delay`` (jittered), and return the next, longer delay."""
    await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
    return min(delay * 2, RECONNECT_MAX_S)


@dataclass
class WearableSession:
    spec: WearableSpec
    sink: ReadingSink
    backends: BleBackends = field(default_factory=lambda: BleBackends())
    scan_timeout_s: float = SCAN_TIMEOUT_S
    clock: Callable[[], float] = time.time
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    stats: SessionStats = field(default_factory=SessionStats)
    state: HubState | None = None
    link_interval_s: float = LINK_MARK_INTERVAL_S
    # A glucose meter's stored records: cursor, RACP exchange, contexts.
    records: StoredRecords = field(init=False, repr=False)
    # Where the link stands, kept in the state file across restarts of the hub.
    link: LinkKeeper = field(init=False, repr=False)
    # The first packet of a split Body Composition measurement, and when it arrived.
    _split: tuple[body_composition.BodyCompositionMeasurement, int] | None = field(
        default=None, init=False, repr=False
    )
    _overflow: tuple[int, int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.records = StoredRecords(
            self.spec.sensor, self._store, self._gap, self._now_ms, self.state, self.stats
        )
        self.link = LinkKeeper(self.spec.sensor, self.state, self.link_interval_s)

    @classmethod
    def for_paired(
        cls, wearable: PairedWearable, sink: ReadingSink, state: HubState, **kwargs: Any
    ) -> WearableSession:
        """The session of a wearable remembered in ``state``."""
        spec = WearableSpec(wearable.address, wearable.sensor, user=wearable.user)
        return cls(spec, sink, state=state, **kwargs)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def run(self) -> None:
        """Keep the wearable connected and its data flowing until cancelled."""
        delay = RECONNECT_MIN_S
        await self.records.load_cursor()
        await self.link.restore(self._now_ms())
        while True:
            disconnected = asyncio.Event()
            try:
                client = await self._connect(disconnected)
            except (BleakError, TimeoutError, OSError, DriverError) as exc:
                self.stats.connect_failures += 1
                self.stats.last_error = f"connect: {type(exc).__name__}"
                log.info("wearable unreachable sensor=%s retry_in_s=%.0f", self.spec.sensor, delay)
                await self.link.lost(self._now_ms(), OUT_OF_RANGE)
                delay = await _backoff(delay)
                continue
            if await self._connection(client, disconnected):
                # a fault that repeats must not spin: back off as for a lost link
                delay = await _backoff(delay)
            else:
                delay = RECONNECT_MIN_S

    async def _connection(self, client: BleakClient, disconnected: asyncio.Event) -> bool:
        """Serve one connection until it ends; True when a fault of the session ended it."""
        reason = OUT_OF_RANGE
        stopping = False
        try:
            await self.link.resumed(self._now_ms(), self._gap)
            await self._serve(client, disconnected)
        except asyncio.CancelledError:
            stopping = True
            raise
        except (BleakError, TimeoutError, OSError) as exc:
            self.stats.last_error = f"session: {type(exc).__name__}"
            log.warning(
                "wearable session ended sensor=%s error=%s",
                self.spec.sensor,
                type(exc).__name__,
            )
        except Exception as exc:  # one wearable's fault must not stop the hub
            self.stats.errors += 1
            self.stats.last_error = f"driver: {type(exc).__name__}"
            reason = DRIVER_ERROR
            log.exception("wearable session failed sensor=%s", self.spec.sensor)
        finally:
            self.stats.connected = False
            ended_ms = self._now_ms()
            with contextlib.suppress(BleakError, TimeoutError, OSError):
                await client.disconnect()
            await self.records.save_cursor()
            if stopping:
                await self.link.stopped(ended_ms)
            else:
                await self.link.lost(ended_ms, reason)
        return reason == DRIVER_ERROR

    def _bonded(self) -> bool:
        if self.spec.pair:
            return True
        known = self.state.wearable(self.spec.address) if self.state is not None else None
        return known is not None and known.bonded

    async def _connect(self, disconnected: asyncio.Event) -> BleakClient:
        """Find the wearable advertising, then connect through bleak-retry-connector."""
        device, _ = await find(self.spec.address, self.backends, self.scan_timeout_s)
        async with asyncio.timeout(self.connect_timeout_s * CONNECT_ATTEMPTS):
            return await establish_connection(
                BleakClient,
                device,
                self.spec.sensor,
                disconnected_callback=_setter(disconnected),
                max_attempts=CONNECT_ATTEMPTS,
                pair=self._bonded(),
                backend=self.backends.client,
            )

    async def _serve(self, client: BleakClient, disconnected: asyncio.Event) -> None:
        self.stats.connects += 1
        self.stats.connected = True
        info = await self._describe(client)
        self.stats.info = info
        await self.sink.sensor(info)
        await self._set_clock(client)
        queue: asyncio.Queue[Arrival | None] = asyncio.Queue(maxsize=QUEUE_SIZE)
        subscribed: list[int] = []
        control_point: BleakGATTCharacteristic | None = None
        for service in client.services:
            for char in service.characteristics:
                short = short_service(char.uuid)
                properties = set(char.properties)
                wanted = short in MEASUREMENTS and bool({"notify", "indicate"} & properties)
                wanted |= short == BATTERY_LEVEL and "notify" in properties
                if short == RECORD_ACCESS_CONTROL_POINT and {"indicate", "write"} <= properties:
                    wanted = True
                    control_point = char
                if wanted and short is not None:
                    await client.start_notify(char, self._enqueue(short, queue))
                    subscribed.append(short)
        log.info(
            "wearable connected sensor=%s subscribed=%s",
            self.spec.sensor,
            ",".join(f"0x{c:04X}" for c in subscribed),
        )
        if control_point is not None:
            await self.records.request(client, control_point)
        # The loop waits on the queue alone (one future per value, no task or timer each):
        # the drop and the link's next mark each put a wake-up (None) in it instead.
        loop = asyncio.get_running_loop()
        waiter = asyncio.ensure_future(disconnected.wait())
        waiter.add_done_callback(lambda _: _wake(queue))
        mark = loop.call_later(self.link.due_in(), _wake, queue)  # a quiet wearable too
        try:
            while not disconnected.is_set():
                first = await queue.get()
                if first is not None:
                    await self._handle_all(self._drained(first, queue))
                due = self.link.due_in() == 0.0
                if due:
                    await self.link.watching(self._now_ms())
                if due or first is None:  # (the timer may fire a little early)
                    mark.cancel()
                    mark = loop.call_later(self.link.due_in(), _wake, queue)
            while not queue.empty():  # what arrived before the drop is still data
                if (first := queue.get_nowait()) is not None:
                    await self._handle_all(self._drained(first, queue))
            await self.records.store_awaiting()
            await self._store_split()
        finally:
            waiter.cancel()
            mark.cancel()
            self.records.connection_ended()

    def _enqueue(
        self, char_id: int, queue: asyncio.Queue[Arrival | None]
    ) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
        def on_value(_char: BleakGATTCharacteristic, data: bytearray) -> None:
            self.stats.notifications += 1
            now = self._now_ms()
            try:
                queue.put_nowait(Arrival(char_id, now, bytes(data)))
            except asyncio.QueueFull:
                self.stats.dropped += 1
                start = self._overflow[0] if self._overflow is not None else now
                self._overflow = (start, now)

        return on_value

    @staticmethod
    def _drained(first: Arrival, queue: asyncio.Queue[Arrival | None]) -> list[Arrival]:
        """``first`` and what else is waiting, up to ``HANDLE_BATCH``: handled together, the
        readings of a busy wearable are made durable in one write, not one per value."""
        arrivals = [first]
        while len(arrivals) < HANDLE_BATCH and not queue.empty():
            if (arrival := queue.get_nowait()) is not None:
                arrivals.append(arrival)
        return arrivals

    async def _handle_all(self, arrivals: Sequence[Arrival]) -> None:
        """Handle arrivals in order. Plain measurements are decoded and their readings stored
        in one call; any other characteristic (battery, records, composite measurements) is
        handled on its own after what came before it is stored."""
        plain: list[Reading] = []
        for value in arrivals:
            if value.char_id in _OWN_HANDLING:
                await self._store(plain)
                plain = []
                await self._handle(value)
                continue
            try:
                measured = registry.decode_to_measurements(value.char_id, value.data)
            except GattError as exc:
                await self._store(plain)
                plain = []
                await self._malformed(value, exc)
                continue
            plain.extend(to_readings(measured, value.t_ms, self.spec.sensor))
        await self._store(plain)
        await self._note_overflow()

    async def _handle(self, value: Arrival) -> None:
        """A value of a characteristic in ``_OWN_HANDLING``."""
        try:
            if value.char_id == BATTERY_LEVEL:
                await self._on_battery(value)
            elif value.char_id == RECORD_ACCESS_CONTROL_POINT:
                await self.records.on_racp(value)
            elif value.char_id == GLUCOSE_MEASUREMENT:
                await self.records.on_glucose(value)
            elif value.char_id == GLUCOSE_CONTEXT:
                await self.records.on_context(value)
            elif value.char_id == BODY_COMPOSITION:
                await self._on_body_composition(value)
        except GattError as exc:
            await self._malformed(value, exc)

    async def _malformed(self, value: Arrival, exc: GattError) -> None:
        self.stats.malformed += 1
        log.warning(
            "malformed value sensor=%s char=0x%04X error=%s",
            self.spec.sensor,
            value.char_id,
            type(exc).__name__,
        )
        await self._gap(value.t_ms, value.t_ms, f"malformed_0x{value.char_id:04X}")

    async def _note_overflow(self) -> None:
        if self._overflow is not None:
            (start, end), self._overflow = self._overflow, None
            log.error("hub fell behind sensor=%s: values dropped, gap recorded", self.spec.sensor)
            await self._gap(start, end, "hub_overloaded")

    async def _store(self, readings: list[Reading]) -> None:
        if readings:
            self.stats.readings += len(readings)
            await self.sink.readings(readings)

    async def _on_battery(self, value: Arrival) -> None:
        level = battery.decode(value.data).percent
        self.stats.battery_updates += 1
        info = self.stats.info or SensorInfo(self.spec.sensor, self.spec.address)
        self.stats.info = replace(info, battery_level=level)
        await self.sink.sensor(self.stats.info)

    async def _on_body_composition(self, value: Arrival) -> None:
        """A split measurement (Multiple Packet) is stored once both packets are in; a part
        whose other part never came is stored alone, flagged ``multiple_packet``."""
        m = body_composition.decode(value.data)
        held, self._split = self._split, None
        if held is not None and m.multiple_packet:
            merged = body_composition.merge(held[0], m)
            if merged is not None:
                await self._store_body_composition(merged, held[1])
                return
        if held is not None:
            await self._store_body_composition(*held)
        if m.multiple_packet:
            self._split = (m, value.t_ms)
            return
        await self._store_body_composition(m, value.t_ms)

    async def _store_body_composition(
        self, m: body_composition.BodyCompositionMeasurement, received_ms: int
    ) -> None:
        measured = body_composition.measurements(m)
        await self._store(to_readings(measured, received_ms, self.spec.sensor))

    async def _store_split(self) -> None:
        if self._split is not None:
            held, self._split = self._split, None
            await self._store_body_composition(*held)

    async def _describe(self, client: BleakClient) -> SensorInfo:
        d = await read_details(client)
        return SensorInfo(
            self.spec.sensor,
            self.spec.address,
            client.name,
            manufacturer=d.manufacturer,
            model=d.model,
            serial=d.serial,
            firmware=d.firmware,
            hardware=d.hardware,
            battery_level=d.battery_level,
            paired_user=self.spec.user,
        )

    async def _set_clock(self, client: BleakClient) -> None:
        if await set_current_time(client, datetime.fromtimestamp(self.clock(), UTC)):
            self.stats.clock_writes += 1

    async def _gap(self, from_ms: int, to_ms: int, reason: str) -> None:
        # A span that crosses a backwards clock jump ends "before" it starts; its ends are
        # put in order (the clock_jump gap marks those times as ambiguous).
        self.stats.gaps += 1
        await self.sink.gap(Gap(min(from_ms, to_ms), max(from_ms, to_ms), reason, self.spec.sensor))
