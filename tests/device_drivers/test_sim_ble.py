"""Real GATT over bumble's virtual radio, driven only through bleak's public API."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.exc import BleakError, BleakGATTProtocolError, BleakGATTProtocolErrorCode
from bleak_retry_connector import establish_connection
from bumble import gatt
from bumble.device import Connection
from bumble.pairing import PairingDelegate

from device_drivers.gatt import heart_rate
from device_drivers.sim import (
    DeviceInformation,
    HeartRateSignal,
    PairingFailedError,
    SimAdapter,
    VirtualHeartRateStrap,
    VirtualRadio,
    VirtualWearable,
)
from device_drivers.sim.wearable import notify_only_value, write_only_value

HEART_RATE_SERVICE = "0000180d-0000-1000-8000-00805f9b34fb"
HEART_RATE_MEASUREMENT = "00002a37-0000-1000-8000-00805f9b34fb"
BODY_SENSOR_LOCATION = "00002a38-0000-1000-8000-00805f9b34fb"
BATTERY_LEVEL = "00002a19-0000-1000-8000-00805f9b34fb"
DIS_STRINGS = {
    "manufacturer": "00002a29-0000-1000-8000-00805f9b34fb",
    "model": "00002a24-0000-1000-8000-00805f9b34fb",
    "serial": "00002a25-0000-1000-8000-00805f9b34fb",
    "firmware": "00002a26-0000-1000-8000-00805f9b34fb",
}
ECHO_SERVICE = "6e2a0000-5c1b-4c8e-9f1e-7a3f0d7c2b10"
ECHO_INDICATION = "6e2a0001-5c1b-4c8e-9f1e-7a3f0d7c2b10"
ECHO_CONTROL_POINT = "6e2a0002-5c1b-4c8e-9f1e-7a3f0d7c2b10"

# Generous bounds: these tests prove behaviour, benchmarks measure time.
DEADLINE_S = 10.0


class EchoWearable(VirtualWearable):
    """A minimal profile: what is written to its control point comes back as an indication."""

    def __init__(self, name: str) -> None:
        super().__init__(
            name,
            DeviceInformation(manufacturer="Test", model="ECHO-1", serial="E-1", firmware="0.1"),
        )
        self.indication: gatt.Characteristic[bytes] = gatt.Characteristic(
            ECHO_INDICATION,
            gatt.Characteristic.Properties.INDICATE,
            gatt.Characteristic.Permissions(0),
            notify_only_value(),
        )
        self._echoes: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)

    def profile_services(self) -> Sequence[gatt.Service]:
        control_point: gatt.Characteristic[bytes] = gatt.Characteristic(
            ECHO_CONTROL_POINT,
            gatt.Characteristic.Properties.WRITE,
            gatt.Characteristic.Permissions.WRITEABLE,
            write_only_value(self._on_write),
        )
        return [gatt.Service(ECHO_SERVICE, [self.indication, control_point])]

    def _on_write(self, _connection: Connection, value: bytes) -> None:
        self._echoes.put_nowait(value)

    async def run_profile(self) -> None:
        while True:
            await self.indicate(self.indication, await self._echoes.get())


class PasskeyAgent:
    """Plays the participant: reads the strap's display and types it in (or a wrong one)."""

    def __init__(self, wearable: VirtualWearable, *, typo: bool = False) -> None:
        self._wearable = wearable
        self._typo = typo

    async def request_passkey(self, address: str) -> int | None:
        shown = await self._wearable.wait_for_displayed_passkey()
        return (shown + 1) % 1_000_000 if self._typo else shown

    async def confirm_numeric(self, address: str, number: int) -> bool:
        return True


@pytest.fixture
async def radio() -> AsyncIterator[VirtualRadio]:
    async with VirtualRadio() as radio:
        yield radio


@pytest.fixture
async def adapter(radio: VirtualRadio) -> AsyncIterator[SimAdapter]:
    adapter = await SimAdapter.create(radio)
    yield adapter
    await adapter.close()


@pytest.fixture
async def strap(radio: VirtualRadio) -> AsyncIterator[VirtualHeartRateStrap]:
    async with VirtualHeartRateStrap("TS-HRM-0001", seed=7, rate_hz=5.0).running(radio) as strap:
        yield strap


