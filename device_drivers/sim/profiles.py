"""Virtual wearables for the standard health profiles beyond heart rate.

Each is a small :class:`~device_drivers.sim.wearable.VirtualWearable` subclass serving the
profile's service as the Bluetooth SIG specifies it, with payloads built by the project's
own encoders (``device_drivers.gatt``), a seeded signal (``device_drivers.sim.signals``), an
abnormal episode on demand, and the Current Time service so a hub can set its clock (its
measurements carry time stamps from that clock).

- :class:`VirtualThermometer`: Health Thermometer (0x1809), Temperature Measurement (0x2A1C)
  indicated every ``interval_s``, with time stamp; episode: fever.
- :class:`VirtualBloodPressureCuff`: Blood Pressure (0x1810), Blood Pressure Measurement
  (0x2A35) indicated every ``interval_s``, with time stamp and pulse rate; episode:
  hypertension.
- :class:`VirtualPulseOximeter`: Pulse Oximeter (0x1822), PLX Continuous (0x2A5F) notified at
  ``rate_hz`` and PLX Spot-check (0x2A5E) indicated every ``spot_check_interval_s``;
  episode: desaturation.
- :class:`VirtualGlucoseMeter`: Glucose (0x1808): stored records with sequence numbers,
  sent as Glucose Measurement (0x2A18) and Context (0x2A34) notifications only when asked
  through the Record Access Control Point (0x2A52); episode: hyperglycaemia.
- :class:`VirtualWeightScale`: Weight Scale (0x181D), Weight Measurement (0x2A9D), and Body
  Composition (0x181B), Body Composition Measurement (0x2A9C), both indicated when the
  participant steps on.

Indicated measurements taken while no hub listens are kept (up to
:data:`~device_drivers.sim.wearable.DEFAULT_BACKLOG`) and indicated when a hub subscribes, as
these profiles allow; continuous notifications taken while nobody listens are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Unpack

from bumble import att, core, gatt
from bumble.device import Connection

from device_drivers.gatt import (
    blood_pressure,
    body_composition,
    glucose,
    pulse_oximeter,
    racp,
    temperature,
    weight_scale,
)
from device_drivers.gatt.date_time import DateTime
from device_drivers.gatt.errors import GattError
from device_drivers.gatt.pulse_oximeter import SpO2PulseRate
from device_drivers.sim.signals import (
    BloodPressureSignal,
    BodySignal,
    GlucoseSignal,
    OximetrySignal,
    TemperatureSignal,
)
from device_drivers.sim.wearable import (
    DeviceInformation,
    VirtualWearable,
    WearableOptions,
    notify_only_value,
)

__all__ = [
    "GlucoseRecord",
    "VirtualBloodPressureCuff",
    "VirtualGlucoseMeter",
    "VirtualPulseOximeter",
    "VirtualThermometer",
    "VirtualWeightScale",
]


def _uuid(value: int, name: str) -> core.UUID:
    return core.UUID.from_16_bits(value, name)


HEALTH_THERMOMETER_SERVICE: Final = _uuid(0x1809, "Health Thermometer")
TEMPERATURE_MEASUREMENT: Final = _uuid(0x2A1C, "Temperature Measurement")
TEMPERATURE_TYPE: Final = _uuid(0x2A1D, "Temperature Type")
MEASUREMENT_INTERVAL: Final = _uuid(0x2A21, "Measurement Interval")
BLOOD_PRESSURE_SERVICE: Final = _uuid(0x1810, "Blood Pressure")
BLOOD_PRESSURE_MEASUREMENT: Final = _uuid(0x2A35, "Blood Pressure Measurement")
BLOOD_PRESSURE_FEATURE: Final = _uuid(0x2A49, "Blood Pressure Feature")
PULSE_OXIMETER_SERVICE: Final = _uuid(0x1822, "Pulse Oximeter")
PLX_SPOT_CHECK: Final = _uuid(0x2A5E, "PLX Spot-Check Measurement")
PLX_CONTINUOUS: Final = _uuid(0x2A5F, "PLX Continuous Measurement")
PLX_FEATURES: Final = _uuid(0x2A60, "PLX Features")
GLUCOSE_SERVICE: Final = _uuid(0x1808, "Glucose")
GLUCOSE_MEASUREMENT: Final = _uuid(0x2A18, "Glucose Measurement")
GLUCOSE_CONTEXT: Final = _uuid(0x2A34, "Glucose Measurement Context")
GLUCOSE_FEATURE: Final = _uuid(0x2A51, "Glucose Feature")
RECORD_ACCESS_CONTROL_POINT: Final = _uuid(0x2A52, "Record Access Control Point")
WEIGHT_SCALE_SERVICE: Final = _uuid(0x181D, "Weight Scale")
WEIGHT_MEASUREMENT: Final = _uuid(0x2A9D, "Weight Measurement")
WEIGHT_SCALE_FEATURE: Final = _uuid(0x2A9E, "Weight Scale Feature")
BODY_COMPOSITION_SERVICE: Final = _uuid(0x181B, "Body Composition")
BODY_COMPOSITION_MEASUREMENT: Final = _uuid(0x2A9C, "Body Composition Measurement")
BODY_COMPOSITION_FEATURE: Final = _uuid(0x2A9B, "Body Composition Feature")

# Temperature Type 0x2A1D: 6 = mouth. When the characteristic is served, the measurement
# itself leaves the type field out (Health Thermometer Service 1.0, 3.1.1.4).
_TEMPERATURE_TYPE_MOUTH: Final = bytes([6])
# Feature bit fields: the simulated devices claim no optional feature beyond time stamps
# (Weight Scale / Body Composition Feature bit 0: Time Stamp Supported).
_NO_FEATURES_U16: Final = bytes(2)
_TIMESTAMP_SUPPORTED_U32: Final = (1).to_bytes(4, "little")
# 1 kg/L is 10^5 mg/dL: meters in mg/dL markets report kg/L with exponent -5.
_KG_PER_L_PER_MG_PER_DL: Final = 1e-5
# Records a meter keeps (typical meters hold 500-1000; the Glucose Profile asks for >= 1).
GLUCOSE_MEMORY: Final = 1000
_SEQUENCE_MODULUS: Final = 0x10000
# A meter that already holds records made them this far apart (a test before each meal).
_STORED_SPACING: Final = timedelta(hours=6)


def _info(model: str, prefix: str, seed: int) -> DeviceInformation:
    return DeviceInformation(
        manufacturer="Trialstream Simulated Devices",
        model=model,
        serial=f"{prefix}-{seed:08d}",
        firmware="2.1.0",
        hardware="rev A",
    )


def _check_interval(value: float | None, what: str) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{what} must be positive")


def _indicated(uuid: core.UUID) -> gatt.Characteristic[bytes]:
    return gatt.Characteristic(
        uuid,
        gatt.Characteristic.Properties.INDICATE,
        gatt.Characteristic.Permissions(0),
        notify_only_value(),
    )


def _notified(uuid: core.UUID) -> gatt.Characteristic[bytes]:
    return gatt.Characteristic(
        uuid,
        gatt.Characteristic.Properties.NOTIFY,
        gatt.Characteristic.Permissions(0),
        notify_only_value(),
    )


def _constant(uuid: core.UUID, value: bytes) -> gatt.Characteristic[bytes]:
    return gatt.Characteristic(
        uuid,
        gatt.Characteristic.Properties.READ,
        gatt.Characteristic.Permissions.READABLE,
        value,
    )


async def _every(period_s: float, action: Callable[[], object]) -> None:
    """Call ``action()`` (awaiting what it returns, if anything) every ``period_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time()
    while True:
        deadline += period_s
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        result = action()
        if inspect.isawaitable(result):
            await result


