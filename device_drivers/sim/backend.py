"""A bleak backend over a bumble central on a :class:`~device_drivers.sim.link.VirtualRadio`.

bleak accepts a backend class (``BleakScanner(backend=...)``, ``BleakClient(..., backend=...)``)
and constructs it itself, so the classes have to know their adapter without being told at
construction time. :class:`SimAdapter` (the hub's Bluetooth adapter) therefore hands out
classes bound to it::

    adapter = await SimAdapter.create(radio)
    scanner = BleakScanner(service_uuids=[HR_SERVICE], backend=adapter.scanner_backend)
    client = BleakClient(ble_device, backend=adapter.client_backend)

Everything above those two constructors is unmodified bleak. The adapter's controller is
either on a radio in this process (:meth:`SimAdapter.create`) or reached over a HCI transport
(:meth:`SimAdapter.connect_hci`), e.g. a radio in a child process
(:class:`~device_drivers.sim.process.RadioProcess`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, Protocol, TypeVar

from bleak.args import SizedBuffer
from bleak.assigned_numbers import gatt_char_props_to_strs
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import (
    AdvertisementData,
    AdvertisementDataCallback,
    BaseBleakScanner,
)
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError, BleakGATTProtocolError
from bumble import att, core, hci
from bumble.core import AdvertisingData
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.gatt_client import CharacteristicProxy, DescriptorProxy, ServiceProxy
from bumble.host import Host
from bumble.pairing import PairingDelegate
from bumble.transport import open_transport
from bumble.transport.common import Transport

from device_drivers.sim.link import REMOTE_HOST_ADDRESS, SimError, VirtualRadio, make_device

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# ATT MTU the hub asks for: what BlueZ and Android offer (517) is more than any health
# profile needs; 247 fits one LE data packet with data length extension, as phones use.
HUB_ATT_MTU: Final = 247

# A single retry is enough: the second failure after securing the link is a real refusal.
_SECURITY_ERRORS: Final = frozenset(
    {
        att.ErrorCode.INSUFFICIENT_AUTHENTICATION,
        att.ErrorCode.INSUFFICIENT_ENCRYPTION,
    }
)

_AD_UUID16: Final = frozenset(
    {
        AdvertisingData.Type.INCOMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS,
        AdvertisingData.Type.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS,
    }
)
_AD_UUID32: Final = frozenset(
    {
        AdvertisingData.Type.INCOMPLETE_LIST_OF_32_BIT_SERVICE_CLASS_UUIDS,
        AdvertisingData.Type.COMPLETE_LIST_OF_32_BIT_SERVICE_CLASS_UUIDS,
    }
)
_AD_UUID128: Final = frozenset(
    {
        AdvertisingData.Type.INCOMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
        AdvertisingData.Type.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
    }
)
_BLUETOOTH_BASE_UUID_TAIL: Final = "-0000-1000-8000-00805f9b34fb"


class SimBleakError(SimError, BleakError):
    """Raised through the bleak API by the simulated backend (catchable as BleakError)."""


class NotConnectedError(SimBleakError):
    """The operation needs a connection and there is none."""


class PeripheralDisconnectedError(SimBleakError):
    """The peripheral went away while the operation was in flight."""


class ConnectTimeoutError(SimBleakError, TimeoutError):
    """No connection within the timeout (the peripheral is absent or not advertising).

    Also a :class:`TimeoutError`, which is what bleak's own backends raise here and what
    bleak-retry-connector counts as a timed-out attempt.
    """


class ConnectFailedError(SimBleakError):
    """The controller reported a failed connection attempt."""


class PairingFailedError(SimBleakError):
    """Pairing or re-encryption with a bonded peripheral failed."""


class NotifyNotSupportedError(SimBleakError):
    """The characteristic supports neither notifications nor indications."""


class PairingAgent(Protocol):
    """What the hub's user (or a test playing one) answers during pairing.

    Without an agent the adapter pairs with Just Works only, like a headless gateway.
    """

    async def request_passkey(self, address: str) -> int | None:
        """The 6-digit passkey the peripheral displays, or None to refuse."""
        ...

    async def confirm_numeric(self, address: str, number: int) -> bool:
        """Whether ``number`` matches the one the peripheral displays."""
        ...


@dataclass(frozen=True, slots=True)
class SimDeviceDetails:
    """``BLEDevice.details`` for devices seen on the virtual radio."""

    address: str
    address_type: int


class _AgentDelegate(PairingDelegate):
    def __init__(self, agent: PairingAgent, address: str) -> None:
        super().__init__(
            io_capability=PairingDelegate.IoCapability.DISPLAY_OUTPUT_AND_KEYBOARD_INPUT
        )
        self._agent = agent
        self._address = address

    async def get_number(self) -> int | None:
        return await self._agent.request_passkey(self._address)

    async def compare_numbers(self, number: int, digits: int) -> bool:
        return await self._agent.confirm_numeric(self._address, number)


class SimAdapter:
    """The hub's Bluetooth adapter: one bumble central on a virtual radio (directly or over HCI).

    It owns what an OS Bluetooth stack owns for bleak: one scan shared by every scanner,
    one connection attempt at a time (controllers allow one pending LE Create Connection),
    the bond store and the pairing agent.
    """

    def __init__(
        self,
        device: Device,
        *,
        agent: PairingAgent | None = None,
        transport: Transport | None = None,
    ) -> None:
        """Wrap a powered-on central; ``transport``, if given, is its HCI transport, which
        the adapter then owns and closes on :meth:`close`."""
        self.device = device
        self.agent = agent
        self._transport = transport
        self._connect_lock = asyncio.Lock()
        self._scan_lock = asyncio.Lock()
        self._scan_listeners: dict[Hashable, Callable[[Advertisement], None]] = {}
        self._clients: dict[int, SimBleakClient] = {}
        # Security requests that arrived before a client took the connection over.
        self._early_security_requests: set[int] = set()
        self._closed = False
        device.on(Device.EVENT_ADVERTISEMENT, self._on_advertisement)
        device.on(Device.EVENT_CONNECTION, self._on_connection)
        self.scanner_backend, self.client_backend = _bind_backends(self)

    @classmethod
    async def create(
        cls,
        radio: VirtualRadio,
        name: str = "trialstream-hub",
        *,
        agent: PairingAgent | None = None,
    ) -> SimAdapter:
        """An adapter whose controller is on ``radio``, in this process."""
        device = await radio.create_device(name, pairing_delegate=_pairing_delegate(agent))
        return cls(device, agent=agent)

    @classmethod
    async def connect_hci(
        cls,
        spec: str,
        name: str = "trialstream-hub",
        *,
        address: hci.Address = REMOTE_HOST_ADDRESS,
        agent: PairingAgent | None = None,
    ) -> SimAdapter:
        """An adapter whose controller is reached over a HCI transport, as a real hub's is.

        ``spec`` is a bumble transport name, e.g. ``"tcp-client:127.0.0.1:9001"`` for a
        controller that :meth:`VirtualRadio.add_remote_host_controller` serves with
        ``"tcp-server:127.0.0.1:9001"``, possibly in another process. Only the host stack
        (bumble's host, GATT client, SMP) then runs here, which is what lets a benchmark
        measure the hub without the radio. ``address`` is the hub's random static address;
        give each hub on one radio its own. The adapter closes the transport on
        :meth:`close`.
        """
        transport = await open_transport(spec)
        try:
            device = make_device(
                name,
                Host(transport.source, transport.sink),
                address,
                pairing_delegate=_pairing_delegate(agent),
            )
            await device.power_on()
        except BaseException:
            await transport.close()
            raise
        return cls(device, agent=agent, transport=transport)

    @property
    def address(self) -> str:
        return _address_string(self.device.random_address)

    async def close(self) -> None:
        """Disconnect every client, stop scanning, stop listening to the central and close
        its HCI transport if the adapter owns one."""
        if self._closed:
            return
        self._closed = True
        for client in list(self._clients.values()):
            await client.disconnect()
        async with self._scan_lock:
            self._scan_listeners.clear()
            if self.device.is_scanning:
                await self.device.stop_scanning()
        self.device.remove_listener(Device.EVENT_ADVERTISEMENT, self._on_advertisement)
        self.device.remove_listener(Device.EVENT_CONNECTION, self._on_connection)
        if self._transport is not None:
            await self._transport.close()

    async def is_bonded(self, address: str) -> bool:
        keystore = self.device.keystore
        return keystore is not None and await keystore.get(address) is not None

    async def forget(self, address: str) -> None:
        """Delete the bond with ``address`` (no-op when there is none)."""
        keystore = self.device.keystore
        if keystore is not None and await keystore.get(address) is not None:
            await keystore.delete(address)

    async def _start_scan(self, token: Hashable, listener: Callable[[Advertisement], None]) -> None:
        async with self._scan_lock:
            if self._closed:
                raise SimBleakError("the adapter is closed")
            self._scan_listeners[token] = listener
            if not self.device.is_scanning:
                await self.device.start_scanning(active=True, filter_duplicates=False)

    async def _stop_scan(self, token: Hashable) -> None:
        async with self._scan_lock:
            self._scan_listeners.pop(token, None)
            if not self._scan_listeners and self.device.is_scanning:
                await self.device.stop_scanning()

    def _on_advertisement(self, advertisement: Advertisement) -> None:
        for listener in list(self._scan_listeners.values()):
            listener(advertisement)

    def _on_connection(self, connection: Connection) -> None:
        # Listen from the first moment: a peripheral may ask for security before the
        # connecting client has even been handed its connection.
        handle = connection.handle

        def on_security_request(_auth_req: int) -> None:
            client = self._clients.get(handle)
            if client is None:
                self._early_security_requests.add(handle)
            else:
                client._on_security_request()

        def on_disconnection(_reason: int) -> None:
            self._early_security_requests.discard(handle)

        connection.on(Connection.EVENT_SECURITY_REQUEST, on_security_request)
        connection.on(Connection.EVENT_DISCONNECTION, on_disconnection)

    def _register(self, client: SimBleakClient, connection: Connection) -> None:
        self._clients[connection.handle] = client
        if connection.handle in self._early_security_requests:
            self._early_security_requests.discard(connection.handle)
            client._on_security_request()

    def _unregister(self, client: SimBleakClient) -> None:
        for handle, known in list(self._clients.items()):
            if known is client:
                del self._clients[handle]

    async def _connect(self, address: hci.Address, within: float) -> Connection:
        async with self._connect_lock:
            # bumble does not expect its commands to be cancelled half-way (a late Command
            # Status then lands on a cancelled future), so the attempt runs in its own task
            # and a caller's cancellation is turned into LE Create Connection Cancel.
            attempt = asyncio.get_running_loop().create_task(
                self.device.connect(
                    address, own_address_type=hci.OwnAddressType.RANDOM, timeout=within
                ),
                name=f"sim-connect-{address}",
            )
            try:
                connection: Connection = await asyncio.shield(attempt)
            except asyncio.CancelledError:
                await self._abandon(attempt)
                raise
            except core.TimeoutError as error:
                raise ConnectTimeoutError(
                    f"no connection to {address} within {within} s"
                ) from error
            except core.ConnectionError as error:
                raise ConnectFailedError(f"connection to {address} failed: {error}") from error
            return connection

    async def _abandon(self, attempt: asyncio.Task[Connection]) -> None:
        if not attempt.done():
            with contextlib.suppress(hci.HCI_Error, core.BaseBumbleError):
                await self.device.send_sync_command(hci.HCI_LE_Create_Connection_Cancel_Command())
        try:
            connection = await attempt
        except (core.BaseBumbleError, hci.HCI_Error):
            return
        with contextlib.suppress(hci.HCI_Error, core.BaseBumbleError):
            await connection.disconnect()


class SimBleakScanner(BaseBleakScanner):
    """bleak scanner backend; use ``SimAdapter.scanner_backend`` (bound to an adapter)."""

    adapter: ClassVar[SimAdapter]

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: Literal["active", "passive"] = "active",
        **kwargs: Any,
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        self._scanning_mode = scanning_mode
        self._token = object()

    async def start(self) -> None:
        self.seen_devices = {}
        await self.adapter._start_scan(self._token, self._on_advertisement)

    async def stop(self) -> None:
        await self.adapter._stop_scan(self._token)

    def _on_advertisement(self, advertisement: Advertisement) -> None:
        parsed = _parse_advertisement(advertisement)
        if not self.is_allowed_uuid(parsed.service_uuids):
            return
        address = _address_string(advertisement.address)
        device = self.create_or_update_device(
            address,
            address,
            parsed.local_name,
            SimDeviceDetails(address, int(advertisement.address.address_type)),
            parsed,
        )
        self.call_detection_callbacks(device, parsed)


class SimBleakClient(BaseBleakClient):
    """bleak client backend; use ``SimAdapter.client_backend`` (bound to an adapter)."""

    adapter: ClassVar[SimAdapter]

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        *,
        disconnected_callback: Callable[[], None] | None,
        timeout: float,
        services: set[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            address_or_ble_device,
            disconnected_callback=disconnected_callback,
            timeout=timeout,
        )
        self._name = (
            address_or_ble_device.name
            if isinstance(address_or_ble_device, BLEDevice) and address_or_ble_device.name
            else self.address.replace(":", "-")
        )
        self._service_filter = services
        self._connection: Connection | None = None
        self._peer: Peer | None = None
        self._subscribers: dict[int, Callable[[bytes], None]] = {}
        self._security_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._disconnected = asyncio.Event()
        self._disconnected.set()

    @property
    def name(self) -> str:
        return self._name

    @property
    def mtu_size(self) -> int:
        if self._connection is None:
            return att.ATT_DEFAULT_MTU
        return int(self._connection.att_mtu)

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        if self._connection is not None:
            return
        timeout = float(kwargs.get("timeout", self._timeout))
        address = _parse_address(self.address)
        connection = await self.adapter._connect(address, timeout)
        self._attach(connection)
        try:
            if await self.adapter.is_bonded(self.address):
                await self._secure(pair_if_unbonded=False)
            elif pair:
                await self._secure(pair_if_unbonded=True)
            peer = self._require_peer()
            await self._gatt(lambda: peer.request_mtu(HUB_ATT_MTU))
            self.services = await self._discover(peer)
        except BaseException:
            await self._drop()
            raise

    async def disconnect(self) -> None:
        connection = self._connection
        if connection is None:
            return
        with contextlib.suppress(hci.HCI_Error, core.BaseBumbleError):
            await connection.disconnect()
        await self._disconnected.wait()
        # Cancelled on disconnection; wait for them to finish unwinding.
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        await self._secure(pair_if_unbonded=True)

    async def unpair(self) -> None:
        await self.disconnect()
        await self.adapter.forget(self.address)

    async def read_gatt_char(
        self,
        characteristic: BleakGATTCharacteristic,
        *,
        use_cached: bool = False,
        **kwargs: Any,
    ) -> bytearray:
        proxy: CharacteristicProxy[bytes] = characteristic.obj
        return bytearray(await self._secured_gatt(proxy.read_value))

    async def read_gatt_descriptor(
        self,
        descriptor: BleakGATTDescriptor,
        *,
        use_cached: bool = False,
        **kwargs: Any,
    ) -> bytearray:
        proxy: DescriptorProxy = descriptor.obj
        return bytearray(await self._secured_gatt(proxy.read_value))

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: SizedBuffer, response: bool
    ) -> None:
        proxy: CharacteristicProxy[bytes] = characteristic.obj
        value = bytes(data)
        await self._secured_gatt(lambda: proxy.write_value(value, with_response=response))

    async def write_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, data: SizedBuffer
    ) -> None:
        proxy: DescriptorProxy = descriptor.obj
        value = bytes(data)
        await self._secured_gatt(lambda: proxy.write_value(value, with_response=True))

    async def start_notify(
        self,
        characteristic: BleakGATTCharacteristic,
        callback: NotifyCallback,
        **kwargs: Any,
    ) -> None:
        proxy: CharacteristicProxy[bytes] = characteristic.obj
        if not {"notify", "indicate"} & set(characteristic.properties):
            raise NotifyNotSupportedError(
                f"{characteristic.uuid} supports neither notify nor indicate"
            )
        previous = self._subscribers.pop(proxy.handle, None)

        def deliver(value: bytes) -> None:
            callback(bytearray(value))

        self._subscribers[proxy.handle] = deliver
        if previous is not None:
            await self._gatt(lambda: proxy.unsubscribe(previous))
        await self._secured_gatt(lambda: proxy.subscribe(deliver, prefer_notify=True))

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        proxy: CharacteristicProxy[bytes] = characteristic.obj
        subscriber = self._subscribers.pop(proxy.handle, None)
        if subscriber is None:
            return
        await self._gatt(lambda: proxy.unsubscribe(subscriber))

    def _attach(self, connection: Connection) -> None:
        self._connection = connection
        self._peer = Peer(connection)
        self._disconnected.clear()
        connection.on(Connection.EVENT_DISCONNECTION, self._on_disconnection)
        self.adapter._register(self, connection)

    def _on_disconnection(self, reason: int) -> None:
        logger.debug("sim client disconnected address=%s reason=0x%02X", self.address, reason)
        self._connection = None
        self._peer = None
        self._subscribers.clear()
        self.services = None
        self.adapter._unregister(self)
        for task in self._tasks:
            task.cancel()
        self._disconnected.set()
        callback = self._disconnected_callback
        if callback is not None:
            asyncio.get_running_loop().call_soon(callback)

    def _on_security_request(self) -> None:
        task = asyncio.get_running_loop().create_task(
            self._answer_security_request(), name=f"sim-security-{self.address}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_security_request(self) -> None:
        try:
            await self._secure(pair_if_unbonded=True)
        except SimBleakError as error:
            logger.warning("sim security request failed address=%s error=%s", self.address, error)

    async def _secure(self, *, pair_if_unbonded: bool) -> None:
        """Encrypt with the bond if there is one, else pair (when allowed).

        One pairing session at a time per connection: a peripheral's security request and
        an application's ``pair()`` both come through here.
        """
        async with self._security_lock:
            connection = self._require_connection()
            bonded = await self.adapter.is_bonded(self.address)
            if connection.is_encrypted and (bonded or not pair_if_unbonded):
                return
            try:
                if bonded:
                    await self._gatt(connection.encrypt)
                elif pair_if_unbonded:
                    await self._gatt(connection.pair)
            except (hci.HCI_Error, core.ProtocolError) as error:
                raise PairingFailedError(f"securing {self.address} failed: {error}") from error

    async def _secured_gatt(self, operation: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await self._gatt(operation)
        except BleakGATTProtocolError as error:
            if error.args[0] not in _SECURITY_ERRORS:
                raise
        await self._secure(pair_if_unbonded=True)
        return await self._gatt(operation)

    async def _gatt(self, operation: Callable[[], Awaitable[_T]]) -> _T:
        self._require_connection()
        try:
            return await operation()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if (task is not None and task.cancelling()) or self._connection is not None:
                raise
            raise PeripheralDisconnectedError(f"{self.address} disconnected") from None
        except att.ATT_Error as error:
            raise BleakGATTProtocolError(error.error_code) from error
        except core.TimeoutError as error:
            raise SimBleakError(f"GATT operation on {self.address} timed out") from error

    def _require_connection(self) -> Connection:
        if self._connection is None:
            raise NotConnectedError(f"not connected to {self.address}")
        return self._connection

    def _require_peer(self) -> Peer:
        if self._peer is None:
            raise NotConnectedError(f"not connected to {self.address}")
        return self._peer

    async def _discover(self, peer: Peer) -> BleakGATTServiceCollection:
        wanted = (
            [core.UUID(_bumble_uuid_string(u)) for u in self._service_filter]
            if self._service_filter
            else []
        )
        services: list[ServiceProxy] = await self._gatt(lambda: peer.discover_services(wanted))
        collection = BleakGATTServiceCollection()
        for service in services:
            bleak_service = BleakGATTService(service, service.handle, _bleak_uuid(service.uuid))
            collection.add_service(bleak_service)
            characteristics = await self._gatt(service.discover_characteristics)
            for characteristic in characteristics:
                bleak_characteristic = BleakGATTCharacteristic(
                    characteristic,
                    characteristic.handle,
                    _bleak_uuid(characteristic.uuid),
                    sorted(gatt_char_props_to_strs(int(characteristic.properties))),
                    self._max_write_without_response,
                    bleak_service,
                )
                collection.add_characteristic(bleak_characteristic)
                descriptors = await self._gatt(characteristic.discover_descriptors)
                for descriptor in descriptors:
                    collection.add_descriptor(
                        BleakGATTDescriptor(
                            descriptor,
                            descriptor.handle,
                            _bleak_uuid(descriptor.type),
                            bleak_characteristic,
                        )
                    )
        return collection

    def _max_write_without_response(self) -> int:
        return self.mtu_size - 3

    async def _drop(self) -> None:
        if self._connection is not None:
            await self.disconnect()


def _pairing_delegate(agent: PairingAgent | None) -> Callable[[Connection], PairingDelegate]:
    """The hub's SMP delegate for a connection: Just Works, or ``agent`` answering."""

    def delegate(connection: Connection) -> PairingDelegate:
        if agent is None:
            return PairingDelegate()
        return _AgentDelegate(agent, _address_string(connection.peer_address))

    return delegate


def _bind_backends(
    adapter: SimAdapter,
) -> tuple[type[SimBleakScanner], type[SimBleakClient]]:
    class BoundSimBleakScanner(SimBleakScanner):
        pass

    class BoundSimBleakClient(SimBleakClient):
        pass

    BoundSimBleakScanner.adapter = adapter
    BoundSimBleakClient.adapter = adapter
    return BoundSimBleakScanner, BoundSimBleakClient


def _address_string(address: hci.Address) -> str:
    return str(address.to_string(with_type_qualifier=False))


def _parse_address(address: str) -> hci.Address:
    text = address.replace("-", ":").upper()
    if text.endswith("/P"):
        return hci.Address(text[:-2], hci.Address.PUBLIC_DEVICE_ADDRESS)
    return hci.Address(text, hci.Address.RANDOM_DEVICE_ADDRESS)


def _bleak_uuid(value: core.UUID) -> str:
    return str(uuid.UUID(bytes=bytes(reversed(value.to_bytes(force_128=True)))))


def _bumble_uuid_string(value: str) -> str:
    text = value.lower()
    if text.startswith("0000") and text.endswith(_BLUETOOTH_BASE_UUID_TAIL):
        return text[4:8]
    return text


def _uuids_from(data: bytes, width: int) -> list[str]:
    return [
        _bleak_uuid(core.UUID.from_bytes(data[offset : offset + width]))
        for offset in range(0, len(data) - width + 1, width)
    ]


def _parse_advertisement(advertisement: Advertisement) -> AdvertisementData:
    local_name: str | None = None
    service_uuids: list[str] = []
    manufacturer_data: dict[int, bytes] = {}
    service_data: dict[str, bytes] = {}
    tx_power: int | None = None
    for ad_type, payload in advertisement.data.ad_structures:
        if ad_type == AdvertisingData.Type.COMPLETE_LOCAL_NAME or (
            ad_type == AdvertisingData.Type.SHORTENED_LOCAL_NAME and local_name is None
        ):
            local_name = payload.decode("utf-8", errors="replace")
        elif ad_type in _AD_UUID16:
            service_uuids.extend(_uuids_from(payload, 2))
        elif ad_type in _AD_UUID32:
            service_uuids.extend(_uuids_from(payload, 4))
        elif ad_type in _AD_UUID128:
            service_uuids.extend(_uuids_from(payload, 16))
        elif ad_type == AdvertisingData.Type.MANUFACTURER_SPECIFIC_DATA and len(payload) >= 2:
            manufacturer_data[int.from_bytes(payload[:2], "little")] = payload[2:]
        elif ad_type == AdvertisingData.Type.SERVICE_DATA_16_BIT_UUID and len(payload) >= 2:
            service_data[_bleak_uuid(core.UUID.from_bytes(payload[:2]))] = payload[2:]
        elif ad_type == AdvertisingData.Type.TX_POWER_LEVEL and payload:
            tx_power = int.from_bytes(payload[:1], "little", signed=True)
    return AdvertisementData(
        local_name=local_name,
        manufacturer_data=manufacturer_data,
        service_data=service_data,
        # bumble merges advertising and scan response data, which may repeat structures.
        service_uuids=list(dict.fromkeys(service_uuids)),
        tx_power=tx_power,
        rssi=int(advertisement.rssi),
        platform_data=(advertisement,),
    )
