"""Finding, discovering and pairing wearables through bleak.

Pairing (:func:`pair_and_set_up`, or :func:`pair_wearable` for just the result) is a
separate, explicit step: the participant picks a wearable found by :func:`discover`, the
hub pairs and bonds with it (Just Works, or a passkey the participant types in when asked
through a :class:`PasskeyPrompt`), reads what it says about itself (Device Information,
Battery), sets its clock (Current Time) and remembers it in the
:class:`~device_drivers.state.HubState`. The sessions (device_drivers.driver) find a
wearable the same way before connecting to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from bleak import BleakClient, BleakScanner
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakDBusError, BleakError

from device_drivers.errors import DeviceDriverError
from device_drivers.gatt import battery, current_time, device_information, registry
from device_drivers.gatt.errors import GattError
from device_drivers.state import HubState, PairedWearable

log = logging.getLogger(__name__)

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
# A wearable advertises every 20 ms to 1 s when it is connectable; 5 s of scanning finds it.
SCAN_TIMEOUT_S = 5.0
# Pairing waits for a person to read six digits off a wearable and type them in: a minute.
PAIRING_TIMEOUT_S = 60.0
# A passkey is six decimal digits, 000000-999999 (Core Vol 3, Part H, 2.3.5.3). ASCII only:
# str.isdigit() and int() also take other scripts' digits.
PASSKEY_DIGITS: Final = 6
_PASSKEY: Final = re.compile(r"[0-9]{6}")
# What a wearable says about itself when paired: Device Information strings (0x180A).
DEVICE_INFORMATION: Final[dict[str, int]] = {
    "manufacturer": device_information.MANUFACTURER_NAME,
    "model": device_information.MODEL_NUMBER,
    "serial": device_information.SERIAL_NUMBER,
    "firmware": device_information.FIRMWARE_REVISION,
    "hardware": device_information.HARDWARE_REVISION,
}


class DriverError(DeviceDriverError):
    """Base of the errors of wearable discovery, pairing and sessions."""


class WearableNotFound(DriverError):
    """The wearable was not seen advertising within the scan timeout."""


class PairingFailed(DriverError):
    """Pairing did not complete: refused, wrong passkey, or nobody answered in time."""


class PasskeyRejected(PairingFailed):
    """The wearable refused the passkey (or confirmation) given: not the digits it shows."""


class PasskeyNotGiven(PairingFailed):
    """The wearable asked for its passkey (or to confirm a number) and got no answer, or a
    "no": the person cancelled, or there was nobody to ask."""


class SensorNameTaken(DriverError):
    """Another wearable is already paired under the sensor name asked for."""


class BadPasskey(DriverError):
    """Text that is not a passkey: six digits 0-9, nothing else."""


def parse_passkey(text: str) -> int:
    """The passkey in ``text``, exactly six ASCII digits (leading zeros count)."""
    if len(text) != PASSKEY_DIGITS or _PASSKEY.fullmatch(text) is None:
        raise BadPasskey(f"a passkey is the {PASSKEY_DIGITS} digits (0-9) the wearable shows")
    return int(text)


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
    simulation, where the hub's own host stack pairs) and names the wearable by the sensor
    name it is being paired under in ``state``. It notes whether each question was
    answered, so that :func:`pair_and_set_up` can tell a refused passkey
    (:class:`PasskeyRejected`) from one never given (:class:`PasskeyNotGiven`).
    """

    def __init__(self, prompt: PasskeyPrompt, state: HubState) -> None:
        self.prompt = prompt
        self.state = state
        self._answers: dict[str, bool] = {}

    def _sensor(self, address: str) -> str:
        known = self.state.wearable(address)
        return known.sensor if known is not None else address

    def answered(self, address: str) -> bool | None:
        """Whether the last question the wearable at ``address`` asked got an answer (a
        passkey, a "yes" to the number); None when it asked none since :meth:`clear`."""
        return self._answers.get(address.upper())

    def clear(self, address: str) -> None:
        self._answers.pop(address.upper(), None)

    async def request_passkey(self, address: str) -> int | None:
        passkey = await self.prompt.passkey(self._sensor(address))
        self._answers[address.upper()] = passkey is not None
        return passkey

    async def confirm_numeric(self, address: str, number: int) -> bool:
        same = await self.prompt.confirm(self._sensor(address), number)
        self._answers[address.upper()] = same
        return same


@dataclass(frozen=True, slots=True)
class BleBackends:
    """bleak backend classes; None means the platform's own (BlueZ, CoreBluetooth, WinRT)."""

    scanner: type[BaseBleakScanner] | None = None
    client: type[BaseBleakClient] | None = None