class VirtualThermometer(VirtualWearable):
    """Health Thermometer: a temperature indicated every ``interval_s``, time-stamped."""

    def __init__(
        self,
        name: str = "TS-THERMO",
        info: DeviceInformation | None = None,
        *,
        seed: int = 0,
        interval_s: float | None = 60.0,
        **options: Unpack[WearableOptions],
    ) -> None:
        _check_interval(interval_s, "interval_s")
        super().__init__(
            name, info or _info("TS-THERMO-1", "THM", seed), serves_current_time=True, **options
        )
        self.interval_s = interval_s
        self.signal = TemperatureSignal(seed, sample_period_s=interval_s or 60.0)
        self.measurement_characteristic = _indicated(TEMPERATURE_MEASUREMENT)

    def profile_services(self) -> Sequence[gatt.Service]:
        interval = round(self.interval_s or 0).to_bytes(2, "little")
        return [
            gatt.Service(
                HEALTH_THERMOMETER_SERVICE,
                [
                    self.measurement_characteristic,
                    _constant(TEMPERATURE_TYPE, _TEMPERATURE_TYPE_MOUTH),
                    _constant(MEASUREMENT_INTERVAL, interval),
                ],
            )
        ]

    def start_episode(self) -> None:
        """Fever (38.3-39.6 Cel) from the next measurement on."""
        self.signal.set_episode(True)

    def end_episode(self) -> None:
        self.signal.set_episode(False)

    def take_temperature(self) -> float:
        """Measure now; the value is indicated now, or kept until a hub listens."""
        value = self.signal.next()
        payload = temperature.encode(
            temperature.TemperatureMeasurement(
                value, timestamp=DateTime.from_datetime(self.device_time())
            )
        )
        self.store_measurement(self.measurement_characteristic, payload)
        return value

    async def run_profile(self) -> None:
        if self.interval_s is not None:
            await _every(self.interval_s, self.take_temperature)


