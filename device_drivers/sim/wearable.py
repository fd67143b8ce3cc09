"""Virtual wearables: bumble peripherals serving standard health profiles on a virtual radio.

:class:`VirtualWearable` is the framework: it advertises its services and name, serves GATT
with Battery (0x180F) and Device Information (0x180A), re-advertises after a disconnection,
and can go out of range (drop the link, stop advertising) and come back. A profile is a small
subclass that adds its services (:meth:`VirtualWearable.profile_services`) and, if it measures
on its own, a loop (:meth:`VirtualWearable.run_profile`). :class:`VirtualHeartRateStrap` is
the first: Heart Rate Service (0x180D) with a seeded, realistic signal and an abnormal
episode switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Self, TypedDict, Unpack

from bumble import att, core, gatt, hci
from bumble.core import AdvertisingData
from bumble.device import Connection, Device
from bumble.pairing import PairingDelegate

from device_drivers.gatt import current_time
from device_drivers.gatt.current_time import CurrentTime
from device_drivers.gatt.errors import GattError
from device_drivers.gatt.heart_rate import HeartRateMeasurement, encode
from device_drivers.sim.link import SimError, VirtualRadio

logger = logging.getLogger(__name__)

BATTERY_SERVICE: Final = core.UUID.from_16_bits(0x180F, "Battery")
BATTERY_LEVEL: Final = core.UUID.from_16_bits(0x2A19, "Battery Level")
DEVICE_INFORMATION_SERVICE: Final = core.UUID.from_16_bits(0x180A, "Device Information")
MANUFACTURER_NAME: Final = core.UUID.from_16_bits(0x2A29, "Manufacturer Name String")
MODEL_NUMBER: Final = core.UUID.from_16_bits(0x2A24, "Model Number String")
SERIAL_NUMBER: Final = core.UUID.from_16_bits(0x2A25, "Serial Number String")
HARDWARE_REVISION: Final = core.UUID.from_16_bits(0x2A27, "Hardware Revision String")
FIRMWARE_REVISION: Final = core.UUID.from_16_bits(0x2A26, "Firmware Revision String")
HEART_RATE_SERVICE: Final = core.UUID.from_16_bits(0x180D, "Heart Rate")
HEART_RATE_MEASUREMENT: Final = core.UUID.from_16_bits(0x2A37, "Heart Rate Measurement")
BODY_SENSOR_LOCATION: Final = core.UUID.from_16_bits(0x2A38, "Body Sensor Location")
CURRENT_TIME_SERVICE: Final = core.UUID.from_16_bits(0x1805, "Current Time")
CURRENT_TIME: Final = core.UUID.from_16_bits(0x2A2B, "Current Time")

# Legacy advertising data holds 31 bytes (Core Vol 3, Part C, 11); the simulated controller
# sends no scan response, so name and service UUIDs must both fit in it.
_MAX_ADVERTISING_DATA: Final = 31
_AD_FLAGS: Final = bytes([0x06])  # LE General Discoverable, BR/EDR not supported
# Wearables advertise fast while waiting for their hub (Apple's accessory guidelines start
# at 20 ms); 25 ms keeps the simulated link quiet and connects in tens of milliseconds.
DEFAULT_ADVERTISING_INTERVAL_MS: Final = 25.0
# Body Sensor Location 0x2A38: 1 = chest (GATT Specification Supplement, 3.25).
_BODY_SENSOR_LOCATION_CHEST: Final = bytes([0x01])
# Battery drain is applied in steps of this many seconds (a percent changes rarely anyway).
_BATTERY_TICK_S: Final = 1.0
# ATT application error a faulty wearable answers reads with (0x80..0x9F are the
# application's own; "Unlikely Error" 0x0E is what misbehaving firmware tends to send).
_FAULTY_READ_ERROR: Final = att.ErrorCode.UNLIKELY_ERROR
# Measurements a wearable keeps while no hub listens, sent when one subscribes again
# (Health Thermometer, Blood Pressure and Weight Scale allow storing; 30 is typical).
DEFAULT_BACKLOG: Final = 30


@dataclass(frozen=True, slots=True)
class Faults:
    """Ways a wearable misbehaves, for tests that a hub survives it.

    Args:
        corrupt_every: every Nth measurement payload is cut to its first byte (0: never).
        refuse_reads: reads of Battery and Device Information fail with an ATT error.
    """

    corrupt_every: int = 0
    refuse_reads: bool = False


class WearableError(SimError):
    """Base of errors raised by virtual wearables."""


class WearableNotRunningError(WearableError):
    """The wearable is not on a radio (call :meth:`VirtualWearable.start` first)."""


class WearableOptions(TypedDict, total=False):
    """Keyword options every profile passes on to :class:`VirtualWearable`."""

    battery_level: int
    passkey: int | None
    io_capability: int
    require_encryption: bool
    require_authentication: bool
    request_security: bool
    advertising_interval_ms: float
    clock_offset_s: float
    battery_drain_per_hour: float
    faults: Faults | None


@dataclass(frozen=True, slots=True)
class DeviceInformation:
    """Device Information Service (0x180A) strings; they become a sensor's provenance."""

    manufacturer: str
    model: str
    serial: str
    firmware: str
    hardware: str | None = None