async def collect(
    queue: asyncio.Queue[bytearray], count: int
) -> list[heart_rate.HeartRateMeasurement]:
    async with asyncio.timeout(DEADLINE_S):
        return [heart_rate.decode(bytes(await queue.get())) for _ in range(count)]


def enqueue(
    queue: asyncio.Queue[bytearray],
) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
    def on_notify(_characteristic: BleakGATTCharacteristic, data: bytearray) -> None:
        queue.put_nowait(data)

    return on_notify


async def test_scan_with_service_filter_finds_strap_and_not_other_devices(
    radio: VirtualRadio, adapter: SimAdapter, strap: VirtualHeartRateStrap
) -> None:
    async with EchoWearable("TS-ECHO").running(radio) as other:
        everything = await BleakScanner.discover(
            timeout=0.5, return_adv=True, backend=adapter.scanner_backend
        )
        filtered = await BleakScanner.discover(
            timeout=0.5,
            return_adv=True,
            service_uuids=[HEART_RATE_SERVICE],
            backend=adapter.scanner_backend,
        )

    assert {strap.address, other.address} <= everything.keys()
    assert strap.address in filtered
    assert other.address not in filtered
    device, advertisement = filtered[strap.address]
    assert advertisement.local_name == "TS-HRM-0001"
    assert device.name == "TS-HRM-0001"
    assert HEART_RATE_SERVICE in advertisement.service_uuids
    assert everything[other.address][1].service_uuids == [ECHO_SERVICE]


async def test_connect_reads_battery_and_device_information(
    adapter: SimAdapter, strap: VirtualHeartRateStrap
) -> None:
    device = await BleakScanner.find_device_by_address(
        strap.address, timeout=DEADLINE_S, backend=adapter.scanner_backend
    )
    assert device is not None
    await strap.set_battery_level(87)

    async with BleakClient(device, backend=adapter.client_backend) as client:
        assert client.is_connected
        assert client.services.get_service(HEART_RATE_SERVICE) is not None
        assert await client.read_gatt_char(BATTERY_LEVEL) == bytearray([87])
        strings = {
            field: (await client.read_gatt_char(uuid)).decode()
            for field, uuid in DIS_STRINGS.items()
        }
        assert await client.read_gatt_char(BODY_SENSOR_LOCATION) == bytearray([1])

    assert strings == {
        "manufacturer": strap.info.manufacturer,
        "model": strap.info.model,
        "serial": strap.info.serial,
        "firmware": strap.info.firmware,
    }
    assert not client.is_connected


async def test_heart_rate_notifications_arrive_decoded_at_the_configured_rate(
    adapter: SimAdapter, strap: VirtualHeartRateStrap
) -> None:
    queue: asyncio.Queue[bytearray] = asyncio.Queue()
    async with BleakClient(strap.address, backend=adapter.client_backend) as client:
        await client.start_notify(HEART_RATE_MEASUREMENT, enqueue(queue))
        loop = asyncio.get_running_loop()
        await collect(queue, 1)
        started = loop.time()
        measurements = await collect(queue, 10)
        elapsed = loop.time() - started
        await client.stop_notify(HEART_RATE_MEASUREMENT)

    # 10 intervals at 5 Hz are 2 s; only an order-of-magnitude check belongs here.
    assert 10 / strap.rate_hz / 3 < elapsed < 10 / strap.rate_hz * 3
    assert all(55 <= m.bpm <= 90 for m in measurements)
    assert all(m.sensor_contact for m in measurements)
    beats = list(itertools.chain.from_iterable(m.rr_intervals_ms for m in measurements))
    assert beats
    assert all(600 < rr < 1150 for rr in beats)


async def test_abnormal_episode_switches_to_tachycardia(
    adapter: SimAdapter, strap: VirtualHeartRateStrap
) -> None:
    queue: asyncio.Queue[bytearray] = asyncio.Queue()
    async with BleakClient(strap.address, backend=adapter.client_backend) as client:
        await client.start_notify(HEART_RATE_MEASUREMENT, enqueue(queue))
        resting = await collect(queue, 3)
        strap.start_episode()
        await collect(queue, 1)  # may have been sampled before the switch
        episode = await collect(queue, 5)
        strap.end_episode()
        await collect(queue, 1)
        after = await collect(queue, 3)

    assert all(m.bpm < 100 for m in resting + after)
    assert all(130 <= m.bpm <= 150 for m in episode)


