"""The virtual radio: bumble controllers sharing one in-process LE link.

Every device on a :class:`VirtualRadio` is a full bumble stack (host + controller) whose
controller talks to the others over a :class:`bumble.link.LocalLink`. The hub's adapter is one
central device; each virtual wearable is a peripheral device. A controller can also serve a
host elsewhere over a HCI transport (:meth:`VirtualRadio.add_remote_host_controller`), as a
dongle serves the host stack of a real hub. Nothing here knows about bleak;
``device_drivers.sim.backend`` puts bleak on top of a central device.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import sys
from collections.abc import Callable
from typing import Final

from bumble import colors, hci
from bumble.controller import Controller
from bumble.device import Connection, Device, DeviceConfiguration
from bumble.host import Host
from bumble.keys import MemoryKeyStore
from bumble.link import LocalLink
from bumble.pairing import PairingConfig, PairingDelegate
from bumble.transport import open_transport
from bumble.transport.common import AsyncPipeSink, Transport

from device_drivers.errors import DeviceDriverError

logger = logging.getLogger(__name__)

# Random static addresses (Core Vol 6, Part B, 1.3.2.1): the two most significant bits are 1.
# The second octet makes simulated devices easy to spot in logs.
_STATIC_ADDRESS_PREFIX: Final = "C0:5E"
_MAX_DEVICES: Final = 0xFFFF
# A host reaching the radio over HCI picks its own address; this default is outside the
# C0:5E:00:00:xx:xx range the radio allocates, so it never collides with a wearable's.
REMOTE_HOST_ADDRESS: Final = hci.Address("C0:5E:01:00:00:01", hci.Address.RANDOM_DEVICE_ADDRESS)
# Distinct (text, colours) pairs bumble's color() is remembered for: its labels are fixed
# strings, and the few that carry a value (an unexpected event's name) are rare.
COLOURED_LABELS: Final = 512


def _spare_unlogged_packet_text() -> None:
    """bumble puts every HCI packet and ATT PDU it sends or receives into a debug line with an
    f-string (``logger.debug(f"{color('### CONTROLLER -> HOST', 'green')}: {packet}")``), so
    each packet is rendered as text, in colour, whatever the log level: a sixth of the
    simulated host's work under a steady stream of notifications (docs/performance.md).
    While the ``bumble`` logger does not log at DEBUG, a packet's fields and an ACL packet's
    data render as ``...``; with DEBUG on, as bumble writes them. bumble's ``color()`` (pure:
    the same text for the same arguments) is remembered for the few hundred labels it
    colours, in every bumble module that imported it. BlueZ, which a real hub uses, has no
    such cost; the text of a packet is never read by this code."""
    original_fields: Callable[..., object] = hci.HCI_Object.format_fields
    if getattr(original_fields, "_trialstream_spared", False):
        return
    bumble_log = logging.getLogger("bumble")

    def format_fields(
        hci_object: object,
        object_fields: object,
        indentation: str = "",
        value_mappers: object = None,
    ) -> str:
        if bumble_log.isEnabledFor(logging.DEBUG):
            return str(original_fields(hci_object, object_fields, indentation, value_mappers))
        return f"{indentation}..."

    format_fields._trialstream_spared = True  # type: ignore[attr-defined]
    hci.HCI_Object.format_fields = staticmethod(format_fields)  # type: ignore[method-assign]

    original_acl: Callable[[hci.HCI_AclDataPacket], str] = hci.HCI_AclDataPacket.__str__

    def acl_text(packet: hci.HCI_AclDataPacket) -> str:
        if bumble_log.isEnabledFor(logging.DEBUG):
            return original_acl(packet)
        return f"ACL: handle=0x{packet.connection_handle:04x}, ..."

    hci.HCI_AclDataPacket.__str__ = acl_text  # type: ignore[method-assign]

    original_color = colors.color
    remembered = functools.lru_cache(maxsize=COLOURED_LABELS)(original_color)

    def color(
        s: str,
        fg: colors.ColorSpec | None = None,
        bg: colors.ColorSpec | None = None,
        style: str | None = None,
    ) -> str:
        return remembered(s, fg, bg, style)

    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] == "bumble" and getattr(module, "color", None) is original_color:
            module.color = color  # type: ignore[attr-defined]


_spare_unlogged_packet_text()


class SimError(DeviceDriverError):
    """Base of every error raised by ``device_drivers.sim``."""


class RadioClosedError(SimError):
    """The virtual radio was closed; it cannot create or serve devices any more."""


class CancellableController(Controller):
    """A bumble controller that honours LE Create Connection Cancel.

    bumble's stock controller acknowledges the cancel but keeps the connection attempt
    pending and never reports its end, so a host waiting for an absent peer waits forever.
    Per Core Vol 4, Part E, 7.8.13 the controller ends the attempt and reports an LE
    Connection Complete event with status Unknown Connection Identifier.
    """

    def on_hci_le_create_connection_cancel_command(
        self, command: hci.HCI_LE_Create_Connection_Cancel_Command
    ) -> hci.HCI_StatusReturnParameters:
        pending = self.pending_le_connection
        if pending is None:
            return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR)
        self.pending_le_connection = None
        # Scheduled, so the host sees Command Complete for the cancel before the failure.
        asyncio.get_running_loop().call_soon(self._report_cancelled_connection, pending)
        return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.SUCCESS)

    def _report_cancelled_connection(
        self,
        pending: hci.HCI_LE_Create_Connection_Command
        | hci.HCI_LE_Extended_Create_Connection_Command,
    ) -> None:
        self.send_hci_packet(
            hci.HCI_LE_Connection_Complete_Event(
                status=hci.HCI_ErrorCode.UNKNOWN_CONNECTION_IDENTIFIER_ERROR,
                connection_handle=0,
                role=hci.Role.CENTRAL,
                peer_address_type=pending.peer_address_type,
                peer_address=pending.peer_address,
                connection_interval=0,
                peripheral_latency=0,
                supervision_timeout=0,
                central_clock_accuracy=0,
            )
        )


class VirtualRadio:
    """One in-process LE link and the bumble devices on it.

    Use as an async context manager (or call :meth:`close`): closing powers every device off
    and takes its controller off the link.
    """

    def __init__(self) -> None:
        self._link = LocalLink()  # type: ignore[no-untyped-call]  # bumble leaves it unannotated
        self._devices: list[tuple[Device, Controller]] = []
        self._remote_controllers: list[tuple[Controller, Transport]] = []
        self._serial = itertools.count(1)
        self._closed = False

    async def __aenter__(self) -> VirtualRadio:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def allocate_address(self) -> hci.Address:
        """A fresh random static address, unique on this radio."""
        serial = next(self._serial)
        if serial > _MAX_DEVICES:
            raise SimError("virtual radio ran out of device addresses")
        return hci.Address(
            f"{_STATIC_ADDRESS_PREFIX}:00:00:{serial >> 8:02X}:{serial & 0xFF:02X}",
            hci.Address.RANDOM_DEVICE_ADDRESS,
        )

    async def create_device(
        self,
        name: str,
        *,
        address: hci.Address | None = None,
        pairing_delegate: Callable[[Connection], PairingDelegate] | None = None,
    ) -> Device:
        """Create, power on and return a bumble device on this radio (see :func:`make_device`)."""
        if self._closed:
            raise RadioClosedError("the virtual radio is closed")
        own_address = address if address is not None else self.allocate_address()
        controller = CancellableController(name, link=self._link)
        controller.random_address = own_address
        device = make_device(
            name,
            Host(controller, AsyncPipeSink(controller)),
            own_address,
            pairing_delegate=pairing_delegate,
        )
        self._devices.append((device, controller))
        await device.power_on()
        logger.debug("sim device up name=%s address=%s", name, own_address)
        return device

    async def add_remote_host_controller(
        self, spec: str, name: str = "remote-host-controller"
    ) -> Controller:
        """Put one more controller on this radio, its host at the far end of a HCI transport.

        This is how a real hub is split: the controller (a USB dongle) does the radio work
        and a host stack in another process talks HCI to it. ``spec`` is a bumble transport
        name for the controller's side, e.g. ``"tcp-server:127.0.0.1:9001"``; the host opens
        the other side (``"tcp-client:127.0.0.1:9001"``, see
        :meth:`~device_drivers.sim.backend.SimAdapter.connect_hci`), which may be in another
        process, so the radio's CPU cost and the host's can be measured apart. The host sets
        the controller's address over HCI. The radio closes the transport when it closes:
        to the host that is the dongle being unplugged.
        """
        if self._closed:
            raise RadioClosedError("the virtual radio is closed")
        transport = await open_transport(spec)
        controller = CancellableController(
            name, host_source=transport.source, host_sink=transport.sink, link=self._link
        )
        self._remote_controllers.append((controller, transport))
        logger.debug("sim remote host controller up name=%s spec=%s", name, spec)
        return controller

    async def remove_device(self, device: Device) -> None:
        """Power a device off and take its controller off the link."""
        for index, (known, controller) in enumerate(self._devices):
            if known is device:
                del self._devices[index]
                await _shut_down(device, controller, self._link)
                return

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        devices, self._devices = self._devices, []
        for device, controller in devices:
            await _shut_down(device, controller, self._link)
        # After the devices: their disconnections still reach the remote hosts.
        remotes, self._remote_controllers = self._remote_controllers, []
        for controller, transport in remotes:
            _detach(controller, self._link)
            await _close_transport(transport)


def make_device(
    name: str,
    host: Host,
    address: hci.Address,
    *,
    pairing_delegate: Callable[[Connection], PairingDelegate] | None = None,
) -> Device:
    """A bumble device (not yet powered on) configured as every simulated device is.

    ``pairing_delegate`` makes the SMP delegate (IO capability, passkey, confirmation)
    for a connection; without it the device pairs with Just Works.

    The device's identity address is its random static address (the RANDOM identity
    address type): bumble otherwise distributes a public identity address it does not
    have, and the bond is then filed under the wrong address and never found again on
    reconnection. Keys are kept in memory only.
    """
    config = DeviceConfiguration()
    config.name = name
    config.address = address
    config.identity_address_type = hci.Address.RANDOM_DEVICE_ADDRESS
    config.irk = (bytes(address) * 3)[:16]
    device = Device(config=config, host=host)
    device.keystore = MemoryKeyStore()
    device.pairing_config_factory = _pairing_config_factory(pairing_delegate)
    return device


def _pairing_config_factory(
    make_delegate: Callable[[Connection], PairingDelegate] | None,
) -> Callable[[Connection], PairingConfig]:
    def factory(connection: Connection) -> PairingConfig:
        return PairingConfig(
            sc=True,
            mitm=True,
            bonding=True,
            delegate=PairingDelegate() if make_delegate is None else make_delegate(connection),
            identity_address_type=PairingConfig.AddressType.RANDOM,
        )

    return factory


async def _shut_down(device: Device, controller: Controller, link: LocalLink) -> None:
    for connection in list(device.connections.values()):
        with contextlib.suppress(hci.HCI_Error, asyncio.TimeoutError):
            await connection.disconnect()
    _detach(controller, link)
    await device.power_off()


def _detach(controller: Controller, link: LocalLink) -> None:
    """Take a controller off the air: no advertising, no pending connection, off the link."""
    controller.le_legacy_advertiser.stop()
    controller.pending_le_connection = None
    with contextlib.suppress(KeyError):
        link.remove_controller(controller)


async def _close_transport(transport: Transport) -> None:
    """Close a controller's HCI transport, including what bumble's ``close()`` leaves open.

    bumble's TCP server transport (0.0.236) closes neither its listening socket nor the
    host's connection; both are closed here, so the host sees the transport lost and the
    port is free again.
    """
    await transport.close()
    server = getattr(transport, "server", None)
    if isinstance(server, asyncio.AbstractServer):
        server.close()
    connection = getattr(transport.sink, "transport", None)
    if isinstance(connection, asyncio.BaseTransport):
        connection.close()
