"""Bluetooth without hardware: a bleak backend over bumble virtual controllers, and wearables.

- :mod:`device_drivers.sim.link`: :class:`VirtualRadio`, one in-process LE link whose bumble
  devices (the hub's adapter, the wearables) reach each other through virtual controllers;
  a controller can also serve a host in another process over a HCI transport.
- :mod:`device_drivers.sim.backend`: :class:`SimAdapter`, the hub's adapter on a radio (or on
  a controller reached over HCI), and the bleak backend classes bound to it
  (``adapter.scanner_backend``, ``adapter.client_backend``) that unmodified bleak code drives.
- :mod:`device_drivers.sim.process`: :class:`RadioProcess`, a radio with wearables and the
  hub's controller in a child process, split from the hub as a dongle is from its host.
- :mod:`device_drivers.sim.wearable`: :class:`VirtualWearable` (advertising, GATT, Battery,
  Device Information, Current Time, battery drain, going out of range, injected faults)
  and :class:`VirtualHeartRateStrap`.
- :mod:`device_drivers.sim.profiles`: thermometer, blood pressure cuff, pulse oximeter,
  glucose meter (stored records through RACP) and weight scale with body composition.
- :mod:`device_drivers.sim.signals`: their seeded signals, with abnormal episodes.

A test or the demo::

    async with VirtualRadio() as radio:
        adapter = await SimAdapter.create(radio)
        async with VirtualHeartRateStrap("TS-HRM-0001", seed=7).running(radio) as strap:
            async with BleakClient(strap.address, backend=adapter.client_backend) as client:
                ...

or, with the radio in a child process and only the hub's host stack in this one::

    strap = functools.partial(VirtualHeartRateStrap, "TS-HRM-0001", seed=7)
    async with RadioProcess([strap], hci_port=port) as radio:
        adapter = await SimAdapter.connect_hci(radio.hci_spec)
        ...
"""

from device_drivers.sim.backend import (
    ConnectFailedError,
    ConnectTimeoutError,
    NotConnectedError,
    NotifyNotSupportedError,
    PairingAgent,
    PairingFailedError,
    PeripheralDisconnectedError,
    SimAdapter,
    SimBleakError,
)
from device_drivers.sim.link import RadioClosedError, SimError, VirtualRadio
from device_drivers.sim.process import RadioProcess, RadioProcessError
from device_drivers.sim.profiles import (
    GlucoseRecord,
    VirtualBloodPressureCuff,
    VirtualGlucoseMeter,
    VirtualPulseOximeter,
    VirtualThermometer,
    VirtualWeightScale,
)
from device_drivers.sim.wearable import (
    DeviceInformation,
    Faults,
    HeartRateSignal,
    VirtualHeartRateStrap,
    VirtualWearable,
    WearableError,
    WearableOptions,
)

__all__ = [
    "ConnectFailedError",
    "ConnectTimeoutError",
    "DeviceInformation",
    "Faults",
    "GlucoseRecord",
    "HeartRateSignal",
    "NotConnectedError",
    "NotifyNotSupportedError",
    "PairingAgent",
    "PairingFailedError",
    "PeripheralDisconnectedError",
    "RadioClosedError",
    "RadioProcess",
    "RadioProcessError",
    "SimAdapter",
    "SimBleakError",
    "SimError",
    "VirtualBloodPressureCuff",
    "VirtualGlucoseMeter",
    "VirtualHeartRateStrap",
    "VirtualPulseOximeter",
    "VirtualRadio",
    "VirtualThermometer",
    "VirtualWearable",
    "VirtualWeightScale",
    "WearableError",
    "WearableOptions",
]
