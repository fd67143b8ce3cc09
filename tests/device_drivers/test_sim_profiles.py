"""The virtual wearables of every profile, driven through plain bleak and decoded by our parsers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.exc import BleakGATTProtocolError

from device_drivers.gatt import (
    blood_pressure,
    body_composition,
    current_time,
    glucose,
    pulse_oximeter,
    racp,
    temperature,
    weight_scale,
)
from device_drivers.gatt.registry import full_uuid
from device_drivers.sim import (
    SimAdapter,
    VirtualBloodPressureCuff,
    VirtualGlucoseMeter,
    VirtualHeartRateStrap,
    VirtualPulseOximeter,
    VirtualRadio,
    VirtualThermometer,
    VirtualWeightScale,
)
from device_drivers.sim.signals import (
    BloodPressureSignal,
    BodySignal,
    GlucoseSignal,
    OximetrySignal,
    TemperatureSignal,
)
from tests.fixtures.waiting import wait_until

DEADLINE_S = 10.0
BATTERY = full_uuid(0x2A19)
CURRENT_TIME = full_uuid(0x2A2B)
RACP = full_uuid(0x2A52)
GLUCOSE = full_uuid(0x2A18)
CONTEXT = full_uuid(0x2A34)

Queue = asyncio.Queue[bytes]


def enqueue(queue: Queue) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
    def on_value(_char: BleakGATTCharacteristic, data: bytearray) -> None:
        queue.put_nowait(bytes(data))

    return on_value


async def take(queue: Queue, count: int) -> list[bytes]:
    async with asyncio.timeout(DEADLINE_S):
        return [await queue.get() for _ in range(count)]


T = TypeVar("T")


async def from_switch(
    queue: Queue, decode: Callable[[bytes], T], switched: Callable[[T], bool], count: int
) -> list[T]:
    """``count`` values from the first the switch changed on: those measured before it may
    wait in the device's backlog, more of them the busier the machine (at most 200)."""
    async with asyncio.timeout(DEADLINE_S):
        for _ in range(200):
            first = decode(await queue.get())
            if switched(first):
                return [first, *[decode(await queue.get()) for _ in range(count - 1)]]
    raise AssertionError("no value from after the switch in 200")


@pytest.fixture
async def radio() -> AsyncIterator[VirtualRadio]:
    async with VirtualRadio() as radio:
        yield radio


@pytest.fixture
async def adapter(radio: VirtualRadio) -> AsyncIterator[SimAdapter]:
    adapter = await SimAdapter.create(radio)
    yield adapter
    await adapter.close()