def short_service(uuid: str) -> int | None:
    text = uuid.lower()
    if text.startswith("0000") and text.endswith(registry.BASE_UUID_SUFFIX):
        return int(text[4:8], 16)
    return None


def profile_of(service_uuids: Iterable[str]) -> str:
    """The profile name of a wearable serving (or advertising) ``service_uuids``."""
    shorts = {short_service(u) for u in service_uuids}
    return next((name for sid, name in PROFILES.items() if sid in shorts), UNKNOWN_PROFILE)


def service_label(uuid: str) -> str:
    """A service's name ("Heart Rate"), its 16-bit number ("0xFEE0") or its full UUID."""
    short = short_service(uuid)
    if short is None:
        return uuid.lower()
    return registry.SERVICES.get(short, f"0x{short:04X}")


@dataclass(frozen=True, slots=True)
class FoundWearable:
    """A wearable seen advertising a standard health service; ``services`` names the
    services it advertises, as :func:`service_label` does."""

    address: str
    name: str | None
    profile: str
    rssi: int
    services: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WearableDetails:
    """What a wearable said about itself when it was paired (Device Information, Battery
    Level; None where it has no such characteristic or refused the read) and whether it
    took the hub's clock (Current Time)."""

    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    firmware: str | None = None
    hardware: str | None = None
    battery_level: int | None = None
    clock_set: bool = False


@dataclass(frozen=True, slots=True)
class Pairing:
    """A pairing done: the wearable as remembered, and what it said about itself."""

    wearable: PairedWearable
    details: WearableDetails


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
            address,
            adv.local_name or device.name,
            profile_of(adv.service_uuids),
            adv.rssi,
            tuple(dict.fromkeys(service_label(u) for u in adv.service_uuids)),
        )
        for address, (device, adv) in seen.items()
    ]
    return sorted(found, key=lambda w: (-w.rssi, w.address))


