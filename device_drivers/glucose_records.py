"""A glucose meter's stored records as readings: each record's key, and its context.

A record's key is its sequence number and its time as the meter stored them, so a record
read again has the same key and the gateway stores it once; a meter whose numbering started
again gives its new records other times, so other keys. A Glucose Measurement Context
(0x2A34) follows the measurement of the same sequence number when the meter says so: its
statements become the glucose reading's flags, its values readings of their own at the
measurement's time, under the record's key.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final

from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.exc import BleakError

from device_drivers.disk import on_disk
from device_drivers.gatt import glucose, racp
from device_drivers.stamping import to_readings
from device_drivers.state import HubState
from ingest.model import Reading

if TYPE_CHECKING:
    from device_drivers.driver import Arrival, SessionStats

log = logging.getLogger(__name__)

# Cursor name in the hub state: the last glucose record sequence number held durably.
GLUCOSE_CURSOR: Final = "glucose_sequence"
# The event recorded when a meter's record numbering is found to have started again.
SEQUENCE_RESET: Final = "record_sequence_reset"
_MAX_SEQUENCE: Final = 0xFFFF


def record_key(record: glucose.GlucoseMeasurement) -> str:
    """``g:<sequence number>:<record time, ms>`` (``-`` when the meter's clock was not set)."""
    when = glucose.measurement_time(record)
    stamp = "-" if when is None else str(int(when.timestamp() * 1000))
    return f"g:{record.sequence_number}:{stamp}"


def with_context(readings: Sequence[Reading], context: glucose.GlucoseContext) -> list[Reading]:
    """A record's readings (at least one) with its context linked to them."""
    flags = glucose.context_flags(context)
    first = readings[0]
    linked = [r._replace(flags=tuple(sorted({*r.flags, *flags}))) for r in readings]
    linked += [
        Reading(first.t_ms, m.metric, m.value, m.unit, first.sensor, record=first.record)
        for m in glucose.context_measurements(context)
    ]
    return linked


class StoredRecords:
    """One glucose meter's stored records, for its session: the cursor (the last record held
    durably, in the hub's state), the Record Access Control Point exchange of a connection
    (with a cursor: the newest record first, to notice a numbering that started again), and
    each record's context. ``keep`` makes readings durable (the session's sink), ``gap``
    records an event, ``now_ms`` is the hub's clock."""

    def __init__(
        self,
        sensor: str,
        keep: Callable[[list[Reading]], Awaitable[None]],
        gap: Callable[[int, int, str], Awaitable[None]],
        now_ms: Callable[[], int],
        state: HubState | None,
        stats: SessionStats,
    ) -> None:
        self.sensor = sensor
        self._keep = keep
        self._gap = gap
        self._now_ms = now_ms
        self.state = state
        self.stats = stats
        self._held_sequence: int | None = None
        self._durable_sequence: int | None = None
        # This connection's exchange: the control point, whether the newest-record probe
        # is outstanding (and the sequence number it answered with), the records handled.
        self._racp: tuple[BleakClient, BleakGATTCharacteristic] | None = None
        self._probing = False
        self._probed: int | None = None
        self._seen: set[int] = set()
        # A record whose meter said its context follows: held until the context (the next
        # value of the meter), then stored with it, or without it when anything else comes.
        self._awaiting: tuple[int, list[Reading]] | None = None

    def connection_ended(self) -> None:
        self._racp, self._probing = None, False

    async def on_glucose(self, value: Arrival) -> None:
        record = glucose.decode(value.data)
        sequence = record.sequence_number
        await self.store_awaiting()
        if self._probing:  # only where the numbering is: the records follow in order
            self._probed = sequence
            return
        held = self._held_sequence
        if sequence in self._seen or (held is not None and sequence <= held):
            self.stats.records_already_held += 1
            return
        key = record_key(record)
        measured = to_readings(glucose.measurements(record), value.t_ms, self.sensor)
        readings = [r._replace(record=key) for r in measured]
        self._seen.add(sequence)
        self.stats.records_fetched += 1
        if record.context_follows and readings:
            self._awaiting = (sequence, readings)
            return
        await self._store_record(sequence, readings)

    async def _store_record(self, sequence: int, readings: list[Reading]) -> None:
        await self._keep(readings)
        if self._durable_sequence is None or sequence > self._durable_sequence:
            self._durable_sequence = sequence

    async def store_awaiting(self) -> None:
        """Store the record held for its context without it (none came)."""
        if self._awaiting is not None:
            (sequence, readings), self._awaiting = self._awaiting, None
            await self._store_record(sequence, readings)

    async def on_context(self, value: Arrival) -> None:
        """Link a context to the record it follows: its statements (meal, tester, health,
        food, insulin) become the glucose reading's flags, its values readings of their own
        at the measurement's time, under the record's key."""
        context = glucose.decode_context(value.data)
        awaiting, self._awaiting = self._awaiting, None
        sequence = context.sequence_number
        if awaiting is None or awaiting[0] != sequence:
            if awaiting is not None:
                await self._store_record(*awaiting)
            held = self._held_sequence
            skipped = sequence in self._seen or (held is not None and sequence <= held)
            if not (self._probing or skipped):
                self.stats.contexts_unmatched += 1
            return
        self.stats.contexts_linked += 1
        await self._store_record(sequence, with_context(awaiting[1], context))

    async def on_racp(self, value: Arrival) -> None:
        await self.store_awaiting()
        response = racp.decode_response(value.data)
        if not isinstance(response, racp.ResponseCodeIndication):
            return
        if response.request_opcode != racp.Opcode.REPORT_STORED_RECORDS:
            return
        if self._probing:
            await self._after_probe(response)
            return
        if response.code in (racp.ResponseCode.SUCCESS, racp.ResponseCode.NO_RECORDS_FOUND):
            self.stats.racp_completed += 1
            await self.save_cursor()
        else:
            self.stats.racp_errors += 1
            log.warning(
                "stored records not reported sensor=%s response_code=%d",
                self.sensor,
                response.code,
            )

    async def _after_probe(self, response: racp.ResponseCodeIndication) -> None:
        """The meter said which record is its newest: ask for what follows the cursor, or,
        when its numbering started again below the cursor, for everything."""
        self._probing = False
        held, newest = self._held_sequence, self._probed
        if response.code not in (racp.ResponseCode.SUCCESS, racp.ResponseCode.NO_RECORDS_FOUND):
            self.stats.racp_errors += 1
            log.warning(
                "newest record not reported sensor=%s response_code=%d",
                self.sensor,
                response.code,
            )
            return
        if held is not None and newest is not None and newest < held:
            self.stats.sequence_resets += 1
            log.warning(
                "glucose record numbering started again sensor=%s cursor=%d newest=%d",
                self.sensor,
                held,
                newest,
            )
            now = self._now_ms()
            await self._gap(now, now, SEQUENCE_RESET)
            self._held_sequence = self._durable_sequence = None
            if self.state is not None:
                await on_disk(self.state.clear_cursor, self.sensor, GLUCOSE_CURSOR)
            await self._ask(racp.report_all_records())
            return
        await self._ask(
            racp.report_all_records()
            if held is None
            else racp.report_records_from(min(held + 1, _MAX_SEQUENCE))
        )

    async def request(self, client: BleakClient, control_point: BleakGATTCharacteristic) -> None:
        self._racp = (client, control_point)
        self._seen = set()
        self._probed = None
        if self._held_sequence is None:
            await self._ask(racp.report_all_records())
        else:
            self._probing = True
            await self._ask(racp.report_last_record())

    async def _ask(self, request: racp.RacpRequest) -> None:
        if self._racp is None:
            return
        client, control_point = self._racp
        self.stats.racp_requests += 1
        try:
            await client.write_gatt_char(control_point, racp.encode_request(request), response=True)
        except BleakError as exc:
            self._probing = False
            self.stats.racp_errors += 1
            log.warning(
                "stored records request refused sensor=%s error=%s",
                self.sensor,
                type(exc).__name__,
            )

    async def load_cursor(self) -> None:
        if self.state is not None and self._held_sequence is None:
            self._held_sequence = await on_disk(self.state.cursor, self.sensor, GLUCOSE_CURSOR)

    async def save_cursor(self) -> None:
        """Advance the cursor to the last record whose readings the sink made durable."""
        durable = self._durable_sequence
        if durable is None or (self._held_sequence is not None and durable <= self._held_sequence):
            return
        if self.state is not None:
            await on_disk(self.state.set_cursor, self.sensor, GLUCOSE_CURSOR, durable)
        self._held_sequence = durable