async def test_thermometer_indicates_time_stamped_temperatures_and_a_fever(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    queue: Queue = asyncio.Queue()
    thermometer = VirtualThermometer("TS-THERMO-1", seed=3, interval_s=0.05)
    async with (
        thermometer.running(radio),
        BleakClient(thermometer.address, backend=adapter.client_backend) as client,
    ):
        char = client.services.get_characteristic(full_uuid(0x2A1C))
        assert char is not None
        assert char.properties == ["indicate"]
        await client.start_notify(char, enqueue(queue))
        normal = [temperature.decode(p) for p in await take(queue, 4)]
        thermometer.start_episode()
        fever = await from_switch(
            queue, temperature.decode, lambda m: float(m.temperature) >= 38.0, 4
        )

    now = datetime.now(UTC)
    for m in normal + fever:
        assert m.unit is temperature.TemperatureUnit.CELSIUS
        assert m.timestamp is not None
        stamp = m.timestamp.to_datetime()
        assert stamp is not None
        assert abs(stamp - now) < timedelta(minutes=1)
    assert all(36.0 <= float(m.temperature) <= 37.3 for m in normal)  # type: ignore[arg-type]
    assert all(38.3 <= float(m.temperature) <= 39.6 for m in fever)  # type: ignore[arg-type]


async def test_thermometer_keeps_measurements_until_a_hub_subscribes(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    thermometer = VirtualThermometer("TS-THERMO-2", seed=4, interval_s=None)
    async with thermometer.running(radio):
        taken = [thermometer.take_temperature() for _ in range(3)]
        assert thermometer.backlog(thermometer.measurement_characteristic) == 3
        queue: Queue = asyncio.Queue()
        async with BleakClient(thermometer.address, backend=adapter.client_backend) as client:
            await client.start_notify(full_uuid(0x2A1C), enqueue(queue))
            received = [temperature.decode(p).temperature for p in await take(queue, 3)]
            await wait_until(
                lambda: thermometer.backlog(thermometer.measurement_characteristic) == 0,
                "backlog confirmed",
                within=DEADLINE_S,
            )
    assert received == taken


async def test_blood_pressure_cuff_indicates_pressures_pulse_and_hypertension(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    queue: Queue = asyncio.Queue()
    cuff = VirtualBloodPressureCuff("TS-BPM-1", seed=5, interval_s=0.05)
    async with (
        cuff.running(radio),
        BleakClient(cuff.address, backend=adapter.client_backend) as client,
    ):
        feature = await client.read_gatt_char(full_uuid(0x2A49))
        assert len(feature) == 2
        await client.start_notify(full_uuid(0x2A35), enqueue(queue))
        normal = [blood_pressure.decode(p) for p in await take(queue, 3)]
        cuff.start_episode()
        high = await from_switch(
            queue, blood_pressure.decode, lambda m: float(m.systolic) >= 150, 3
        )

    for m in normal + high:
        assert m.timestamp is not None
        assert m.pulse_rate is not None
        assert 50 <= float(m.pulse_rate) <= 100  # type: ignore[arg-type]
        readings = {r.metric for r in blood_pressure.measurements(m)}
        assert readings == {"systolic_bp", "diastolic_bp", "mean_bp", "pulse_rate"}
    assert all(float(m.systolic) < 140 and float(m.diastolic) < 90 for m in normal)  # type: ignore[arg-type]
    assert all(float(m.systolic) >= 160 and float(m.diastolic) >= 100 for m in high)  # type: ignore[arg-type]


async def test_pulse_oximeter_notifies_continuous_indicates_spot_checks_and_desaturates(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    continuous: Queue = asyncio.Queue()
    spot: Queue = asyncio.Queue()
    oximeter = VirtualPulseOximeter("TS-OXI-1", seed=6, rate_hz=20.0, spot_check_interval_s=0.1)
    async with (
        oximeter.running(radio),
        BleakClient(oximeter.address, backend=adapter.client_backend) as client,
    ):
        cont_char = client.services.get_characteristic(full_uuid(0x2A5F))
        spot_char = client.services.get_characteristic(full_uuid(0x2A5E))
        assert cont_char is not None
        assert spot_char is not None
        assert cont_char.properties == ["notify"]
        assert spot_char.properties == ["indicate"]
        await client.start_notify(cont_char, enqueue(continuous))
        await client.start_notify(spot_char, enqueue(spot))
        normal = [pulse_oximeter.decode_continuous(p) for p in await take(continuous, 10)]
        checks = [pulse_oximeter.decode_spot_check(p) for p in await take(spot, 2)]
        oximeter.start_episode()
        low = await from_switch(
            continuous,
            pulse_oximeter.decode_continuous,
            lambda m: float(m.normal.spo2) < 92,
            10,
        )

    assert all(95 <= float(m.normal.spo2) <= 100 for m in normal)  # type: ignore[arg-type]
    assert all(84 <= float(m.normal.spo2) <= 89 for m in low)  # type: ignore[arg-type]
    assert all(c.timestamp is not None and not c.device_clock_not_set for c in checks)
    assert all(
        {r.metric for r in pulse_oximeter.spot_check_measurements(c)} == {"spo2", "pulse_rate"}
        for c in checks
    )


async def test_weight_scale_indicates_weight_and_body_fat_when_stepped_on(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    weights: Queue = asyncio.Queue()
    fats: Queue = asyncio.Queue()
    scale = VirtualWeightScale("TS-SCALE-1", seed=8)
    async with (
        scale.running(radio),
        BleakClient(scale.address, backend=adapter.client_backend) as client,
    ):
        await client.start_notify(full_uuid(0x2A9D), enqueue(weights))
        await client.start_notify(full_uuid(0x2A9C), enqueue(fats))
        kg, fat = scale.step_on()
        (weight_payload,) = await take(weights, 1)
        (fat_payload,) = await take(fats, 1)

    weight = weight_scale.decode(weight_payload)
    composition = body_composition.decode(fat_payload)
    assert weight.weight == kg
    assert composition.body_fat_percent == fat
    assert composition.weight is None  # the weight is sent once, in Weight Measurement
    assert weight.timestamp is not None
    assert [r.metric for r in weight_scale.measurements(weight)] == ["body_weight"]
    assert [r.metric for r in body_composition.measurements(composition)] == ["body_fat"]


async def test_current_time_write_sets_the_wearable_clock(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    three_years = -3 * 365 * 86_400.0
    thermometer = VirtualThermometer("TS-THERMO-3", interval_s=None, clock_offset_s=three_years)
    async with thermometer.running(radio):
        assert thermometer.device_time().year < datetime.now(UTC).year - 2
        async with BleakClient(thermometer.address, backend=adapter.client_backend) as client:
            before = current_time.decode(bytes(await client.read_gatt_char(CURRENT_TIME)))
            setting = current_time.CurrentTime.from_datetime(
                datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
            )
            await client.write_gatt_char(CURRENT_TIME, current_time.encode(setting), response=True)
            after = current_time.decode(bytes(await client.read_gatt_char(CURRENT_TIME)))
            with pytest.raises(BleakGATTProtocolError):
                await client.write_gatt_char(CURRENT_TIME, b"\x01\x02", response=True)

    assert before.date_time.year < datetime.now(UTC).year - 2
    assert thermometer.clock_writes == [setting]
    moment = after.to_datetime()
    assert moment is not None
    assert abs(moment - datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)) < timedelta(seconds=30)


async def test_battery_drains_over_time_and_is_notified(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    queue: Queue = asyncio.Queue()
    # 7200 %/h is 2 % per second: the drain is seen within a couple of ticks.
    strap = VirtualHeartRateStrap("TS-HRM-BAT", battery_level=50, battery_drain_per_hour=7200.0)
    async with (
        strap.running(radio),
        BleakClient(strap.address, backend=adapter.client_backend) as client,
    ):
        await client.start_notify(BATTERY, enqueue(queue))
        levels = [p[0] for p in await take(queue, 2)]
    assert levels == sorted(levels, reverse=True)
    assert levels[-1] < 50
    assert strap.battery_level <= levels[-1]


# Glucose meter through plain bleak: the RACP procedures and their response codes.


class RacpClient:
    def __init__(self, client: BleakClient) -> None:
        self.client = client
        self.records: Queue = asyncio.Queue()
        self.contexts: Queue = asyncio.Queue()
        self.responses: Queue = asyncio.Queue()

    async def subscribe(self) -> None:
        await self.client.start_notify(GLUCOSE, enqueue(self.records))
        await self.client.start_notify(CONTEXT, enqueue(self.contexts))
        await self.client.start_notify(RACP, enqueue(self.responses))

    async def ask(self, request: racp.RacpRequest | bytes) -> racp.RacpResponse:
        data = request if isinstance(request, bytes) else racp.encode_request(request)
        await self.client.write_gatt_char(RACP, data, response=True)
        (answer,) = await take(self.responses, 1)
        return racp.decode_response(answer)

    def drain_records(self) -> list[glucose.GlucoseMeasurement]:
        out = []
        while not self.records.empty():
            out.append(glucose.decode(self.records.get_nowait()))
        return out


@pytest.fixture
async def meter(radio: VirtualRadio) -> AsyncIterator[VirtualGlucoseMeter]:
    async with VirtualGlucoseMeter("TS-GLU-1", seed=9, stored_records=5).running(radio) as m:
        yield m


async def test_racp_reports_all_and_greater_or_equal_stored_records(
    adapter: SimAdapter, meter: VirtualGlucoseMeter
) -> None:
    async with BleakClient(meter.address, backend=adapter.client_backend) as client:
        racp_client = RacpClient(client)
        await racp_client.subscribe()
        assert await racp_client.ask(racp.report_number_of_records()) == racp.NumberOfRecords(5)
        done = await racp_client.ask(racp.report_all_records())
        everything = racp_client.drain_records()
        contexts = [glucose.decode_context(await racp_client.contexts.get()) for _ in range(5)]
        meter.measure()
        newer = await racp_client.ask(racp.report_records_from(4))
        tail = racp_client.drain_records()
        count = await racp_client.ask(racp.report_number_of_records(4))

    ok = racp.ResponseCodeIndication(racp.Opcode.REPORT_STORED_RECORDS, racp.ResponseCode.SUCCESS)
    assert done == ok
    assert newer == ok
    assert [m.sequence_number for m in everything] == [1, 2, 3, 4, 5]
    assert [c.sequence_number for c in contexts] == [1, 2, 3, 4, 5]
    assert all(m.context_follows for m in everything)
    assert [m.sequence_number for m in tail] == [4, 5, 6]
    assert count == racp.NumberOfRecords(3)
    values = [glucose.measurements(m)[0].value for m in everything]
    assert values == [float(r.mg_dl) for r in meter.records[:5]]
    times = [glucose.measurement_time(m) for m in everything]
    assert times == sorted(times)


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (bytes([0x01, 0x00]), racp.ResponseCode.INVALID_OPERATOR),
        (bytes([0x01, 0x09]), racp.ResponseCode.INVALID_OPERATOR),
        (bytes([0x01, 0x03]), racp.ResponseCode.INVALID_OPERAND),
        (bytes([0x01, 0x03, 0x01, 0x05]), racp.ResponseCode.INVALID_OPERAND),
        (bytes([0x01, 0x01, 0x01]), racp.ResponseCode.INVALID_OPERAND),
        (bytes([0x01, 0x04, 0x01, 0x05, 0x00, 0x02, 0x00]), racp.ResponseCode.INVALID_OPERAND),
        (
            bytes([0x01, 0x03, 0x02, 0xE8, 0x07, 1, 1, 0, 0, 0]),
            racp.ResponseCode.OPERAND_NOT_SUPPORTED,
        ),
        (bytes([0x01, 0x03, 0x01, 0x64, 0x00]), racp.ResponseCode.NO_RECORDS_FOUND),
        (bytes([0x07, 0x01]), racp.ResponseCode.OP_CODE_NOT_SUPPORTED),
    ],
    ids=[
        "null-operator",
        "reserved-operator",
        "missing-operand",
        "short-operand",
        "operand-on-all",
        "inverted-range",
        "user-facing-time",
        "nothing-newer",
        "unknown-opcode",
    ],
)
async def test_racp_answers_bad_requests_with_their_response_codes(
    adapter: SimAdapter, meter: VirtualGlucoseMeter, request_bytes: bytes, code: racp.ResponseCode
) -> None:
    async with BleakClient(meter.address, backend=adapter.client_backend) as client:
        racp_client = RacpClient(client)
        await racp_client.subscribe()
        answer = await racp_client.ask(request_bytes)
        sent = racp_client.drain_records()
    assert answer == racp.ResponseCodeIndication(request_bytes[0], code)
    assert sent == []


async def test_racp_range_first_last_and_delete(
    adapter: SimAdapter, meter: VirtualGlucoseMeter
) -> None:
    async with BleakClient(meter.address, backend=adapter.client_backend) as client:
        rc = RacpClient(client)
        await rc.subscribe()
        within = racp.RacpRequest(
            racp.Opcode.REPORT_STORED_RECORDS,
            racp.Operator.WITHIN_RANGE_OF,
            bytes([0x01, 0x02, 0x00, 0x03, 0x00]),
        )
        await rc.ask(within)
        ranged = [m.sequence_number for m in rc.drain_records()]
        await rc.ask(racp.RacpRequest(racp.Opcode.REPORT_STORED_RECORDS, racp.Operator.LAST_RECORD))
        last = [m.sequence_number for m in rc.drain_records()]
        await rc.ask(
            racp.RacpRequest(racp.Opcode.REPORT_STORED_RECORDS, racp.Operator.FIRST_RECORD)
        )
        first = [m.sequence_number for m in rc.drain_records()]
        deleted = await rc.ask(racp.delete_all_records())
        empty = await rc.ask(racp.report_all_records())
        abort = await rc.ask(racp.abort())

    assert (ranged, last, first) == ([2, 3], [5], [1])
    assert deleted == racp.ResponseCodeIndication(
        racp.Opcode.DELETE_STORED_RECORDS, racp.ResponseCode.SUCCESS
    )
    assert empty == racp.ResponseCodeIndication(
        racp.Opcode.REPORT_STORED_RECORDS, racp.ResponseCode.NO_RECORDS_FOUND
    )
    assert abort == racp.ResponseCodeIndication(
        racp.Opcode.ABORT_OPERATION, racp.ResponseCode.SUCCESS
    )
    assert meter.records == []


async def test_racp_write_without_indications_enabled_is_refused(
    adapter: SimAdapter, meter: VirtualGlucoseMeter
) -> None:
    async with BleakClient(meter.address, backend=adapter.client_backend) as client:
        with pytest.raises(BleakGATTProtocolError) as refused:
            await client.write_gatt_char(
                RACP, racp.encode_request(racp.report_all_records()), response=True
            )
        with pytest.raises(BleakGATTProtocolError) as unreadable:
            await client.read_gatt_char(RACP)
    assert (
        refused.value.code == 0xFD
    )  # Client Characteristic Configuration Descriptor Improperly Configured
    assert unreadable.value.code == 0x02  # Read Not Permitted


async def test_glucose_meter_hyperglycaemia_episode(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    meter = VirtualGlucoseMeter("TS-GLU-2", seed=10)
    async with meter.running(radio):
        normal = [meter.measure() for _ in range(10)]
        meter.start_episode()
        high = [meter.measure() for _ in range(5)]
    assert all(70 <= r.mg_dl <= 160 for r in normal)
    assert all(250 <= r.mg_dl <= 350 for r in high)
    assert [r.sequence_number for r in normal + high] == list(range(1, 16))


SignalFactory = Callable[[int], Callable[[], object]]


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: TemperatureSignal(seed).next,
        lambda seed: BloodPressureSignal(seed).next,
        lambda seed: OximetrySignal(seed).next,
        lambda seed: GlucoseSignal(seed).next,
        lambda seed: BodySignal(seed).next,
    ],
    ids=["temperature", "blood-pressure", "oximetry", "glucose", "body"],
)
def test_signals_are_deterministic_per_seed_and_vary(make: SignalFactory) -> None:
    def run(seed: int) -> list[object]:
        step = make(seed)
        return [step() for _ in range(200)]

    first = run(1)
    assert first == run(1)
    assert first != run(2)
    assert len({repr(v) for v in first}) > 3


def test_episode_switches_take_effect_and_clear() -> None:
    signal = TemperatureSignal(7)
    assert not signal.episode
    signal.set_episode(True)
    assert signal.episode
    assert all(v >= 38.3 for v in (signal.next() for _ in range(50)))
    signal.set_episode(False)
    assert all(v <= 37.3 for v in (signal.next() for _ in range(50)))


@pytest.mark.parametrize(
    "build",
    [
        lambda: VirtualThermometer(interval_s=0),
        lambda: VirtualBloodPressureCuff(interval_s=-1),
        lambda: VirtualPulseOximeter(rate_hz=0),
        lambda: VirtualGlucoseMeter(stored_records=-1),
        lambda: VirtualGlucoseMeter(first_sequence_number=70_000),
        lambda: VirtualWeightScale(interval_s=0),
        lambda: VirtualHeartRateStrap(battery_drain_per_hour=-1),
        lambda: TemperatureSignal(1, sample_period_s=0),
    ],
)
def test_bad_wearable_parameters_are_refused(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        build()
