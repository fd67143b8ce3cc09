"""Finding, discovering and pairing wearables through bleak.

Pairing (:func:`pair_wearable`) is a separate, explicit step: the participant picks a
wearable found by :func:`discover`, the hub pairs and bonds with it (Just Works, or a
passkey the participant types in when asked through a :class:`PasskeyPrompt`) and
remembers it in the :class:`~device_drivers.state.HubState`. The sessions
(device_drivers.driver) find a wearable the same way before connecting to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from bleak import BleakClient, BleakScanner
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakError

from device_drivers.errors import DeviceDriverError
from device_drivers.gatt import registry
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
    """Find, pair and bond with the wearable at ``address`` and remember it as ``sensor``.

    Which pairing method runs is negotiated by the two sides' IO capabilities: Just Works
    for a wearable without display, passkey entry (asked of the participant through the
    adapter's agent, e.g. :class:`PromptPairingAgent`) for one that shows a number.
    Raises :class:`WearableNotFound` or :class:`PairingFailed`; on failure the state keeps
    what it held before.
    """
    backends = backends or BleBackends()
    device, adv = await find(address, backends, scan_timeout_s)
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