def read_not_permitted(_connection: Connection) -> bytes:
    """Read handler for characteristics without the read property.

    bumble serves a characteristic's stored value to any read whatever its properties, so
    a write-only or notify-only characteristic needs a handler that refuses the read.
    """
    raise att.ATT_Error(att.ErrorCode.READ_NOT_PERMITTED)


WriteHandler = Callable[[Connection, bytes], None] | Callable[[Connection, bytes], Awaitable[None]]


def write_only_value(on_write: WriteHandler) -> gatt.CharacteristicValue[bytes]:
    """Value of a write-only characteristic (a control point): writes go to ``on_write``."""
    return gatt.CharacteristicValue(read=read_not_permitted, write=on_write)


def notify_only_value() -> gatt.CharacteristicValue[bytes]:
    """Value of a characteristic that is only ever notified or indicated."""
    return gatt.CharacteristicValue(read=read_not_permitted)


class _DisplayDelegate(PairingDelegate):
    """A wearable's side of pairing: shows its passkey (or has no IO at all)."""

    def __init__(self, wearable: VirtualWearable, io_capability: int) -> None:
        super().__init__(io_capability=PairingDelegate.IoCapability(io_capability))
        self._wearable = wearable

    async def generate_passkey(self) -> int:
        passkey = self._wearable.passkey
        if passkey is None:
            return await super().generate_passkey()
        return passkey

    async def display_number(self, number: int, digits: int) -> None:
        self._wearable._display(number)

    async def compare_numbers(self, number: int, digits: int) -> bool:
        self._wearable._display(number)
        return True

    async def confirm(self, auto: bool = False) -> bool:
        # Asked only when the method is Just Works: nothing shown, nothing typed, no MITM
        # protection, which a wearable that insists on authentication refuses.
        return not self._wearable.require_authentication