def test_heart_rate_signal_is_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[tuple[int, tuple[float, ...]]]:
        signal = HeartRateSignal(seed)
        return [(s.bpm, s.rr_intervals_ms) for s in (signal.next() for _ in range(600))]

    first = run(42)
    assert first == run(42)
    assert first != run(43)
    bpms = [bpm for bpm, _ in first]
    assert all(55 <= bpm <= 90 for bpm in bpms)
    assert max(bpms) - min(bpms) >= 3  # it drifts and is noisy, not a constant


async def test_out_of_range_fires_disconnect_callback_and_reconnect_after_return(
    adapter: SimAdapter, strap: VirtualHeartRateStrap
) -> None:
    disconnected = asyncio.Event()
    client = BleakClient(
        strap.address,
        disconnected_callback=lambda _client: disconnected.set(),
        backend=adapter.client_backend,
    )
    await client.connect()
    try:
        await strap.go_out_of_range()
        async with asyncio.timeout(DEADLINE_S):
            await disconnected.wait()
            await strap.wait_disconnected()
        assert not client.is_connected
        assert not strap.is_connected

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(DEADLINE_S):
                await client.connect(timeout=0.3)

        await strap.come_back()
        disconnected.clear()
        async with asyncio.timeout(DEADLINE_S):
            await client.connect()
        assert client.is_connected
        queue: asyncio.Queue[bytearray] = asyncio.Queue()
        await client.start_notify(HEART_RATE_MEASUREMENT, enqueue(queue))
        assert len(await collect(queue, 2)) == 2
    finally:
        await client.disconnect()
    assert disconnected.is_set()


async def test_bleak_retry_connector_reconnects_when_the_strap_returns(
    adapter: SimAdapter, strap: VirtualHeartRateStrap
) -> None:
    device = await BleakScanner.find_device_by_address(
        strap.address, timeout=DEADLINE_S, backend=adapter.scanner_backend
    )
    assert device is not None
    lost = asyncio.Event()
    client = await establish_connection(
        BleakClient,
        device,
        strap.name,
        disconnected_callback=lambda _client: lost.set(),
        backend=adapter.client_backend,
    )
    try:
        await strap.go_out_of_range(duration=0.3)
        async with asyncio.timeout(DEADLINE_S):
            await lost.wait()
        async with asyncio.timeout(DEADLINE_S):
            client = await establish_connection(
                BleakClient, device, strap.name, backend=adapter.client_backend
            )
        assert await client.read_gatt_char(BATTERY_LEVEL) == bytearray([strap.battery_level])
    finally:
        await client.disconnect()


async def test_connecting_to_an_absent_address_fails_within_its_timeout(
    radio: VirtualRadio, adapter: SimAdapter, strap: VirtualHeartRateStrap
) -> None:
    absent = radio.allocate_address().to_string(with_type_qualifier=False)
    client = BleakClient(absent, timeout=0.3, backend=adapter.client_backend)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(DEADLINE_S):
            await client.connect()
    assert not client.is_connected

    # A caller's own deadline also ends the attempt in the controller...
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await BleakClient(absent, timeout=60, backend=adapter.client_backend).connect()

    # ...so the adapter is free for the next connection.
    async with asyncio.timeout(DEADLINE_S):
        async with BleakClient(strap.address, backend=adapter.client_backend) as client:
            assert client.is_connected