class VirtualBloodPressureCuff(VirtualWearable):
    """Blood Pressure: a cuff measurement with pulse rate every ``interval_s``, indicated."""

    def __init__(
        self,
        name: str = "TS-BPM",
        info: DeviceInformation | None = None,
        *,
        seed: int = 0,
        interval_s: float | None = 600.0,
        **options: Unpack[WearableOptions],
    ) -> None:
        _check_interval(interval_s, "interval_s")
        super().__init__(
            name, info or _info("TS-BPM-1", "BPM", seed), serves_current_time=True, **options
        )
        self.interval_s = interval_s
        self.signal = BloodPressureSignal(seed, sample_period_s=interval_s or 600.0)
        self.measurement_characteristic = _indicated(BLOOD_PRESSURE_MEASUREMENT)

    def profile_services(self) -> Sequence[gatt.Service]:
        return [
            gatt.Service(
                BLOOD_PRESSURE_SERVICE,
                [
                    self.measurement_characteristic,
                    _constant(BLOOD_PRESSURE_FEATURE, _NO_FEATURES_U16),
                ],
            )
        ]

    def start_episode(self) -> None:
        """Stage 2 hypertension (>= 160 / >= 100 mmHg) from the next measurement on."""
        self.signal.set_episode(True)

    def end_episode(self) -> None:
        self.signal.set_episode(False)

    def measure(self) -> blood_pressure.BloodPressureMeasurement:
        """Inflate, measure; indicated now or kept until a hub listens."""
        sample = self.signal.next()
        value = blood_pressure.BloodPressureMeasurement(
            float(sample.systolic),
            float(sample.diastolic),
            float(sample.mean_arterial),
            timestamp=DateTime.from_datetime(self.device_time()),
            pulse_rate=float(sample.pulse_rate),
        )
        self.store_measurement(self.measurement_characteristic, blood_pressure.encode(value))
        return value

    async def run_profile(self) -> None:
        if self.interval_s is not None:
            await _every(self.interval_s, self.measure)


class VirtualPulseOximeter(VirtualWearable):
    """Pulse Oximeter: continuous SpO2/pulse notified at ``rate_hz``, spot-checks indicated."""

    def __init__(
        self,
        name: str = "TS-OXI",
        info: DeviceInformation | None = None,
        *,
        seed: int = 0,
        rate_hz: float = 1.0,
        spot_check_interval_s: float | None = 60.0,
        **options: Unpack[WearableOptions],
    ) -> None:
        if rate_hz <= 0:
            raise ValueError("rate_hz must be positive")
        _check_interval(spot_check_interval_s, "spot_check_interval_s")
        super().__init__(
            name, info or _info("TS-OXI-1", "OXI", seed), serves_current_time=True, **options
        )
        self.rate_hz = rate_hz
        self.spot_check_interval_s = spot_check_interval_s
        self.signal = OximetrySignal(seed, sample_period_s=1.0 / rate_hz)
        self.continuous_characteristic = _notified(PLX_CONTINUOUS)
        self.spot_check_characteristic = _indicated(PLX_SPOT_CHECK)
        self._last = self.signal.next()

    def profile_services(self) -> Sequence[gatt.Service]:
        return [
            gatt.Service(
                PULSE_OXIMETER_SERVICE,
                [
                    self.spot_check_characteristic,
                    self.continuous_characteristic,
                    _constant(PLX_FEATURES, _NO_FEATURES_U16),
                ],
            )
        ]

    def start_episode(self) -> None:
        """Desaturation (SpO2 84-89 %) from the next sample on."""
        self.signal.set_episode(True)

    def end_episode(self) -> None:
        self.signal.set_episode(False)

    def spot_check(self) -> pulse_oximeter.SpotCheckMeasurement:
        """A spot-check of the current values; indicated now or kept until a hub listens."""
        value = pulse_oximeter.SpotCheckMeasurement(
            float(self._last.spo2),
            float(self._last.pulse_rate),
            timestamp=DateTime.from_datetime(self.device_time()),
        )
        self.store_measurement(
            self.spot_check_characteristic, pulse_oximeter.encode_spot_check(value)
        )
        return value

    async def _continuous(self) -> None:
        self._last = self.signal.next()
        payload = pulse_oximeter.encode_continuous(
            pulse_oximeter.ContinuousMeasurement(
                SpO2PulseRate(float(self._last.spo2), float(self._last.pulse_rate))
            )
        )
        await self.send_measurement(self.continuous_characteristic, payload, indicate=False)

    async def run_profile(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_every(1.0 / self.rate_hz, self._continuous))
            if self.spot_check_interval_s is not None:
                tasks.create_task(_every(self.spot_check_interval_s, self.spot_check))