class VirtualWearable:
    """A bumble peripheral on a :class:`VirtualRadio` serving standard health profiles.

    Subclasses add services by overriding :meth:`profile_services` (called once, at start)
    and, if they measure on their own, :meth:`run_profile` (runs while the wearable is on;
    use :meth:`notify` / :meth:`indicate` to send, they do nothing while nobody listens).
    """

    def __init__(
        self,
        name: str,
        info: DeviceInformation,
        *,
        battery_level: int = 100,
        passkey: int | None = None,
        io_capability: int = PairingDelegate.IoCapability.NO_OUTPUT_NO_INPUT,
        require_encryption: bool = False,
        require_authentication: bool = False,
        request_security: bool = False,
        advertising_interval_ms: float = DEFAULT_ADVERTISING_INTERVAL_MS,
        serves_current_time: bool = False,
        clock_offset_s: float = 0.0,
        battery_drain_per_hour: float = 0.0,
        faults: Faults | None = None,
    ) -> None:
        """
        Args:
            passkey: the fixed 6-digit passkey shown when pairing with passkey entry (with
                ``io_capability`` DISPLAY_OUTPUT_ONLY); random per pairing when None.
            io_capability: the wearable's SMP IO capability; NO_OUTPUT_NO_INPUT pairs with
                Just Works, DISPLAY_OUTPUT_ONLY makes the hub enter :attr:`passkey`.
            require_encryption: profile characteristics need an encrypted link (the hub
                must pair, or re-encrypt with its bond, before reading or subscribing).
            require_authentication: pair only with authentication (a passkey or a numeric
                comparison, never Just Works) and serve profile characteristics only over
                such a link, as a wearable that shows a passkey usually insists.
            request_security: send an SMP Security Request as soon as a hub connects, as
                wearables that insist on pairing do.
            serves_current_time: serve the Current Time service (0x1805) whose Current Time
                (0x2A2B) a hub reads and writes to set the wearable's clock.
            clock_offset_s: how far the wearable's own clock is from the real time until a
                hub sets it (measurement time stamps come from this clock).
            battery_drain_per_hour: percent of battery used per hour while on; each whole
                percent lost is notified on Battery Level.
            faults: misbehaviour to inject (see :class:`Faults`).
        """
        if not 0 <= battery_level <= 100:
            raise ValueError("battery_level is a percentage")
        if battery_drain_per_hour < 0:
            raise ValueError("battery_drain_per_hour cannot be negative")
        self.serves_current_time = serves_current_time
        self.clock_writes: list[CurrentTime] = []
        self._clock_offset = timedelta(seconds=clock_offset_s)
        self.battery_drain_per_hour = battery_drain_per_hour
        self.faults = faults if faults is not None else Faults()
        self.measurements_sent = 0
        self.malformed_sent = 0
        self.name = name
        self.info = info
        self.passkey = passkey
        self.displayed_passkey: int | None = None
        self.pairings = 0
        self._passkey_shown = asyncio.Event()
        self.require_encryption = require_encryption
        self.require_authentication = require_authentication
        self.request_security = request_security
        self._io_capability = io_capability
        self._battery_level = battery_level
        self._advertising_interval_ms = advertising_interval_ms
        self._device: Device | None = None
        self._address: str | None = None
        self._radio: VirtualRadio | None = None
        self._battery_characteristic: gatt.Characteristic[bytes] | None = None
        self._profile_services: list[gatt.Service] = []
        self._in_range = True
        self._changed = asyncio.Event()
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self._radio_lock = asyncio.Lock()
        self._main: asyncio.Task[None] | None = None
        self._task_group: asyncio.TaskGroup | None = None
        self._return_task: asyncio.Task[None] | None = None
        self._backlogs: dict[int, tuple[gatt.Characteristic[bytes], deque[bytes]]] = {}
        self._backlog_changed = asyncio.Event()

    def profile_services(self) -> Sequence[gatt.Service]:
        """The profile's own GATT services (Battery and Device Information are added)."""
        return ()

    def advertised_service_uuids(self) -> Sequence[core.UUID]:
        """Service UUIDs put in the advertising data: the profile's services by default."""
        return [service.uuid for service in self._profile_services]

    async def run_profile(self) -> None:
        """The profile's own activity while the wearable is on (nothing by default)."""

    @property
    def device(self) -> Device:
        if self._device is None:
            raise WearableNotRunningError(f"{self.name} is not on a radio")
        return self._device

    @property
    def address(self) -> str:
        """The wearable's Bluetooth address as bleak shows it (kept after :meth:`stop`)."""
        if self._address is None:
            raise WearableNotRunningError(f"{self.name} has not been on a radio yet")
        return self._address

    @property
    def in_range(self) -> bool:
        return self._in_range

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def battery_level(self) -> int:
        return self._battery_level

    async def start(self, radio: VirtualRadio) -> None:
        """Power the wearable on, on ``radio``, and start advertising."""
        if self._main is not None:
            raise WearableError(f"{self.name} is already running")
        self._profile_services = list(self.profile_services())
        device = await radio.create_device(
            self.name,
            pairing_delegate=lambda _connection: _DisplayDelegate(self, self._io_capability),
        )
        self._radio = radio
        self._device = device
        self._address = str(device.random_address.to_string(with_type_qualifier=False))
        services = [*self._profile_services, self._battery_service(), self._information_service()]
        if self.serves_current_time:
            services.append(self._current_time_service())
        device.add_services(services)
        device.on(Device.EVENT_CONNECTION, self._on_connection)
        device.gatt_server.on(
            device.gatt_server.EVENT_CHARACTERISTIC_SUBSCRIPTION, self._on_subscription
        )
        started = asyncio.get_running_loop().create_future()
        self._main = asyncio.get_running_loop().create_task(
            self._run(started), name=f"wearable-{self.name}"
        )
        await started

    async def stop(self) -> None:
        """Disconnect, stop advertising and take the wearable off its radio."""
        main, self._main = self._main, None
        if main is not None:
            # Holding the radio lock, no advertising or disconnect command is half-way:
            # bumble does not expect its HCI commands to be cancelled mid-flight.
            async with self._radio_lock:
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await main
        device, radio = self._device, self._radio
        self._device = None
        self._radio = None
        if device is not None and radio is not None:
            device.remove_listener(Device.EVENT_CONNECTION, self._on_connection)
            device.gatt_server.remove_listener(
                device.gatt_server.EVENT_CHARACTERISTIC_SUBSCRIPTION, self._on_subscription
            )
            await radio.remove_device(device)

    @contextlib.asynccontextmanager
    async def running(self, radio: VirtualRadio) -> AsyncIterator[Self]:
        """``async with wearable.running(radio):`` start, and stop on the way out."""
        await self.start(radio)
        try:
            yield self
        finally:
            await self.stop()

    async def go_out_of_range(self, duration: float | None = None) -> None:
        """Drop the link as a lost signal does (supervision timeout) and stop advertising.

        With ``duration`` the wearable comes back on its own after that many seconds;
        otherwise it stays away until :meth:`come_back`.
        """
        self._cancel_return()
        self._in_range = False
        await self._reconcile()
        if duration is not None:
            task_group = self._require_task_group()
            self._return_task = task_group.create_task(
                self._return_after(duration), name=f"wearable-{self.name}-return"
            )

    async def come_back(self) -> None:
        """Come back in range: advertise again (the hub may reconnect)."""
        self._cancel_return()
        self._in_range = True
        await self._reconcile()

    async def wait_for_displayed_passkey(self) -> int:
        """The number the wearable shows during pairing, once it shows one.

        A pairing agent playing the participant reads it from here, as a person reads
        the strap's display.
        """
        await self._passkey_shown.wait()
        self._passkey_shown.clear()
        if self.displayed_passkey is None:
            raise WearableError(f"{self.name} showed no passkey")
        return self.displayed_passkey

    def _display(self, number: int) -> None:
        self.displayed_passkey = number
        self._passkey_shown.set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def wait_disconnected(self) -> None:
        await self._disconnected.wait()

    async def set_battery_level(self, percent: int) -> None:
        """Change the battery level and notify subscribed hubs."""
        if not 0 <= percent <= 100:
            raise ValueError("battery level is a percentage")
        self._battery_level = percent
        if self._battery_characteristic is not None:
            await self.notify(self._battery_characteristic, bytes([percent]))

    async def notify(self, characteristic: gatt.Characteristic[bytes], value: bytes) -> None:
        """Notify every subscribed hub (no-op while disconnected or unsubscribed)."""
        if self._device is not None and self._device.connections:
            await self._device.notify_subscribers(characteristic, value)

    async def indicate(self, characteristic: gatt.Characteristic[bytes], value: bytes) -> None:
        """Indicate to every subscribed hub and wait for their confirmations."""
        if self._device is not None and self._device.connections:
            await self._device.indicate_subscribers(characteristic, value)

    def device_time(self) -> datetime:
        """The wearable's own clock: real time plus its offset (until a hub sets it)."""
        return datetime.now(UTC) + self._clock_offset

    def is_subscribed(self, characteristic: gatt.Characteristic[bytes]) -> bool:
        """Whether a connected hub enabled notifications or indications of it."""
        if self._device is None:
            return False
        for cccds in self._device.gatt_server.subscribers.values():
            cccd = cccds.get(characteristic.handle)
            if cccd and cccd[0] & 0x03:
                return True
        return False

    async def send_measurement(
        self, characteristic: gatt.Characteristic[bytes], payload: bytes, *, indicate: bool
    ) -> bool:
        """Notify or indicate one measurement if a hub listens; True when it was sent.

        This is where :attr:`faults` corrupt payloads, so every profile misbehaves alike.
        """
        if not self.is_subscribed(characteristic):
            return False
        self.measurements_sent += 1
        every = self.faults.corrupt_every
        if every and self.measurements_sent % every == 0:
            payload = payload[:1]
            self.malformed_sent += 1
        try:
            if indicate:
                await self.indicate(characteristic, payload)
            else:
                await self.notify(characteristic, payload)
        except (TimeoutError, core.BaseBumbleError) as error:
            # The hub went away mid-indication: not the wearable's failure to report.
            logger.debug("wearable send failed name=%s error=%r", self.name, error)
            return False
        return True

    def store_measurement(self, characteristic: gatt.Characteristic[bytes], payload: bytes) -> None:
        """Keep a measurement to indicate as soon as a hub listens (oldest dropped when full)."""
        entry = self._backlogs.get(characteristic.handle)
        if entry is None:
            entry = (characteristic, deque(maxlen=DEFAULT_BACKLOG))
            self._backlogs[characteristic.handle] = entry
        entry[1].append(payload)
        self._backlog_changed.set()

    def backlog(self, characteristic: gatt.Characteristic[bytes]) -> int:
        """Measurements kept for ``characteristic`` that no hub has received yet."""
        entry = self._backlogs.get(characteristic.handle)
        return 0 if entry is None else len(entry[1])

    async def _deliver_backlogs(self) -> None:
        while True:
            await self._backlog_changed.wait()
            self._backlog_changed.clear()
            for characteristic, queue in list(self._backlogs.values()):
                while queue and await self.send_measurement(
                    characteristic, queue[0], indicate=True
                ):
                    queue.popleft()

    def _on_subscription(self, *_args: object) -> None:
        self._backlog_changed.set()

    async def _drain_battery(self) -> None:
        loop = asyncio.get_running_loop()
        started, level = loop.time(), float(self._battery_level)
        while self._battery_level > 0:
            await asyncio.sleep(_BATTERY_TICK_S)
            used = (loop.time() - started) / 3600.0 * self.battery_drain_per_hour
            now = max(0, math.floor(level - used))
            if now < self._battery_level:
                await self.set_battery_level(now)

    def _read_battery(self, _connection: Connection) -> bytes:
        if self.faults.refuse_reads:
            raise att.ATT_Error(_FAULTY_READ_ERROR)
        return bytes([self._battery_level])

    def _string_reader(self, value: bytes) -> Callable[[Connection], bytes]:
        def read(_connection: Connection) -> bytes:
            if self.faults.refuse_reads:
                raise att.ATT_Error(_FAULTY_READ_ERROR)
            return value

        return read

    def _current_time_service(self) -> gatt.Service:
        characteristic: gatt.Characteristic[bytes] = gatt.Characteristic(
            CURRENT_TIME,
            gatt.Characteristic.Properties.READ
            | gatt.Characteristic.Properties.WRITE
            | gatt.Characteristic.Properties.NOTIFY,
            gatt.Characteristic.Permissions.READABLE | gatt.Characteristic.Permissions.WRITEABLE,
            gatt.CharacteristicValue(read=self._read_clock, write=self._write_clock),
        )
        return gatt.Service(CURRENT_TIME_SERVICE, [characteristic])

    def _read_clock(self, _connection: Connection) -> bytes:
        return current_time.encode(CurrentTime.from_datetime(self.device_time()))

    def _write_clock(self, _connection: Connection, value: bytes) -> None:
        try:
            written = current_time.decode(value)
        except GattError:
            raise att.ATT_Error(att.ErrorCode.INVALID_ATTRIBUTE_LENGTH) from None
        moment = written.to_datetime()
        if moment is None:
            raise att.ATT_Error(att.ErrorCode.VALUE_NOT_ALLOWED)
        self._clock_offset = moment - datetime.now(UTC)
        self.clock_writes.append(written)

    def _readable(self) -> gatt.Characteristic.Permissions:
        if self.require_authentication:
            return gatt.Characteristic.Permissions.READ_REQUIRES_AUTHENTICATION
        if self.require_encryption:
            return gatt.Characteristic.Permissions.READ_REQUIRES_ENCRYPTION
        return gatt.Characteristic.Permissions.READABLE

    def _battery_service(self) -> gatt.Service:
        characteristic: gatt.Characteristic[bytes] = gatt.Characteristic(
            BATTERY_LEVEL,
            gatt.Characteristic.Properties.READ | gatt.Characteristic.Properties.NOTIFY,
            gatt.Characteristic.Permissions.READABLE,
            gatt.CharacteristicValue(read=self._read_battery),
        )
        self._battery_characteristic = characteristic
        return gatt.Service(BATTERY_SERVICE, [characteristic])

    def _information_service(self) -> gatt.Service:
        fields = (
            (MANUFACTURER_NAME, self.info.manufacturer),
            (MODEL_NUMBER, self.info.model),
            (SERIAL_NUMBER, self.info.serial),
            (HARDWARE_REVISION, self.info.hardware),
            (FIRMWARE_REVISION, self.info.firmware),
        )
        characteristics: list[gatt.Characteristic[bytes]] = [
            gatt.Characteristic(
                uuid,
                gatt.Characteristic.Properties.READ,
                gatt.Characteristic.Permissions.READABLE,
                gatt.CharacteristicValue(read=self._string_reader(text.encode("utf-8"))),
            )
            for uuid, text in fields
            if text is not None
        ]
        return gatt.Service(DEVICE_INFORMATION_SERVICE, characteristics)

    def _advertising_data(self) -> bytes:
        uuids16 = b"".join(
            u.to_bytes() for u in self.advertised_service_uuids() if len(u.to_bytes()) == 2
        )
        uuids128 = b"".join(
            u.to_bytes(force_128=True)
            for u in self.advertised_service_uuids()
            if len(u.to_bytes()) != 2
        )
        structures: list[tuple[int, bytes]] = [(AdvertisingData.Type.FLAGS, _AD_FLAGS)]
        if uuids16:
            structures.append(
                (AdvertisingData.Type.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS, uuids16)
            )
        if uuids128:
            structures.append(
                (AdvertisingData.Type.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS, uuids128)
            )
        used = sum(2 + len(payload) for _, payload in structures)
        name = self.name.encode("utf-8")
        room = _MAX_ADVERTISING_DATA - used - 2
        if room <= 0:
            raise WearableError(f"{self.name}: advertised services leave no room for a name")
        if len(name) <= room:
            structures.append((AdvertisingData.Type.COMPLETE_LOCAL_NAME, name))
        else:
            structures.append((AdvertisingData.Type.SHORTENED_LOCAL_NAME, name[:room]))
        return bytes(AdvertisingData(structures))

    async def _run(self, started: asyncio.Future[None]) -> None:
        try:
            async with asyncio.TaskGroup() as task_group:
                self._task_group = task_group
                await self._reconcile()
                started.set_result(None)
                task_group.create_task(self._keep_advertising(), name=f"{self.name}-advertising")
                task_group.create_task(self.run_profile(), name=f"{self.name}-profile")
                task_group.create_task(self._deliver_backlogs(), name=f"{self.name}-backlog")
                if self.battery_drain_per_hour > 0:
                    task_group.create_task(self._drain_battery(), name=f"{self.name}-battery")
        except BaseException as error:
            if not started.done():
                started.set_exception(error)
            raise
        finally:
            self._task_group = None

    async def _keep_advertising(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self._reconcile()

    async def _reconcile(self) -> None:
        """Make the radio state match the wanted state (advertise iff in range and free)."""
        device = self.device
        async with self._radio_lock:
            if not self._in_range:
                for connection in list(device.connections.values()):
                    with contextlib.suppress(hci.HCI_Error):
                        await connection.disconnect(reason=hci.HCI_CONNECTION_TIMEOUT_ERROR)
            want_advertising = self._in_range and not device.connections
            if want_advertising and not device.is_advertising:
                await device.start_advertising(
                    advertising_data=self._advertising_data(),
                    advertising_interval_min=self._advertising_interval_ms,
                    advertising_interval_max=self._advertising_interval_ms,
                )
            elif not want_advertising and device.is_advertising:
                await device.stop_advertising()

    async def _return_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._return_task = None
        self._in_range = True
        await self._reconcile()

    def _cancel_return(self) -> None:
        task, self._return_task = self._return_task, None
        if task is not None:
            task.cancel()

    def _require_task_group(self) -> asyncio.TaskGroup:
        if self._task_group is None:
            raise WearableNotRunningError(f"{self.name} is not running")
        return self._task_group

    def _on_connection(self, connection: Connection) -> None:
        connection.on(Connection.EVENT_DISCONNECTION, self._on_disconnection)
        connection.on(Connection.EVENT_PAIRING, self._on_pairing)
        if self.request_security:
            asyncio.get_running_loop().call_soon(connection.request_pairing)
        self._disconnected.clear()
        self._connected.set()
        self._changed.set()

    def _on_pairing(self, *_keys: object) -> None:
        self.pairings += 1

    def _on_disconnection(self, _reason: int) -> None:
        if self._device is not None and not self._device.connections:
            self._connected.clear()
            self._disconnected.set()
        self._changed.set()


@dataclass(frozen=True, slots=True)
class HeartRateSample:
    bpm: int
    rr_intervals_ms: tuple[float, ...]


# Resting heart rate of healthy adults sits around 60-80 /min; the simulated participant's
# own baseline is drawn from the middle of that range.
_RESTING_BASELINE_BPM: Final = (64.0, 74.0)
_RESTING_LIMITS_BPM: Final = (55.0, 90.0)
# Slow drift: an Ornstein-Uhlenbeck walk around the baseline with a ~2 minute time constant.
_DRIFT_TIME_CONSTANT_S: Final = 120.0
_DRIFT_SPREAD_BPM: Final = 4.0
_NOISE_BPM: Final = 1.2
# Tachycardia episode (paroxysmal onset is abrupt): 130-150 /min.
_EPISODE_RANGE_BPM: Final = (130.0, 150.0)
_EPISODE_NOISE_BPM: Final = 2.0


class HeartRateSignal:
    """A seeded heart-rate generator: the same seed gives the same samples.

    Pure: no clock; each :meth:`next` call advances the signal by ``sample_period_s``.
    RR intervals are those of the beats that completed during the sample period.
    """

    def __init__(self, seed: int, *, sample_period_s: float = 1.0) -> None:
        if sample_period_s <= 0:
            raise ValueError("sample_period_s must be positive")
        self._rng = random.Random(seed)  # noqa: S311  # simulation, not cryptography
        self._period = sample_period_s
        self._baseline = self._rng.uniform(*_RESTING_BASELINE_BPM)
        self._drift = 0.0
        self._episode = False
        self._episode_level = 0.0
        self._beat_phase = 0.0

    @property
    def episode(self) -> bool:
        return self._episode

    def set_episode(self, on: bool) -> None:
        """Switch a tachycardia episode on or off (takes effect at the next sample)."""
        if on and not self._episode:
            self._episode_level = self._rng.uniform(
                _EPISODE_RANGE_BPM[0] + 5, _EPISODE_RANGE_BPM[1] - 5
            )
        self._episode = on

    def next(self) -> HeartRateSample:
        decay = math.exp(-self._period / _DRIFT_TIME_CONSTANT_S)
        self._drift = self._drift * decay + self._rng.gauss(
            0.0, _DRIFT_SPREAD_BPM * math.sqrt(1 - decay * decay)
        )
        if self._episode:
            low, high = _EPISODE_RANGE_BPM
            rate = self._episode_level + self._rng.gauss(0.0, _EPISODE_NOISE_BPM)
        else:
            low, high = _RESTING_LIMITS_BPM
            rate = self._baseline + self._drift + self._rng.gauss(0.0, _NOISE_BPM)
        rate = min(high, max(low, rate))
        return HeartRateSample(bpm=round(rate), rr_intervals_ms=self._beats(rate))

    def _beats(self, rate: float) -> tuple[float, ...]:
        beat_ms = 60_000.0 / rate
        self._beat_phase += self._period * 1000.0
        intervals: list[float] = []
        while self._beat_phase >= beat_ms:
            self._beat_phase -= beat_ms
            jitter = self._rng.gauss(0.0, beat_ms * 0.02)
            intervals.append(round(beat_ms + jitter, 1))
        return tuple(intervals)


class VirtualHeartRateStrap(VirtualWearable):
    """A chest strap: Heart Rate Service (0x180D), measurements notified at ``rate_hz``."""

    def __init__(
        self,
        name: str = "TS-HRM",
        info: DeviceInformation | None = None,
        *,
        seed: int = 0,
        rate_hz: float = 1.0,
        **options: Unpack[WearableOptions],
    ) -> None:
        if rate_hz <= 0:
            raise ValueError("rate_hz must be positive")
        super().__init__(
            name,
            info
            if info is not None
            else DeviceInformation(
                manufacturer="Trialstream Simulated Devices",
                model="TS-HRM-1",
                serial=f"HRM-{seed:08d}",
                firmware="1.4.2",
                hardware="rev C",
            ),
            **options,
        )
        self.rate_hz = rate_hz
        self.signal = HeartRateSignal(seed, sample_period_s=1.0 / rate_hz)
        self.measurement_characteristic: gatt.Characteristic[bytes] = gatt.Characteristic(
            HEART_RATE_MEASUREMENT,
            gatt.Characteristic.Properties.NOTIFY,
            gatt.Characteristic.Permissions(0),
            notify_only_value(),
        )

    def profile_services(self) -> Sequence[gatt.Service]:
        location: gatt.Characteristic[bytes] = gatt.Characteristic(
            BODY_SENSOR_LOCATION,
            gatt.Characteristic.Properties.READ,
            self._readable(),
            _BODY_SENSOR_LOCATION_CHEST,
        )
        return [gatt.Service(HEART_RATE_SERVICE, [self.measurement_characteristic, location])]

    def start_episode(self) -> None:
        """Tachycardia (130-150 /min) from the next measurement on."""
        self.signal.set_episode(True)

    def end_episode(self) -> None:
        self.signal.set_episode(False)

    async def run_profile(self) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / self.rate_hz
        deadline = loop.time()
        while True:
            deadline += period
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            sample = self.signal.next()
            if not self.is_connected:
                continue
            payload = encode(
                HeartRateMeasurement(
                    bpm=sample.bpm,
                    sensor_contact=True,
                    energy_expended_kj=None,
                    rr_intervals_ms=sample.rr_intervals_ms,
                )
            )
            await self.send_measurement(self.measurement_characteristic, payload, indicate=False)
