"""One wearable, one supervised session: connect, describe, subscribe, hand off, reconnect.

The session drives the wearable through bleak only (the backend decides whether that is
BlueZ, CoreBluetooth or the bumble simulation). On each connection it reads Device
Information and the battery into the sensor's provenance, sets the wearable's clock
(Current Time) where it allows writing, and subscribes to every standard measurement
characteristic it serves (notifications and indications alike) and to Battery Level
notifications. A glucose meter is asked through its Record Access Control Point for the
stored records newer than the last one already held; that cursor is written to the hub's
state file only once the records' readings are durable. Each value is decoded by the pure
parsers and handed to the sink, which makes it durable (the hub's outbox) before the
session goes on.

Bleak's callbacks only enqueue (with the time of arrival); one loop per session decodes and
hands off, so a burst never runs ahead of the sink and the order of a wearable's values is
kept. A payload the parsers refuse is counted and recorded as a gap with its reason; any
other fault ends that connection only, and the session reconnects.

When the wearable drops (out of range, battery, interference) the session reconnects on its
own with jittered backoff and records the span without data as a gap, from the last moment
it was connected to the moment it is again: missing data is visible, never invented.

Pairing (:func:`pair_wearable`) is a separate, explicit step: the participant picks a
wearable found by :func:`discover`, the hub pairs and bonds with it (Just Works, or a
passkey the participant types in when asked through a :class:`PasskeyPrompt`) and
remembers it in the :class:`~device_drivers.state.HubState`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakError
from bleak_retry_connector import establish_connection

from device_drivers.errors import DeviceDriverError
from device_drivers.gatt import battery, current_time, device_information, glucose, racp, registry
from device_drivers.gatt.base import Measurement
from device_drivers.gatt.errors import GattError
from device_drivers.state import HubState, PairedWearable
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
GLUCOSE_MEASUREMENT = glucose.MEASUREMENT_CHARACTERISTIC
RECORD_ACCESS_CONTROL_POINT = racp.CHARACTERISTIC
DEVICE_INFORMATION = {
    "manufacturer": device_information.MANUFACTURER_NAME,
    "model": device_information.MODEL_NUMBER,
    "serial": device_information.SERIAL_NUMBER,
    "firmware": device_information.FIRMWARE_REVISION,
    "hardware": device_information.HARDWARE_REVISION,
}
# The profile a wearable is paired as: its first standard service in this order (a scale
# with Body Composition is a weight scale).
PROFILES: Final[dict[int, str]] = {
    registry.HEART_RATE_SERVICE: "heart_rate",
    registry.HEALTH_THERMOMETER_SERVICE: "thermometer",
    registry.BLOOD_PRESSURE_SERVICE: "blood_pressure",
    registry.PULSE_OXIMETER_SERVICE: "pulse_oximeter",
    registry.GLUCOSE_SERVICE: "glucose",
    registry.WEIGHT_SCALE_SERVICE: "weight_scale",
    registry.BODY_COMPOSITION_SERVICE: "body_composition",
}
UNKNOWN_PROFILE: Final = "unknown"
# Cursor name in the hub state: the last glucose record sequence number held durably.
GLUCOSE_CURSOR: Final = "glucose_sequence"
_MAX_SEQUENCE: Final = 0xFFFF

RR_INTERVAL: Final = "rr_interval"
CLOCK_JUMP: Final = "clock_jump"
# A backwards step of the hub's wall clock larger than this is a jump. NTP daemons step a
# clock that is off by more than their threshold (chrony's packaged default: `makestep 1`,
# i.e. 1 s) and slew below it, so routine corrections stay under this; a hub whose clock
# was set by hand, lost its battery-backed time or picked up a wrong time zone moves by
# minutes to hours. Readings are at most a few per second per wearable, so a sub-2 s step
# makes no meaningful repetition.
CLOCK_JUMP_TOLERANCE_S: Final = 2.0
# Jumps noticed but not yet handed to the sink; past this many (a clock flapping back and
# forth) the newest is widened to cover the next, so none is lost and memory stays bounded.
MAX_PENDING_JUMPS: Final = 64

# Reconnect backoff: first retry after 1 s (a wearable briefly out of reach comes back
# fast), doubling to 60 s (a strap left in another room should not drain the hub).
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 60.0
CONNECT_TIMEOUT_S = 10.0
# A wearable advertises every 20 ms to 1 s when it is connectable; 5 s of scanning finds it.
SCAN_TIMEOUT_S = 5.0
# bleak-retry-connector's attempts per connect: transient failures are common on real radios.
CONNECT_ATTEMPTS = 3
# Pairing waits for a person to read six digits off a wearable and type them in: a minute.
PAIRING_TIMEOUT_S = 60.0
# Values waiting to be decoded and made durable. A glucose backfill (up to 1000 records)
# or 20 wearables at 10 Hz fit many times over. A callback cannot wait (the radio does not
# pause), so past this bound values are counted as dropped and the span becomes a gap.
QUEUE_SIZE = 4096


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


class HubClock:
    """The hub's wall clock for stamping readings; it notices when it jumps backwards.

    A call returns the wall time unchanged: readings keep the time the hub had, even after a
    jump (an invented time would be worse than a repeated one). A step back of more than
    ``tolerance_s`` below the latest time returned so far is remembered as a ``clock_jump``
    gap from the new time to that latest one: the span whose times may now occur twice.
    :meth:`take_jumps` hands those gaps over once (the hub's sink records them). Safe to
    call from any thread (bleak callbacks, worker threads).
    """

    def __init__(
        self,
        read: Callable[[], float] = time.time,
        *,
        tolerance_s: float = CLOCK_JUMP_TOLERANCE_S,
    ) -> None:
        if tolerance_s < 0:
            raise ValueError("tolerance_s must not be negative")
        self._read = read
        self.tolerance_s = tolerance_s
        self._lock = threading.Lock()
        self._latest: float | None = None
        self._jumps: list[Gap] = []
        self.jumps_seen = 0

    def __call__(self) -> float:
        now = self._read()
        with self._lock:
            latest = self._latest
            if latest is None or now > latest:
                self._latest = now
            elif now < latest - self.tolerance_s:
                self._latest = now
                self.jumps_seen += 1
                self._remember(Gap(int(now * 1000), int(latest * 1000), CLOCK_JUMP))
                log.warning("hub clock jumped backwards back_s=%.3f", latest - now)
        return now

    def _remember(self, gap: Gap) -> None:
        if len(self._jumps) < MAX_PENDING_JUMPS:
            self._jumps.append(gap)
            return
        last = self._jumps[-1]
        self._jumps[-1] = Gap(
            min(last.from_ms, gap.from_ms), max(last.to_ms, gap.to_ms), CLOCK_JUMP
        )

    def take_jumps(self) -> list[Gap]:
        """The jumps noticed since the last call, oldest first."""
        with self._lock:
            jumps, self._jumps = self._jumps, []
        return jumps

    def give_back(self, jumps: Sequence[Gap]) -> None:
        """Put back jumps that could not be recorded, ahead of newer ones."""
        with self._lock:
            pending, self._jumps = self._jumps, []
            for gap in [*jumps, *pending]:
                self._remember(gap)


class DriverError(DeviceDriverError):
    """Base of the errors of wearable discovery, pairing and sessions."""


class WearableNotFound(DriverError):
    """The wearable was not seen advertising within the scan timeout."""


class PairingFailed(DriverError):
    """Pairing did not complete: refused, wrong passkey, or nobody answered in time."""


class PasskeyPrompt(Protocol):
    """Asks the participant during pairing (the hub's screen, app or voice prompt)."""

    async def passkey(self, sensor: str) -> int | None:
        """The six digits the wearable ``sensor`` displays, or None if the person cancels."""
        ...

    async def confirm(self, sensor: str, number: int) -> bool:
        """Whether the wearable ``sensor`` displays ``number`` too (numeric comparison)."""
        ...


class PromptPairingAgent:
    """The hub's pairing agent: the Bluetooth stack's questions, put to the participant.

    It has the shape of the stack's agent (``request_passkey(address)``,
    ``confirm_numeric(address, number)``: :class:`device_drivers.sim.PairingAgent` in the
    simulation, a BlueZ agent on Linux) and names the wearable by the sensor name it is
    being paired under in ``state``.
    """

    def __init__(self, prompt: PasskeyPrompt, state: HubState) -> None:
        self.prompt = prompt
        self.state = state

    def _sensor(self, address: str) -> str:
        known = self.state.wearable(address)
        return known.sensor if known is not None else address

    async def request_passkey(self, address: str) -> int | None:
        return await self.prompt.passkey(self._sensor(address))

    async def confirm_numeric(self, address: str, number: int) -> bool:
        return await self.prompt.confirm(self._sensor(address), number)


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


@dataclass(frozen=True, slots=True)
class BleBackends:
    """bleak backend classes; None means the platform's own (BlueZ, CoreBluetooth, WinRT)."""

    scanner: type[BaseBleakScanner] | None = None
    client: type[BaseBleakClient] | None = None


def _setter(event: asyncio.Event) -> Callable[[BleakClient], None]:
    return lambda _client: event.set()


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
    connected: bool = False
    last_error: str | None = None
    info: SensorInfo | None = None


@dataclass(frozen=True, slots=True)
class _Value:
    """One notified or indicated value, as the callback saw it."""

    char_id: int
    t_ms: int
    data: bytes


def _short_service(uuid: str) -> int | None:
    text = uuid.lower()
    if text.startswith("0000") and text.endswith(registry.BASE_UUID_SUFFIX):
        return int(text[4:8], 16)
    return None


def profile_of(service_uuids: Iterable[str]) -> str:
    """The profile name of a wearable serving (or advertising) ``service_uuids``."""
    shorts = {_short_service(u) for u in service_uuids}
    return next((name for sid, name in PROFILES.items() if sid in shorts), UNKNOWN_PROFILE)


@dataclass(frozen=True, slots=True)
class FoundWearable:
    """A wearable seen advertising a standard health service."""

    address: str
    name: str | None
    profile: str
    rssi: int


def _scan_kwargs(backends: BleBackends) -> dict[str, Any]:
    return {} if backends.scanner is None else {"backend": backends.scanner}


async def discover(
    backends: BleBackends | None = None, *, timeout_s: float = SCAN_TIMEOUT_S
) -> list[FoundWearable]:
    """Wearables advertising a standard health service, nearest (strongest) first."""
    backends = backends or BleBackends()
    seen = await BleakScanner.discover(
        timeout=timeout_s,
        return_adv=True,
        service_uuids=[registry.full_uuid(service) for service in PROFILES],
        **_scan_kwargs(backends),
    )
    found = [
        FoundWearable(
            address, adv.local_name or device.name, profile_of(adv.service_uuids), adv.rssi
        )
        for address, (device, adv) in seen.items()
    ]
    return sorted(found, key=lambda w: (-w.rssi, w.address))


async def _find(
    address: str, backends: BleBackends, timeout_s: float
) -> tuple[BLEDevice, AdvertisementData]:
    wanted = address.upper()
    advertisement: list[AdvertisementData] = []

    def match(device: BLEDevice, adv: AdvertisementData) -> bool:
        if device.address.upper() != wanted:
            return False
        advertisement.append(adv)
        return True

    device = await BleakScanner.find_device_by_filter(
        match, timeout=timeout_s, **_scan_kwargs(backends)
    )
    if device is None or not advertisement:
        raise WearableNotFound(f"{address} not advertising within {timeout_s} s")
    return device, advertisement[-1]


async def pair_wearable(
    address: str,
    sensor: str,
    state: HubState,
    backends: BleBackends | None = None,
    *,
    scan_timeout_s: float = SCAN_TIMEOUT_S,
    timeout_s: float = PAIRING_TIMEOUT_S,
) -> PairedWearable:
    """Find, pair and bond with the wearable at ``address`` and remember it as ``sensor``.

    Which pairing method runs is negotiated by the two sides' IO capabilities: Just Works
    for a wearable without display, passkey entry (asked of the participant through the
    adapter's agent, e.g. :class:`PromptPairingAgent`) for one that shows a number.
    Raises :class:`WearableNotFound` or :class:`PairingFailed`; on failure the state keeps
    what it held before.
    """
    backends = backends or BleBackends()
    device, adv = await _find(address, backends, scan_timeout_s)
    before = await asyncio.to_thread(state.wearable, address)
    pending = PairedWearable(address, sensor, profile_of(adv.service_uuids), bonded=False)
    await asyncio.to_thread(state.remember, pending)
    client = BleakClient(device, pair=True, timeout=timeout_s, backend=backends.client)
    try:
        async with asyncio.timeout(timeout_s):
            await client.connect()
            profile = profile_of(service.uuid for service in client.services)
    except (BleakError, TimeoutError) as exc:
        await asyncio.to_thread(_restore, state, address, before)
        raise PairingFailed(f"pairing {sensor} failed: {type(exc).__name__}") from exc
    finally:
        with contextlib.suppress(BleakError, TimeoutError):
            await client.disconnect()
    paired = replace(pending, profile=profile, bonded=True)
    await asyncio.to_thread(state.remember, paired)
    log.info("wearable paired sensor=%s profile=%s", sensor, profile)
    return paired


def _restore(state: HubState, address: str, before: PairedWearable | None) -> None:
    if before is None:
        state.forget(address)
    else:
        state.remember(before)


def to_readings(measured: Sequence[Measurement], received_ms: int, sensor: str) -> list[Reading]:
    """The readings of one notified or indicated value that arrived at ``received_ms``.

    A measurement with a device time keeps it; one without gets the arrival time, except
    RR intervals: the beats of one Heart Rate notification ended one after the other, the
    last at the notification, so each earlier interval ends that much earlier
    (``t_k = received - sum of the intervals after k``, rounded to the millisecond).
    """
    times = [received_ms] * len(measured)
    after_ms = 0.0
    for i in range(len(measured) - 1, -1, -1):
        m = measured[i]
        if m.time is not None:
            times[i] = int(m.time.timestamp() * 1000)
        elif m.metric == RR_INTERVAL:
            times[i] = received_ms - round(after_ms)
            after_ms += m.value
    return [
        Reading(t_ms, m.metric, m.value, m.unit, sensor, tuple(sorted(set(m.flags))), m.user)
        for t_ms, m in zip(times, measured, strict=True)
    ]


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
    _held_sequence: int | None = field(default=None, init=False, repr=False)
    _durable_sequence: int | None = field(default=None, init=False, repr=False)
    _overflow: tuple[int, int] | None = field(default=None, init=False, repr=False)

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
        lost_at: int | None = None
        lost_reason = "out_of_range"
        await self._load_cursor()
        while True:
            disconnected = asyncio.Event()
            try:
                client = await self._connect(disconnected)
            except (BleakError, TimeoutError, OSError, DriverError) as exc:
                self.stats.connect_failures += 1
                self.stats.last_error = f"connect: {type(exc).__name__}"
                log.info("wearable unreachable sensor=%s retry_in_s=%.0f", self.spec.sensor, delay)
                if lost_at is None:
                    lost_at = self._now_ms()
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            failed = False
            try:
                if lost_at is not None:
                    await self._gap(lost_at, self._now_ms(), lost_reason)
                    lost_at, lost_reason = None, "out_of_range"
                await self._serve(client, disconnected)
            except (BleakError, TimeoutError, OSError) as exc:
                self.stats.last_error = f"session: {type(exc).__name__}"
                log.warning(
                    "wearable session ended sensor=%s error=%s",
                    self.spec.sensor,
                    type(exc).__name__,
                )
            except Exception as exc:  # one wearable's fault must not stop the hub
                failed = True
                self.stats.errors += 1
                self.stats.last_error = f"driver: {type(exc).__name__}"
                lost_reason = "driver_error"
                log.exception("wearable session failed sensor=%s", self.spec.sensor)
            finally:
                self.stats.connected = False
                lost_at = lost_at or self._now_ms()
                with contextlib.suppress(BleakError, TimeoutError, OSError):
                    await client.disconnect()
                await self._save_cursor()
            if failed:  # a fault that repeats must not spin: back off as for a lost link
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                delay = min(delay * 2, RECONNECT_MAX_S)
            else:
                delay = RECONNECT_MIN_S

    def _bonded(self) -> bool:
        if self.spec.pair:
            return True
        known = self.state.wearable(self.spec.address) if self.state is not None else None
        return known is not None and known.bonded

    async def _connect(self, disconnected: asyncio.Event) -> BleakClient:
        """Find the wearable advertising, then connect through bleak-retry-connector."""
        device, _ = await _find(self.spec.address, self.backends, self.scan_timeout_s)
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
        queue: asyncio.Queue[_Value] = asyncio.Queue(maxsize=QUEUE_SIZE)
        subscribed: list[int] = []
        control_point: BleakGATTCharacteristic | None = None
        for service in client.services:
            for char in service.characteristics:
                short = _short_service(char.uuid)
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
            await self._request_stored_records(client, control_point)
        waiter = asyncio.ensure_future(disconnected.wait())
        try:
            while not disconnected.is_set():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    await self._handle(getter.result())
                else:
                    getter.cancel()
            while not queue.empty():  # what arrived before the drop is still data
                await self._handle(queue.get_nowait())
        finally:
            waiter.cancel()

    def _enqueue(
        self, char_id: int, queue: asyncio.Queue[_Value]
    ) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
        def on_value(_char: BleakGATTCharacteristic, data: bytearray) -> None:
            self.stats.notifications += 1
            now = self._now_ms()
            try:
                queue.put_nowait(_Value(char_id, now, bytes(data)))
            except asyncio.QueueFull:
                self.stats.dropped += 1
                start = self._overflow[0] if self._overflow is not None else now
                self._overflow = (start, now)

        return on_value

    async def _handle(self, value: _Value) -> None:
        try:
            if value.char_id == BATTERY_LEVEL:
                await self._on_battery(value)
            elif value.char_id == RECORD_ACCESS_CONTROL_POINT:
                await self._on_racp(value)
            elif value.char_id == GLUCOSE_MEASUREMENT:
                await self._on_glucose(value)
            else:
                measured = registry.decode_to_measurements(value.char_id, value.data)
                await self._store(to_readings(measured, value.t_ms, self.spec.sensor))
        except GattError as exc:
            self.stats.malformed += 1
            log.warning(
                "malformed value sensor=%s char=0x%04X error=%s",
                self.spec.sensor,
                value.char_id,
                type(exc).__name__,
            )
            await self._gap(value.t_ms, value.t_ms, f"malformed_0x{value.char_id:04X}")
        if self._overflow is not None:
            (start, end), self._overflow = self._overflow, None
            log.error("hub fell behind sensor=%s: values dropped, gap recorded", self.spec.sensor)
            await self._gap(start, end, "hub_overloaded")

    async def _store(self, readings: list[Reading]) -> None:
        if readings:
            self.stats.readings += len(readings)
            await self.sink.readings(readings)

    async def _on_battery(self, value: _Value) -> None:
        level = battery.decode(value.data).percent
        self.stats.battery_updates += 1
        info = self.stats.info or SensorInfo(self.spec.sensor, self.spec.address)
        self.stats.info = replace(info, battery_level=level)
        await self.sink.sensor(self.stats.info)

    async def _on_glucose(self, value: _Value) -> None:
        record = glucose.decode(value.data)
        sequence = record.sequence_number
        if self._held_sequence is not None and sequence <= self._held_sequence:
            self.stats.records_already_held += 1
            return
        await self._store(to_readings(glucose.measurements(record), value.t_ms, self.spec.sensor))
        self.stats.records_fetched += 1
        if self._durable_sequence is None or sequence > self._durable_sequence:
            self._durable_sequence = sequence

    async def _on_racp(self, value: _Value) -> None:
        response = racp.decode_response(value.data)
        if not isinstance(response, racp.ResponseCodeIndication):
            return
        if response.request_opcode != racp.Opcode.REPORT_STORED_RECORDS:
            return
        if response.code in (racp.ResponseCode.SUCCESS, racp.ResponseCode.NO_RECORDS_FOUND):
            self.stats.racp_completed += 1
            await self._save_cursor()
        else:
            self.stats.racp_errors += 1
            log.warning(
                "stored records not reported sensor=%s response_code=%d",
                self.spec.sensor,
                response.code,
            )

    async def _request_stored_records(
        self, client: BleakClient, control_point: BleakGATTCharacteristic
    ) -> None:
        held = self._held_sequence
        if held is None:
            request = racp.report_all_records()
        else:
            request = racp.report_records_from(min(held + 1, _MAX_SEQUENCE))
        self.stats.racp_requests += 1
        try:
            await client.write_gatt_char(control_point, racp.encode_request(request), response=True)
        except BleakError as exc:
            self.stats.racp_errors += 1
            log.warning(
                "stored records request refused sensor=%s error=%s",
                self.spec.sensor,
                type(exc).__name__,
            )

    async def _load_cursor(self) -> None:
        if self.state is not None and self._held_sequence is None:
            self._held_sequence = await asyncio.to_thread(
                self.state.cursor, self.spec.sensor, GLUCOSE_CURSOR
            )

    async def _save_cursor(self) -> None:
        """Advance the cursor to the last record whose readings the sink made durable."""
        durable = self._durable_sequence
        if durable is None or (self._held_sequence is not None and durable <= self._held_sequence):
            return
        if self.state is not None:
            await asyncio.to_thread(
                self.state.set_cursor, self.spec.sensor, GLUCOSE_CURSOR, durable
            )
        self._held_sequence = durable

    async def _describe(self, client: BleakClient) -> SensorInfo:
        fields: dict[str, Any] = {}
        for name, char_id in DEVICE_INFORMATION.items():
            with contextlib.suppress(BleakError, GattError):
                raw = await client.read_gatt_char(registry.full_uuid(char_id))
                fields[name] = device_information.decode(bytes(raw), char_id)
        with contextlib.suppress(BleakError, GattError):
            raw = await client.read_gatt_char(registry.full_uuid(BATTERY_LEVEL))
            fields["battery_level"] = battery.decode(bytes(raw)).percent
        return SensorInfo(
            self.spec.sensor, self.spec.address, client.name, **fields, paired_user=self.spec.user
        )

    async def _set_clock(self, client: BleakClient) -> None:
        char = client.services.get_characteristic(registry.full_uuid(CURRENT_TIME))
        if char is None or not ({"write", "write-without-response"} & set(char.properties)):
            return
        now = datetime.fromtimestamp(self.clock(), UTC)
        value = current_time.CurrentTime.from_datetime(now)
        try:
            await client.write_gatt_char(char, current_time.encode(value), response=True)
        except BleakError as exc:
            log.info(
                "wearable refused the clock sensor=%s error=%s",
                self.spec.sensor,
                type(exc).__name__,
            )
            return
        self.stats.clock_writes += 1

    async def _gap(self, from_ms: int, to_ms: int, reason: str) -> None:
        # A span that crosses a backwards clock jump ends "before" it starts; its ends are
        # put in order (the clock_jump gap marks those times as ambiguous).
        self.stats.gaps += 1
        await self.sink.gap(Gap(min(from_ms, to_ms), max(from_ms, to_ms), reason))