@dataclass(frozen=True, slots=True)
class GlucoseRecord:
    """One stored test: its sequence number, value (mg/dL), device time and meal context."""

    sequence_number: int
    mg_dl: int
    time: datetime
    after_meal: bool

    def measurement(self) -> bytes:
        return glucose.encode(
            glucose.GlucoseMeasurement(
                self.sequence_number,
                DateTime.from_datetime(self.time),
                time_offset_minutes=0,
                sample=glucose.GlucoseSample(self.mg_dl * _KG_PER_L_PER_MG_PER_DL),
                context_follows=True,
            )
        )

    def context(self) -> bytes:
        meal = glucose.Meal.POSTPRANDIAL if self.after_meal else glucose.Meal.PREPRANDIAL
        return glucose.encode_context(glucose.GlucoseContext(self.sequence_number, meal=meal))


class _Abort:
    """A queued Abort Operation when no procedure was running."""


class VirtualGlucoseMeter(VirtualWearable):
    """A blood glucose meter: records stored with sequence numbers, read out through RACP.

    Measurements are sent only in answer to Record Access Control Point requests, as the
    Glucose Profile has it: Report Stored Records (all, <=, >=, within range, first, last
    by sequence number), Report Number of Stored Records, Delete Stored Records and Abort
    Operation, each answered with the RACP response codes.
    """

    def __init__(
        self,
        name: str = "TS-GLU",
        info: DeviceInformation | None = None,
        *,
        seed: int = 0,
        interval_s: float | None = None,
        stored_records: int = 0,
        first_sequence_number: int = 1,
        **options: Unpack[WearableOptions],
    ) -> None:
        _check_interval(interval_s, "interval_s")
        if not 0 <= stored_records <= GLUCOSE_MEMORY:
            raise ValueError(f"stored_records must be within 0..{GLUCOSE_MEMORY}")
        if not 0 <= first_sequence_number < _SEQUENCE_MODULUS:
            raise ValueError("first_sequence_number is a uint16")
        super().__init__(
            name, info or _info("TS-GLU-1", "GLU", seed), serves_current_time=True, **options
        )
        self.interval_s = interval_s
        self.signal = GlucoseSignal(seed)
        self.records: list[GlucoseRecord] = []
        self.racp_requests: list[racp.RacpRequest] = []
        self._next_sequence = first_sequence_number
        self.measurement_characteristic = _notified(GLUCOSE_MEASUREMENT)
        self.context_characteristic = _notified(GLUCOSE_CONTEXT)
        self.racp_characteristic: gatt.Characteristic[bytes] = gatt.Characteristic(
            RECORD_ACCESS_CONTROL_POINT,
            gatt.Characteristic.Properties.WRITE | gatt.Characteristic.Properties.INDICATE,
            gatt.Characteristic.Permissions.WRITEABLE,
            gatt.CharacteristicValue(read=_refuse_read, write=self._on_racp_write),
        )
        self._requests: asyncio.Queue[racp.RacpRequest | _Abort] = asyncio.Queue()
        self._busy = False
        self._abort = False
        now = self.device_time()
        for age in range(stored_records, 0, -1):
            self._store(now - _STORED_SPACING * age)

    def profile_services(self) -> Sequence[gatt.Service]:
        return [
            gatt.Service(
                GLUCOSE_SERVICE,
                [
                    self.measurement_characteristic,
                    self.context_characteristic,
                    _constant(GLUCOSE_FEATURE, _NO_FEATURES_U16),
                    self.racp_characteristic,
                ],
            )
        ]

    def start_episode(self) -> None:
        """Hyperglycaemia (250-350 mg/dL) from the next test on."""
        self.signal.set_episode(True)

    def end_episode(self) -> None:
        self.signal.set_episode(False)

    def measure(self) -> GlucoseRecord:
        """A finger-stick test now: stored with the next sequence number."""
        return self._store(self.device_time())

    def restart_numbering(self, first_sequence_number: int = 1) -> None:
        """What a meter does when its battery is replaced or it is reset: its memory is
        cleared and its records are numbered from the start again."""
        self.records.clear()
        self._next_sequence = first_sequence_number

    def _store(self, at: datetime) -> GlucoseRecord:
        record = GlucoseRecord(
            self._next_sequence, self.signal.next(), at, self.signal.last_after_meal
        )
        self._next_sequence = (self._next_sequence + 1) % _SEQUENCE_MODULUS
        self.records.append(record)
        if len(self.records) > GLUCOSE_MEMORY:
            del self.records[0]
        return record

    async def run_profile(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            if self.interval_s is not None:
                tasks.create_task(_every(self.interval_s, self.measure))
            tasks.create_task(self._serve_requests())

    def _on_racp_write(self, connection: Connection, value: bytes) -> None:
        cccds = self.device.gatt_server.subscribers.get(connection, {})
        cccd = cccds.get(self.racp_characteristic.handle)
        if not cccd or not cccd[0] & 0x02:
            raise att.ATT_Error(att.ErrorCode.CCCD_IMPROPERLY_CONFIGURED)
        try:
            request = racp.decode_request(value)
        except GattError:
            raise att.ATT_Error(att.ErrorCode.INVALID_ATTRIBUTE_LENGTH) from None
        self.racp_requests.append(request)
        if request.opcode == racp.Opcode.ABORT_OPERATION:
            if self._busy:
                self._abort = True
            else:
                self._requests.put_nowait(_Abort())
            return
        if self._busy:
            raise att.ATT_Error(att.ErrorCode.PROCEDURE_ALREADY_IN_PROGRESS)
        self._busy = True
        self._requests.put_nowait(request)

    async def _serve_requests(self) -> None:
        while True:
            request = await self._requests.get()
            try:
                if isinstance(request, _Abort):
                    response: racp.RacpResponse = racp.ResponseCodeIndication(
                        racp.Opcode.ABORT_OPERATION, racp.ResponseCode.SUCCESS
                    )
                else:
                    response = await self._answer(request)
                self._abort = False
                self._busy = False
                with contextlib.suppress(TimeoutError, core.BaseBumbleError):
                    await self.indicate(self.racp_characteristic, racp.encode_response(response))
            finally:
                self._busy = False

    async def _answer(self, request: racp.RacpRequest) -> racp.RacpResponse:
        opcode = request.opcode
        if opcode not in (
            racp.Opcode.REPORT_STORED_RECORDS,
            racp.Opcode.DELETE_STORED_RECORDS,
            racp.Opcode.REPORT_NUMBER_OF_STORED_RECORDS,
        ):
            return racp.ResponseCodeIndication(opcode, racp.ResponseCode.OP_CODE_NOT_SUPPORTED)
        selected = self._select(request)
        if isinstance(selected, racp.ResponseCode):
            return racp.ResponseCodeIndication(opcode, selected)
        if opcode == racp.Opcode.REPORT_NUMBER_OF_STORED_RECORDS:
            return racp.NumberOfRecords(len(selected))
        if not selected:
            return racp.ResponseCodeIndication(opcode, racp.ResponseCode.NO_RECORDS_FOUND)
        if opcode == racp.Opcode.DELETE_STORED_RECORDS:
            gone = {r.sequence_number for r in selected}
            self.records = [r for r in self.records if r.sequence_number not in gone]
            return racp.ResponseCodeIndication(opcode, racp.ResponseCode.SUCCESS)
        for record in selected:
            if self._abort:
                return racp.ResponseCodeIndication(
                    racp.Opcode.ABORT_OPERATION, racp.ResponseCode.SUCCESS
                )
            await self.send_measurement(
                self.measurement_characteristic, record.measurement(), indicate=False
            )
            await self.send_measurement(
                self.context_characteristic, record.context(), indicate=False
            )
        return racp.ResponseCodeIndication(opcode, racp.ResponseCode.SUCCESS)

    def _select(self, request: racp.RacpRequest) -> list[GlucoseRecord] | racp.ResponseCode:
        records = self.records
        operator = request.operator
        if operator == racp.Operator.NULL or operator > racp.Operator.LAST_RECORD:
            return racp.ResponseCode.INVALID_OPERATOR
        if operator in (
            racp.Operator.ALL_RECORDS,
            racp.Operator.FIRST_RECORD,
            racp.Operator.LAST_RECORD,
        ):
            if request.operand:
                return racp.ResponseCode.INVALID_OPERAND
            if operator == racp.Operator.ALL_RECORDS or not records:
                return list(records)
            return [records[0] if operator == racp.Operator.FIRST_RECORD else records[-1]]
        if not request.operand:
            return racp.ResponseCode.INVALID_OPERAND
        if request.operand[0] == racp.FilterType.USER_FACING_TIME:
            return racp.ResponseCode.OPERAND_NOT_SUPPORTED
        bounds = request.sequence_filter()
        wanted = 2 if operator == racp.Operator.WITHIN_RANGE_OF else 1
        if bounds is None or len(bounds) != wanted:
            return racp.ResponseCode.INVALID_OPERAND
        if operator == racp.Operator.LESS_THAN_OR_EQUAL_TO:
            return [r for r in records if r.sequence_number <= bounds[0]]
        if operator == racp.Operator.GREATER_THAN_OR_EQUAL_TO:
            return [r for r in records if r.sequence_number >= bounds[0]]
        low, high = bounds
        if low > high:
            return racp.ResponseCode.INVALID_OPERAND
        return [r for r in records if low <= r.sequence_number <= high]


def _refuse_read(_connection: Connection) -> bytes:
    raise att.ATT_Error(att.ErrorCode.READ_NOT_PERMITTED)


class VirtualWeightScale(VirtualWearable):
    """Weight Scale with Body Composition: both indicated when the participant steps on."""

    def __init__(
        self,
        name: str = "TS-SCALE",
        info: DeviceInformation | None = None,
        *,
        seed: int = 0,
        interval_s: float | None = None,
        **options: Unpack[WearableOptions],
    ) -> None:
        _check_interval(interval_s, "interval_s")
        super().__init__(
            name, info or _info("TS-SCALE-1", "WSC", seed), serves_current_time=True, **options
        )
        self.interval_s = interval_s
        self.signal = BodySignal(seed)
        self.weight_characteristic = _indicated(WEIGHT_MEASUREMENT)
        self.composition_characteristic = _indicated(BODY_COMPOSITION_MEASUREMENT)

    def profile_services(self) -> Sequence[gatt.Service]:
        return [
            gatt.Service(
                WEIGHT_SCALE_SERVICE,
                [
                    self.weight_characteristic,
                    _constant(WEIGHT_SCALE_FEATURE, _TIMESTAMP_SUPPORTED_U32),
                ],
            ),
            gatt.Service(
                BODY_COMPOSITION_SERVICE,
                [
                    self.composition_characteristic,
                    _constant(BODY_COMPOSITION_FEATURE, _TIMESTAMP_SUPPORTED_U32),
                ],
            ),
        ]

    def step_on(self) -> tuple[float, float]:
        """Weigh and measure body fat now: (kg, %), indicated now or when a hub listens.

        Body Composition leaves its optional weight field out: the weight is the Weight
        Measurement's, so the hub gets it once.
        """
        sample = self.signal.next()
        stamp = DateTime.from_datetime(self.device_time())
        self.store_measurement(
            self.weight_characteristic,
            weight_scale.encode(weight_scale.WeightMeasurement(sample.weight_kg, timestamp=stamp)),
        )
        self.store_measurement(
            self.composition_characteristic,
            body_composition.encode(
                body_composition.BodyCompositionMeasurement(
                    sample.body_fat_percent, timestamp=stamp
                )
            ),
        )
        return sample.weight_kg, sample.body_fat_percent

    async def run_profile(self) -> None:
        if self.interval_s is not None:
            await _every(self.interval_s, self.step_on)