async def test_three_wearables_notify_concurrently(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    straps = [
        VirtualHeartRateStrap(f"TS-HRM-{seed:04d}", seed=seed, rate_hz=5.0) for seed in (1, 2, 3)
    ]
    queues: list[asyncio.Queue[bytearray]] = [asyncio.Queue() for _ in straps]
    for strap in straps:
        await strap.start(radio)
    clients = [BleakClient(s.address, backend=adapter.client_backend) for s in straps]
    try:
        async with asyncio.timeout(DEADLINE_S):
            await asyncio.gather(*(client.connect() for client in clients))
        for client, queue in zip(clients, queues, strict=True):
            await client.start_notify(HEART_RATE_MEASUREMENT, enqueue(queue))
        streams = await asyncio.gather(*(collect(queue, 5) for queue in queues))
    finally:
        for client in clients:
            await client.disconnect()
        for strap in straps:
            await strap.stop()

    assert all(len(stream) == 5 for stream in streams)
    assert all(strap.measurements_sent >= 5 for strap in straps)
    assert len({tuple(m.bpm for m in stream) for stream in streams}) > 1


async def test_indications_and_a_write_only_control_point(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    queue: asyncio.Queue[bytearray] = asyncio.Queue()
    async with (
        EchoWearable("TS-ECHO").running(radio) as echo,
        BleakClient(echo.address, backend=adapter.client_backend) as client,
    ):
        characteristic = client.services.get_characteristic(ECHO_INDICATION)
        assert characteristic is not None
        assert characteristic.properties == ["indicate"]
        await client.start_notify(ECHO_INDICATION, enqueue(queue))
        await client.write_gatt_char(ECHO_CONTROL_POINT, b"\x01\x02", response=True)
        async with asyncio.timeout(DEADLINE_S):
            assert await queue.get() == bytearray(b"\x01\x02")

        with pytest.raises(BleakGATTProtocolError) as refused:
            await client.read_gatt_char(ECHO_CONTROL_POINT)
        assert refused.value.code == BleakGATTProtocolErrorCode.READ_NOT_PERMITTED

        await client.stop_notify(ECHO_INDICATION)
        await client.write_gatt_char(ECHO_CONTROL_POINT, b"\x03", response=True)
        await client.read_gatt_char(BATTERY_LEVEL)  # a round trip after the echo
        assert queue.empty()


async def test_just_works_pairing_bonds_and_bonded_reconnect_encrypts_without_pairing(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    async with VirtualHeartRateStrap("TS-HRM-SEC", require_encryption=True).running(radio) as strap:
        client = BleakClient(strap.address, backend=adapter.client_backend)
        await client.connect()
        try:
            await client.pair()
            await client.pair()  # already paired: no second session
            assert await adapter.is_bonded(strap.address)
            assert await client.read_gatt_char(BODY_SENSOR_LOCATION) == bytearray([1])
            await client.disconnect()

            await client.connect()
            assert await client.read_gatt_char(BODY_SENSOR_LOCATION) == bytearray([1])
            assert strap.pairings == 1

            await client.unpair()
            assert not await adapter.is_bonded(strap.address)
            assert not client.is_connected
        finally:
            await client.disconnect()


async def test_passkey_pairing_with_the_number_the_strap_displays(radio: VirtualRadio) -> None:
    async with VirtualHeartRateStrap(
        "TS-HRM-PIN",
        passkey=246_810,
        io_capability=PairingDelegate.IoCapability.DISPLAY_OUTPUT_ONLY,
        require_encryption=True,
    ).running(radio) as strap:
        adapter = await SimAdapter.create(radio, "hub-pin", agent=PasskeyAgent(strap))
        try:
            async with BleakClient(strap.address, pair=True, backend=adapter.client_backend) as c:
                assert await c.read_gatt_char(BODY_SENSOR_LOCATION) == bytearray([1])
            assert strap.displayed_passkey == 246_810
            assert await adapter.is_bonded(strap.address)
        finally:
            await adapter.close()

        typist = await SimAdapter.create(radio, "hub-typo", agent=PasskeyAgent(strap, typo=True))
        try:
            client = BleakClient(strap.address, pair=True, backend=typist.client_backend)
            with pytest.raises(PairingFailedError):
                async with asyncio.timeout(DEADLINE_S):
                    await client.connect()
            assert isinstance(PairingFailedError("x"), BleakError)
            assert not client.is_connected
            assert not await typist.is_bonded(strap.address)
        finally:
            await typist.close()


async def test_security_request_and_pair_share_one_pairing_session(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    async with VirtualHeartRateStrap(
        "TS-HRM-REQ", require_encryption=True, request_security=True
    ).running(radio) as strap:
        async with BleakClient(strap.address, backend=adapter.client_backend) as client:
            await client.pair()
            assert await client.read_gatt_char(BODY_SENSOR_LOCATION) == bytearray([1])
        assert strap.pairings == 1
        assert await adapter.is_bonded(strap.address)