async def find(
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
    """:func:`pair_and_set_up`, for the wearable as remembered only."""
    done = await pair_and_set_up(
        address, sensor, state, backends, scan_timeout_s=scan_timeout_s, timeout_s=timeout_s
    )
    return done.wearable


async def pair_and_set_up(
    address: str,
    sensor: str,
    state: HubState,
    backends: BleBackends | None = None,
    *,
    agent: PromptPairingAgent | None = None,
    user: int | None = None,
    clock: Callable[[], float] = time.time,
    scan_timeout_s: float = SCAN_TIMEOUT_S,
    timeout_s: float = PAIRING_TIMEOUT_S,
) -> Pairing:
    """Find, pair and bond with the wearable at ``address``, read its Device Information and
    Battery Level, set its clock (Current Time, from ``clock``, in UTC) where it allows it,
    and remember it as ``sensor`` (with the participant's ``user`` number on a shared one).

    Which pairing method runs is negotiated by the two sides' IO capabilities: Just Works
    for a wearable without display, passkey entry (asked of the participant through the
    adapter's agent, e.g. :class:`PromptPairingAgent`) for one that shows a number. Given
    that ``agent``, a failed pairing says whether the passkey was refused
    (:class:`PasskeyRejected`) or never given (:class:`PasskeyNotGiven`).
    Raises :class:`SensorNameTaken` before anything is sent, :class:`WearableNotFound` or
    :class:`PairingFailed`; on failure, or when cancelled, the state keeps what it held
    before.
    """
    backends = backends or BleBackends()
    address = address.upper()
    taken = await asyncio.to_thread(state.by_sensor, sensor)
    if taken is not None and taken.address != address:
        raise SensorNameTaken(f"sensor name {sensor!r} is taken by {taken.address}")
    device, adv = await find(address, backends, scan_timeout_s)
    before = await asyncio.to_thread(state.wearable, address)
    pending = PairedWearable(address, sensor, profile_of(adv.service_uuids), False, user)
    if agent is not None:
        agent.clear(address)
    # Remembered while pairing so that the agent names the wearable by its sensor name.
    await asyncio.to_thread(state.remember, pending)
    try:
        async with asyncio.timeout(timeout_s):
            profile, details = await _pair_and_read(
                BleakClient(device, timeout=timeout_s, backend=backends.client),
                address,
                sensor,
                agent,
                datetime.fromtimestamp(clock(), UTC),
            )
    except BaseException as exc:
        # Synchronously: a cancelled pairing (Ctrl-C) must not leave its entry behind, and
        # an await here could be cancelled in turn.
        _restore(state, address, before)
        if isinstance(exc, PairingFailed):
            raise
        if isinstance(exc, TimeoutError):
            raise PairingFailed(f"pairing {sensor} did not finish within {timeout_s:g} s") from exc
        if isinstance(exc, BleakError):
            raise PairingFailed(f"pairing {sensor} failed: {_cause(exc)}") from exc
        raise
    paired = replace(pending, profile=profile, bonded=True)
    await asyncio.to_thread(state.remember, paired)
    log.info(
        "wearable paired sensor=%s profile=%s clock_set=%s", sensor, profile, details.clock_set
    )
    return Pairing(paired, details)


async def _pair_and_read(
    client: BleakClient,
    address: str,
    sensor: str,
    agent: PromptPairingAgent | None,
    now: datetime,
) -> tuple[str, WearableDetails]:
    """Connect, pair, read and set the clock; the profile served and the details."""
    try:
        await client.connect()
        try:
            await client.pair()
        except BleakError as exc:
            answered = None if agent is None else agent.answered(address)
            raise _refused(sensor, exc, answered) from exc
        profile = profile_of(service.uuid for service in client.services)
        details = await read_details(client)
        clock_set = await set_current_time(client, now)
    finally:
        with contextlib.suppress(BleakError, TimeoutError):
            await client.disconnect()
    return profile, replace(details, clock_set=clock_set)


def _refused(sensor: str, exc: BleakError, answered: bool | None) -> PairingFailed:
    if answered is False:
        return PasskeyNotGiven(f"{sensor} asked for the passkey it shows and got none")
    if answered:
        return PasskeyRejected(f"{sensor} refused the passkey: not the 6 digits it shows")
    return PairingFailed(f"pairing {sensor} failed: {_cause(exc)}")


def _cause(exc: BleakError) -> str:
    """The failure's kind, for one line: BlueZ's error name, else the exception's type."""
    if isinstance(exc, BleakDBusError):
        return exc.dbus_error
    return type(exc).__name__


async def read_details(client: BleakClient) -> WearableDetails:
    """Device Information strings and Battery Level; each one missing or refused is None."""
    fields: dict[str, Any] = {}
    for name, char_id in DEVICE_INFORMATION.items():
        with contextlib.suppress(BleakError, GattError):
            raw = await client.read_gatt_char(registry.full_uuid(char_id))
            fields[name] = device_information.decode(bytes(raw), char_id)
    with contextlib.suppress(BleakError, GattError):
        raw = await client.read_gatt_char(registry.full_uuid(battery.CHARACTERISTIC))
        fields["battery_level"] = battery.decode(bytes(raw)).percent
    return WearableDetails(**fields)


async def set_current_time(client: BleakClient, now: datetime) -> bool:
    """Write ``now`` to the wearable's Current Time (0x2A2B); False when it has none that
    can be written, or refused the write."""
    char = client.services.get_characteristic(registry.full_uuid(current_time.CHARACTERISTIC))
    if char is None or not ({"write", "write-without-response"} & set(char.properties)):
        return False
    value = current_time.encode(current_time.CurrentTime.from_datetime(now))
    try:
        await client.write_gatt_char(char, value, response=True)
    except BleakError as exc:
        log.info("wearable refused the clock error=%s", type(exc).__name__)
        return False
    return True


def _restore(state: HubState, address: str, before: PairedWearable | None) -> None:
    if before is None:
        state.forget(address)
    else:
        state.remember(before)


# How long removing a bond may take before the hub gives up and says how to do it by hand.
REMOVE_BOND_TIMEOUT_S: Final = 15.0


async def remove_bond(address: str, backends: BleBackends | None = None) -> str | None:
    """Ask the Bluetooth stack to forget its bond with ``address`` (BlueZ: the adapter's
    RemoveDevice, which bleak's ``unpair`` calls, with no connection needed). None when it
    did; otherwise why not, in a few words (no Bluetooth service, no such device, ...)."""
    backends = backends or BleBackends()
    try:
        async with asyncio.timeout(REMOVE_BOND_TIMEOUT_S):
            await BleakClient(address, backend=backends.client).unpair()
    except TimeoutError:
        return f"no answer from the Bluetooth stack within {REMOVE_BOND_TIMEOUT_S:g} s"
    except NotImplementedError:
        return "this Bluetooth stack cannot remove a bond"
    except (BleakError, OSError, EOFError, ValueError) as exc:
        return f"{type(exc).__name__}: {str(exc)[:200] or 'no detail'}"
    return None
